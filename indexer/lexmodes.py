"""Lexicographic and prefix search modes of :class:`~cbir.indexer.reader.IndexReader`.

``search_lex`` pages either by ``offset`` (O(offset + k)) or by ``cursor`` (O(k + B): the
ranking is continued after the last key of the previous page, see ``LexSearcher.after``).
Label filters (``labels=``) read the posting list first: an empty filter returns at once, a
selective one (<= :data:`FILTER_BRUTE_MAX` ids) ranks exactly the ids it selects, a broad one
walks the ranking page by page and keeps the matching ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import numpy as np

from cbir.codes import Codes
from cbir.indexer import lexarray
from cbir.indexer.lexsearch import LexSearcher
from cbir.indexer.readerbase import ReaderAttrs
from cbir.indexer.results import (
    PrefixPage,
    SearchResult,
    empty_result,
    make_result,
    order_candidates,
    prefix_len_u64,
    xor_sort_keys,
)
from cbir.indexer.rows import key_order, make_keys

#: label filters selecting at most this many ids are answered by ranking exactly those ids
FILTER_BRUTE_MAX = 65_536


def _prefix_mask(codes: np.ndarray, q: np.ndarray, p: int) -> np.ndarray:
    """Rows of packed ``codes`` whose first ``p`` bits equal those of ``q``."""
    if p == 0:
        return np.ones(len(codes), dtype=bool)
    nfull = (p + 7) // 8
    mask = np.full(nfull, 0xFF, dtype=np.uint8)
    if p % 8:
        mask[-1] = (0xFF << (8 - p % 8)) & 0xFF
    return ((codes[:, :nfull] & mask) == (q[:nfull] & mask)).all(axis=1)


def _isin_sorted(ids: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Mask of ``ids`` present in the sorted array ``allowed``."""
    if len(allowed) == 0 or len(ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    i = np.searchsorted(allowed, ids)
    i[i == len(allowed)] = 0
    return allowed[i] == ids


def _after_anchor(perm: np.ndarray, anchor: int) -> np.ndarray:
    """Entries of the sorted permutation ``perm`` after the row ``anchor`` (which is dropped)."""
    at = int(np.flatnonzero(perm == anchor)[0])
    return perm[at + 1 :]


def uncertain_order(q: np.ndarray, codes: np.ndarray, ids: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Permutation sorting candidates in the order of uncertainty-aware probing: ``q XOR c``
    with the wildcard bits ``flips`` ((w, nb) one-bit masks) ignored, then the full
    lexicographic order (``q XOR c``, then id)."""
    mask = np.full(q.shape[0], 0xFF, dtype=np.uint8)
    mask ^= flips.sum(axis=0).astype(np.uint8)  # flips are distinct bits
    return np.lexsort(
        [np.asarray(ids, dtype=np.int64)] + xor_sort_keys(q, codes) + xor_sort_keys(q & mask, codes & mask)
    )


class LexModes(ReaderAttrs):
    """Mixin: needs ``nbits``, ``nb``, ``_env``, ``_count``, ``_with_txn``, ``_query``,
    ``_queries``, ``_codes_of``, ``ids_with_labels``."""

    def _init_lex(self) -> None:
        self._lex = LexSearcher(self.nbits, self._live_env.dbs["tree"])

    def _keys_result(
        self,
        q: np.ndarray,
        keys: np.ndarray,
        order: str,
        cursor: bool = False,
        k: int | None = None,
        x: np.ndarray | None = None,
    ) -> SearchResult:
        """Result of ordered tree keys; ``x``: their ``q XOR c`` as uint64 when known."""
        nb, ks = self.nb, self.nb + 8
        keys = np.ascontiguousarray(keys)
        n = len(keys)
        nxt = keys[-1].tobytes().hex() if cursor and n and (k is None or n >= k) else None
        if n == 0:
            return make_result(q, keys[:, :nb], np.zeros(0, np.int64), self.nbits, order)
        ids = np.ndarray((n,), dtype=">i8", buffer=keys, offset=nb, strides=(ks,)).astype(np.int64)
        codes = Codes(keys[:, :nb].copy(), self.nbits)
        if nb > 8:
            return make_result(q, codes.packed, ids, self.nbits, order, next_cursor=nxt)
        if x is None:  # <= 64 bits: XOR as one big-endian uint64 per hit
            head = np.ndarray((n,), dtype=">u8", buffer=keys, strides=(ks,)) & self._lex._mask
            x = head.astype(np.uint64) ^ np.uint64(int.from_bytes(q.tobytes().ljust(8, b"\0"), "big"))
        dist = np.bitwise_count(x).astype(np.int32)
        return SearchResult(ids, codes, dist, prefix_len_u64(x, self.nbits), order, nxt)

    def _cursor_key(self, cursor) -> bytes | None:
        if cursor is None or cursor == b"" or cursor == "":
            return None
        ks = self.nb + 8
        if isinstance(cursor, (bytes, bytearray, memoryview)):
            cursor = bytes(cursor)
            if len(cursor) == ks:
                return cursor
            cursor = cursor.decode("ascii", "replace")
        try:
            key = bytes.fromhex(str(cursor))
        except ValueError:
            raise ValueError("invalid cursor: pass back the next_cursor of a previous page") from None
        if len(key) != ks:
            raise ValueError("invalid cursor: pass back the next_cursor of a previous page")
        return key

    # lexicographic ------------------------------------------------------------------------
    def _lex_keys(self, q: np.ndarray, need: int, ckey: bytes | None) -> np.ndarray:
        if need <= 0 or self._count == 0:
            return np.zeros((0, self.nb + 8), dtype=np.uint8)
        qb = q.tobytes()
        if ckey is None:
            return self._with_txn(lambda txn: self._lex.topk(txn, qb, need))
        return self._with_txn(lambda txn: self._lex.after(txn, qb, ckey, need))

    def search_lex(
        self,
        code,
        k: int = 10,
        offset: int = 0,
        conf: np.ndarray | None = None,
        conf_threshold: float | None = None,
        probe_budget: int = 16,
        cursor: str | None = None,
        labels=None,
    ) -> SearchResult:
        """Top-``k`` in the lexicographic order (after skipping ``offset``).

        Paging: pass ``cursor=""`` for the first page and ``result.next_cursor`` for the next
        ones (O(k) per page, whatever the depth); ``offset`` also works but costs O(offset).
        ``labels``: only items carrying one of these labels (see ``ids_with_labels``).

        Uncertainty-aware probing: with ``conf`` ((B,) per-bit confidence of the query) and
        ``conf_threshold``, up to ``log2(probe_budget)`` least-confident bits below the threshold
        become wildcards: both subtrees are probed and results are ranked by ``q XOR c`` with the
        wildcard bits ignored, then by the full lexicographic order (exact for that order).
        """
        q = self._query(code)
        k, offset = int(k), int(offset)
        if k < 0 or offset < 0:
            raise ValueError("k and offset must be >= 0")
        if (
            cursor is None
            and labels is None
            and (conf is None or conf_threshold is None)
            and k + offset
            and self._count
        ):
            v = self._lex_view()  # the common case: binary searches on the sorted base
            if v is not None:
                return self._lex_from_view(v, q, k + offset, offset, False, k)
        paged = cursor is not None
        ckey = self._cursor_key(cursor)
        need = k + offset
        if conf is not None and conf_threshold is not None:
            if paged or labels is not None:
                raise ValueError("uncertainty-aware probing (conf=) takes no cursor or labels")
            return self._search_lex_uncertain(q, need, offset, conf, conf_threshold, probe_budget)
        if labels is not None:
            return self._search_lex_labels(q, k, offset, ckey, paged, labels)
        if ckey is None and need and self._count:
            v = self._lex_view()
            if v is not None:  # the common case: binary searches on the sorted base
                return self._lex_from_view(v, q, need, offset, paged, k)
            qb = q.tobytes()
            keys, x = self._with_txn(lambda txn: self._lex.topk_x(txn, qb, need))
            return self._keys_result(q, keys[offset:], "lex", paged, k, None if x is None else x[offset:])
        keys = self._lex_keys(q, need, ckey)
        return self._keys_result(q, keys[offset:], "lex", paged, k)

    def _lex_from_view(self, v, q: np.ndarray, need: int, offset: int, paged: bool, k: int) -> SearchResult:
        """Top-``need`` of the view (base rows minus the deleted ones, plus the added rows, merged
        in the one total order), from the ``offset``-th on (:mod:`cbir.indexer.lexarray`)."""
        b = v.base
        nb = self.nb
        q64 = int.from_bytes(q.tobytes(), "big") << (8 * (8 - nb))
        pos, x = lexarray.topk(b.head64, q64, need, 0, b.n, v.alive_mask())
        if len(v.add_ids):
            ah, aid = v.sorted_adds()
            p2, x2 = lexarray.topk(ah, q64, need)
            ids, x = lexarray.merge(b.ids[pos], x, aid[p2], x2, need)
            c64 = x ^ np.uint64(q64)
        else:
            ids, c64 = b.ids[pos], b.head64[pos]
        if offset:
            ids, x, c64 = ids[offset:], x[offset:], c64[offset:]
        n = len(ids)
        packed = c64.astype(">u8").view(np.uint8).reshape(n, 8)
        if nb < 8:
            packed = np.ascontiguousarray(packed[:, :nb])
        nxt = None
        if paged and n and n >= k:
            nxt = (packed[-1].tobytes() + int(ids[-1]).to_bytes(8, "big")).hex()
        dist = np.bitwise_count(x).astype(np.int32)
        return SearchResult(ids, Codes._trusted(packed, self.nbits), dist, prefix_len_u64(x, self.nbits), "lex", nxt)

    def _search_lex_labels(self, q, k, offset, ckey, paged, labels) -> SearchResult:
        allowed = self.ids_with_labels(labels)
        need = k + offset
        if len(allowed) == 0 or need == 0:
            return empty_result(q, self.nbits, "lex")
        if len(allowed) <= FILTER_BRUTE_MAX:  # rank exactly the selected ids
            ids, codes = self._codes_of(allowed)
            if ckey is not None:
                codes = np.concatenate([codes, np.frombuffer(ckey[: self.nb], np.uint8)[None, :]])
                ids = np.concatenate([ids, [int.from_bytes(ckey[self.nb :], "big")]])
                perm = _after_anchor(order_candidates(q, codes, ids, "lex"), len(ids) - 1)
            else:
                perm = order_candidates(q, codes, ids, "lex")
            perm = perm[offset:need]
            keys = make_keys(codes[perm], ids[perm])
            return self._keys_result(q, keys, "lex", paged, k)
        got: list[np.ndarray] = []
        page = max(256, 2 * need)
        while sum(len(g) for g in got) < need:  # broad filter: walk the ranking
            keys = self._lex_keys(q, page, ckey)
            if len(keys) == 0:
                break
            ids = np.ascontiguousarray(keys[:, self.nb :]).view(">i8").reshape(-1).astype(np.int64)
            got.append(keys[_isin_sorted(ids, allowed)])
            ckey = keys[-1].tobytes()
            if len(keys) < page:
                break
            page = min(2 * page, 1 << 20)
        keys = np.concatenate(got) if got else np.zeros((0, self.nb + 8), np.uint8)
        return self._keys_result(q, keys[offset:need], "lex", paged, k)

    def search_lex_batch(
        self,
        codes,
        k: int = 10,
        offset: int = 0,
        conf=None,
        conf_threshold: float | None = None,
        probe_budget: int = 16,
        labels=None,
    ) -> list[SearchResult]:
        Q = self._queries(codes)
        return [
            self.search_lex(
                Q[i].tobytes(),
                k,
                offset,
                None if conf is None else np.asarray(conf)[i],
                conf_threshold,
                probe_budget,
                labels=labels,
            )
            for i in range(len(Q))
        ]

    def wildcard_flips(self, conf, thr: float, budget: int) -> np.ndarray:
        """(w, nb) uint8 one-bit masks of the query bits uncertainty-aware probing treats as
        wildcards: up to ``log2(budget)`` least-confident bits with ``conf < thr``."""
        conf = np.asarray(conf, dtype=np.float32).reshape(-1)
        if conf.shape[0] != self.nbits:
            raise ValueError(f"conf must have {self.nbits} entries")
        low = np.flatnonzero(conf < thr)
        w = min(len(low), max(0, int(np.log2(max(1, budget)))))
        wild = low[np.argsort(conf[low], kind="stable")[:w]]
        flips = np.zeros((w, self.nb), dtype=np.uint8)
        for j, b in enumerate(wild):
            flips[j, b // 8] = 0x80 >> (b % 8)
        return flips

    def _search_lex_uncertain(self, q, need, offset, conf, thr, budget) -> SearchResult:
        flips = self.wildcard_flips(conf, thr, budget)
        w = len(flips)
        if w == 0:
            return self._keys_result(q, self._lex_keys(q, need, None)[offset:], "lex")

        def probe_all(txn):
            out = []
            for v in range(1 << w):
                qv = q.copy()
                for j in range(w):
                    if v >> j & 1:
                        qv ^= flips[j]
                if need and self._count:
                    out.append(self._lex.topk(txn, qv.tobytes(), need))
            return out

        allkeys = self._with_txn(probe_all)
        keys = np.unique(np.concatenate(allkeys), axis=0) if allkeys else np.zeros((0, self.nb + 8), np.uint8)
        codes, ids = keys[:, : self.nb], np.ascontiguousarray(keys[:, self.nb :]).view(">i8").reshape(-1)
        perm = uncertain_order(q, codes, ids, flips)[offset:need]
        return make_result(q, codes[perm], ids[perm], self.nbits, "lex")

    # prefix ------------------------------------------------------------------------------------
    def _prefix_arg(self, bits) -> tuple[bytes, int]:
        if isinstance(bits, Codes):
            if len(bits) != 1:
                raise ValueError("prefix must be one code")
            p = bits.nbits
            packed = bits.packed[0]
        else:
            if isinstance(bits, str):
                bits = [int(c) for c in bits.strip() if c in "01"]
            arr = np.asarray(list(bits), dtype=np.uint8).reshape(1, -1)
            p = arr.shape[1]
            packed = Codes.from_bits(arr).packed[0] if p else np.zeros(0, np.uint8)
        if p > self.nbits:
            raise ValueError(f"prefix of {p} bits is longer than the {self.nbits}-bit codes")
        return packed.tobytes(), p

    def _prefix_keys(self, pb: bytes, p: int, start: bytes, limit: int) -> tuple[np.ndarray, int]:
        """Up to ``limit + 1`` keys from ``start`` on, and how many of them carry the prefix."""
        ks = self.nb + 8

        def read(txn):
            cur = txn.cursor(self._live_env.dbs["tree"])
            return b"".join(islice(cur.iternext(values=False), limit + 1)) if cur.set_range(start) else b""

        keys = np.frombuffer(self._with_txn(read), dtype=np.uint8).reshape(-1, ks)
        if not p:
            return keys, len(keys)
        ok = _prefix_mask(keys[:, : self.nb], np.frombuffer(pb.ljust(self.nb, b"\0"), np.uint8), p)
        return keys, int(np.argmin(ok)) if not ok.all() else len(ok)

    def search_prefix(self, bits, limit: int = 100, cursor: str | bytes | None = None, labels=None) -> PrefixPage:
        """Items whose code starts with the bit prefix ``bits`` (str of 0/1, sequence of 0/1, or
        a 1-row Codes whose ``nbits`` is the prefix length), ascending code then id, ``limit``
        per page; pass ``page.next_cursor`` back to continue. ``labels``: only items carrying
        one of these labels."""
        pb, p = self._prefix_arg(bits)
        limit = int(limit)
        if limit < 0:
            raise ValueError("limit must be >= 0")
        nb = self.nb
        lo = pb.ljust(nb, b"\0") + b"\0" * 8
        start = self._cursor_key(cursor)
        if start is not None:
            if start < lo:
                raise ValueError("cursor does not belong to this prefix")
        else:
            start = lo
        if labels is not None:
            return self._prefix_labels(pb, p, start, limit, labels)
        keys, n_ok = self._prefix_keys(pb, p, start, limit)
        nxt = keys[limit].tobytes().hex() if n_ok > limit else None
        return self._page(keys[: min(n_ok, limit)], nxt)

    def _page(self, sel: np.ndarray, nxt: str | None) -> PrefixPage:
        nb = self.nb
        ids = np.ascontiguousarray(sel[:, nb:]).view(">i8").reshape(-1).astype(np.int64)
        return PrefixPage(ids, Codes(np.ascontiguousarray(sel[:, :nb]), self.nbits), nxt)

    def _prefix_labels(self, pb: bytes, p: int, start: bytes, limit: int, labels) -> PrefixPage:
        allowed = self.ids_with_labels(labels)
        nb, ks = self.nb, self.nb + 8
        if len(allowed) == 0 or limit == 0:
            return self._page(np.zeros((0, ks), np.uint8), None)
        if len(allowed) <= FILTER_BRUTE_MAX:  # the selected ids, sorted by key
            ids, codes = self._codes_of(allowed)
            q = np.frombuffer(pb.ljust(nb, b"\0"), np.uint8)
            m = _prefix_mask(codes, q, p)
            keys = make_keys(codes[m], ids[m])
            keys = np.concatenate([keys, np.frombuffer(start, np.uint8)[None, :]])
            perm = key_order(keys[:, :nb], np.ascontiguousarray(keys[:, nb:]).view(">i8").reshape(-1))
            at = int(np.flatnonzero(perm == len(keys) - 1)[0])
            # rows equal to the start key sort before it (stable): the start key itself is kept
            eq = (keys[perm[:at]] == keys[-1]).all(axis=1)
            rest = np.concatenate([perm[:at][eq], perm[at + 1 :]])
            sel = keys[rest]
            nxt = sel[limit].tobytes().hex() if len(sel) > limit else None
            return self._page(sel[:limit], nxt)
        got, n_got, page = [], 0, max(256, 2 * limit)
        nxt = None
        while True:  # broad filter: walk the prefix range
            keys, n_ok = self._prefix_keys(pb, p, start, page)
            inside = keys[: min(n_ok, page)]
            ids = np.ascontiguousarray(inside[:, nb:]).view(">i8").reshape(-1).astype(np.int64)
            hit = inside[_isin_sorted(ids, allowed)]
            got.append(hit)
            n_got += len(hit)
            if n_got > limit:
                allk = np.concatenate(got)
                nxt = allk[limit].tobytes().hex()
                break
            if n_ok <= page:  # the prefix range (or the tree) ended
                break
            start = keys[page].tobytes()
            page = min(2 * page, 1 << 20)
        allk = np.concatenate(got) if got else np.zeros((0, ks), np.uint8)
        return self._page(allk[:limit], nxt)

    def search_prefix_batch(self, prefixes: Iterable, limit: int = 100, labels=None) -> list[PrefixPage]:
        return [self.search_prefix(p, limit, labels=labels) for p in prefixes]
