"""Sub-linear lexicographic top-k over the LMDB ``tree`` database.

Keys of ``tree`` are ``code bytes || 8-byte big-endian id``, so the B-tree order is the
ascending code order (ties by id) and every trie node (bit prefix) is one contiguous key range.

For a query ``q`` the lexicographic order of :mod:`cbir.codes` (ascending ``q XOR c``, ties by
id) is a DFS of that trie visiting the query-matching child first. Equivalently: items sharing
a longer prefix with ``q`` come first. The set ``{c : cpl(q, c) >= j}`` is the subtree
``q[:j]``, a contiguous key range around the position of ``q`` in the B-tree, and as one walks
away from that position (rightwards or leftwards) the common prefix length never increases.

Algorithm (:func:`lex_topk`): one ``set_range`` positions two cursors at ``q``; a window of
``W`` keys is read on each side (``iternext``/``iterprev`` drained by C code). From the last key
read on each side we know the smallest depth ``J`` whose subtree ``q[:J]`` is entirely inside
the window. If that subtree holds >= k items, the answer is its top-k (sorted in numpy by
``(q XOR c, key order)``). Otherwise the window is widened on the side that limits ``J``; after a
few widenings we fall back to recursion: emit the whole subtree ``q[:J]``, then visit the sibling
subtrees ``S_{J-1}, S_{J-2}, ..., S_d`` (items whose common prefix with ``q`` is exactly ``j``)
in order, each by the same procedure with bit ``j`` of the query flipped and the search
restricted to depth ``j + 1``. Every step reads O(k) keys with O(1) seeks, never the database.
"""

from __future__ import annotations

from itertools import islice

import numpy as np

from cbir.codes import _LEADING_ZEROS

ZERO8 = b"\x00" * 8
_join = b"".join


def _cpl_rows(x: np.ndarray, nbits: int) -> np.ndarray:
    """Common-prefix length of each XOR row (n, nb) (i.e. leading zero bits, capped at B)."""
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    nz = x != 0
    first = np.argmax(nz, axis=1)
    out = first * 8 + _LEADING_ZEROS[x[np.arange(n), first]]
    return np.where(nz.any(axis=1), np.minimum(out, nbits), nbits)


class LexSearcher:
    """Runs lexicographic searches on one read transaction of one index.

    ``nbits``: code length; ``tree``: the LMDB sub-database handle. Methods return the ordered
    keys as a ``(n, nb + 8)`` uint8 array (code bytes then big-endian id).
    """

    #: widenings of the window before falling back to recursion into sibling subtrees
    MAX_WIDEN = 3

    def __init__(self, nbits: int, tree) -> None:
        self.nbits = nbits
        self.nb = (nbits + 7) // 8
        self.ks = self.nb + 8
        self.tree = tree
        self.fast = self.nb <= 8
        # mask keeping the code bytes of the first 8 bytes of a key (fast path)
        if self.fast:
            self._mask = np.uint64(((1 << (8 * self.nb)) - 1) << (8 * (8 - self.nb)))

    # ------------------------------------------------------------------------------------
    def topk(self, txn, q: bytes, k: int, d: int = 0) -> np.ndarray:
        """Top-``k`` keys in lexicographic order for packed query ``q`` among codes sharing the
        first ``d`` bits with ``q``."""
        if k <= 0:
            return np.zeros((0, self.ks), dtype=np.uint8)
        if self.fast:
            return self._topk_fast(txn, q, int.from_bytes(q.ljust(8, b"\0"), "big"), k, d)[0]
        return self._topk_generic(txn, q, k, d)

    def topk_x(self, txn, q: bytes, k: int):
        """(keys, their ``q XOR c`` as uint64 or None): :meth:`topk` plus the XOR values it
        already computed (<= 64-bit codes, answers found in one window)."""
        if k <= 0 or not self.fast:
            return self.topk(txn, q, k), None
        return self._topk_fast(txn, q, int.from_bytes(q.ljust(8, b"\0"), "big"), k, 0)

    # --- fast path: codes of <= 64 bits, XOR as one uint64 --------------------------------
    def _u64(self, buf: bytes, n: int) -> np.ndarray:
        # first 8 bytes of every key as big-endian uint64, id bytes masked off
        return np.ndarray((n,), dtype=">u8", buffer=buf, strides=(self.ks,)) & self._mask

    def _topk_fast(self, txn, qb: bytes, q64: int, k: int, d: int):
        """(keys, XOR values or None)."""
        ks = self.ks
        nbits = self.nbits
        qkey = qb + ZERO8
        qn = np.uint64(q64)
        w = k + 16
        cr = txn.cursor(self.tree)
        cl = txn.cursor(self.tree)
        rpos = cr.set_range(qkey)
        if rpos:
            itr = cr.iternext(values=False)
            rbuf = _join(islice(itr, w))
            nr = len(rbuf) // ks
            rex = nr < w
        else:
            itr, rbuf, nr, rex = None, b"", 0, True
        okl = cl.prev() if rpos and cl.set_range(qkey) else (not rpos and cl.last())
        if okl:
            itl = cl.iterprev(values=False)
            lbuf = _join(islice(itl, w))
            nl = len(lbuf) // ks
            lex = nl < w
        else:
            itl, lbuf, nl, lex = None, b"", 0, True
        wr = wl = w
        xr = self._u64(rbuf, nr) ^ qn if nr else np.zeros(0, np.uint64)
        xl = self._u64(lbuf, nl) ^ qn if nl else np.zeros(0, np.uint64)
        widen = 0
        while True:
            # J: smallest depth whose subtree q[:J] lies entirely in the window
            jr = 0 if rex else 65 - int(xr[-1]).bit_length()
            jl = 0 if lex else 65 - int(xl[-1]).bit_length()
            J = max(d, jr, jl)
            if J > nbits:
                # only exact duplicates of q on the right (the left holds keys < q||0): the
                # first k of them, in id order, are the answer (w >= k of them were read)
                return np.frombuffer(rbuf, dtype=np.uint8, count=k * ks).reshape(k, ks), xr[:k]
            if J == 0:
                cR, cL = nr, nl
            else:
                thr = np.uint64(1 << (64 - J))
                cR = int(np.count_nonzero(xr < thr))
                cL = int(np.count_nonzero(xl < thr))
            if cR + cL >= k or J <= d:
                return self._emit_fast(rbuf, lbuf, xr, xl, cR, cL, k)
            if widen < self.MAX_WIDEN:
                widen += 1
                if not rex and jr == J:
                    more = _join(islice(itr, wr))
                    m = len(more) // ks
                    rex = m < wr
                    wr *= 2
                    if m:
                        rbuf += more
                        nr += m
                        xr = np.concatenate([xr, self._u64(more, m) ^ qn])
                if not lex and jl == J:
                    more = _join(islice(itl, wl))
                    m = len(more) // ks
                    lex = m < wl
                    wl *= 2
                    if m:
                        lbuf += more
                        nl += m
                        xl = np.concatenate([xl, self._u64(more, m) ^ qn])
                continue
            # recursion: the whole subtree q[:J], then the sibling subtrees S_{J-1}, ..., S_d
            parts = [self._emit_fast(rbuf, lbuf, xr, xl, cR, cL, k)[0]]
            need = k - len(parts[0])
            for j in range(J - 1, d - 1, -1):
                if need <= 0:
                    break
                q2 = q64 ^ (1 << (63 - j))
                sub = self._topk_fast(txn, q2.to_bytes(8, "big")[: self.nb], q2, need, j + 1)[0]
                if len(sub):
                    parts.append(sub)
                    need -= len(sub)
            return np.concatenate(parts), None

    def _emit_fast(self, rbuf, lbuf, xr, xl, cR, cL, k):
        ks = self.ks
        R = np.frombuffer(rbuf, dtype=np.uint8, count=cR * ks).reshape(cR, ks)
        if cL == 0:
            x, keys = xr[:cR], R
        else:
            # left keys reversed -> whole window in ascending key order, so a stable sort on
            # XOR breaks ties (equal codes) by ascending id
            L = np.frombuffer(lbuf, dtype=np.uint8, count=cL * ks).reshape(cL, ks)[::-1]
            x = np.concatenate([xl[:cL][::-1], xr[:cR]])
            keys = np.concatenate([L, R])
        order = np.argsort(x, kind="stable")[:k]
        return keys[order], x[order]

    # --- generic path: any code length ------------------------------------------------------
    def _codes_of(self, buf: bytes, n: int) -> np.ndarray:
        return np.frombuffer(buf, dtype=np.uint8, count=n * self.ks).reshape(n, self.ks)

    def _topk_generic(self, txn, qb: bytes, k: int, d: int) -> np.ndarray:
        ks, nb, nbits = self.ks, self.nb, self.nbits
        q = np.frombuffer(qb, dtype=np.uint8)
        qkey = qb + ZERO8
        w = k + 16
        cr = txn.cursor(self.tree)
        cl = txn.cursor(self.tree)
        rpos = cr.set_range(qkey)
        if rpos:
            itr = cr.iternext(values=False)
            rbuf = _join(islice(itr, w))
        else:
            itr, rbuf = None, b""
        rex = len(rbuf) // ks < w
        okl = cl.prev() if rpos and cl.set_range(qkey) else (not rpos and cl.last())
        if okl:
            itl = cl.iterprev(values=False)
            lbuf = _join(islice(itl, w))
        else:
            itl, lbuf = None, b""
        lex = len(lbuf) // ks < w
        wr = wl = w
        widen = 0
        while True:
            R = self._codes_of(rbuf, len(rbuf) // ks)
            L = self._codes_of(lbuf, len(lbuf) // ks)
            pr = _cpl_rows(R[:, :nb] ^ q, nbits)
            pl = _cpl_rows(L[:, :nb] ^ q, nbits)
            jr = 0 if rex else int(pr[-1]) + 1
            jl = 0 if lex else int(pl[-1]) + 1
            J = max(d, jr, jl)
            if J > nbits:
                return R[:k].copy()
            cR = int(np.count_nonzero(pr >= J))
            cL = int(np.count_nonzero(pl >= J))
            if cR + cL >= k or J <= d:
                return self._emit_generic(q, R, L, cR, cL, k)
            if widen < self.MAX_WIDEN:
                widen += 1
                if not rex and jr == J:
                    more = _join(islice(itr, wr))
                    rex = len(more) // ks < wr
                    wr *= 2
                    rbuf += more
                if not lex and jl == J:
                    more = _join(islice(itl, wl))
                    lex = len(more) // ks < wl
                    wl *= 2
                    lbuf += more
                continue
            parts = [self._emit_generic(q, R, L, cR, cL, k)]
            need = k - len(parts[0])
            for j in range(J - 1, d - 1, -1):
                if need <= 0:
                    break
                q2 = bytearray(qb)
                q2[j // 8] ^= 0x80 >> (j % 8)
                sub = self._topk_generic(txn, bytes(q2), need, j + 1)
                if len(sub):
                    parts.append(sub)
                    need -= len(sub)
            return np.concatenate(parts)

    def _emit_generic(self, q, R, L, cR, cL, k) -> np.ndarray:
        keys = np.concatenate([L[:cL][::-1], R[:cR]])
        x = keys[:, : self.nb] ^ q
        # stable lexsort on XOR bytes; the window is in key order, so ties stay in id order
        order = np.lexsort([np.arange(len(x))] + [x[:, j] for j in range(self.nb - 1, -1, -1)])
        return keys[order[:k]]

    # --- paging: the ranking after a given key, O(k + B) -------------------------------------
    def after(self, txn, qb: bytes, ckey: bytes, k: int) -> np.ndarray:
        """The ``k`` keys that follow the key ``ckey`` (code || id) in the lexicographic order
        of query ``qb``: first equal codes with larger ids, then the sibling subtrees of the
        path to ``ckey`` that the DFS visits later (at every depth j where ``ckey`` follows
        ``q``'s bit, the subtree with bit j flipped), deepest first. Empty subtrees cost one
        seek, the others what they return."""
        nb, ks, nbits = self.nb, self.ks, self.nbits
        if k <= 0:
            return np.zeros((0, ks), dtype=np.uint8)
        code = ckey[:nb]
        parts = []
        cur = txn.cursor(self.tree)
        if cur.set_range(ckey):
            same: list[bytes] = []
            for key in cur.iternext(values=False):
                if key == ckey:
                    continue
                if key[:nb] != code or len(same) >= k:
                    break
                same.append(key)
            if same:
                parts.append(np.frombuffer(_join(same), dtype=np.uint8).reshape(-1, ks))
        need = k - sum(len(p) for p in parts)
        width = 8 * nb
        qi = int.from_bytes(qb, "big")
        ci = int.from_bytes(code, "big")
        t = qi ^ ci
        for j in range(nbits - 1, -1, -1):
            if need <= 0:
                break
            bit = 1 << (width - 1 - j)
            if t & bit:
                continue  # ckey is in the flipped branch here: its sibling came earlier
            hi_mask = ((1 << width) - 1) ^ (bit - 1)  # bits 0..j
            pre = (ci ^ bit) & hi_mask
            if not self._nonempty(cur, pre, j + 1):
                continue
            q2 = pre | (qi & (bit - 1))
            sub = self.topk(txn, q2.to_bytes(nb, "big"), need, j + 1)
            if len(sub):
                parts.append(sub)
                need -= len(sub)
        if not parts:
            return np.zeros((0, ks), dtype=np.uint8)
        return np.concatenate(parts)

    def _nonempty(self, cur, pre: int, p: int) -> bool:
        """Some key starts with the ``p``-bit prefix ``pre`` (as a left-aligned int)."""
        width = 8 * self.nb
        if not cur.set_range(pre.to_bytes(self.nb, "big") + ZERO8):
            return False
        got = int.from_bytes(cur.key()[: self.nb], "big")
        return (got ^ pre) >> (width - p) == 0
