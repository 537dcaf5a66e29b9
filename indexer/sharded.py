"""Sharded indexes: one collection split by its leading code bits into S complete indexes.

Layout: ``<dir>/manifest.json`` (the top-level manifest: the usual fields plus ``shards``, a
list of ``{"path": "shards/0003", "prefix": 3, "count": n}``, and ``shard_bits`` = log2 S) and
``<dir>/shards/<NNNN>/``, each a complete, crash-safe cbir index of its own written by
:func:`cbir.indexer.build_index` (it can be opened, copied or served alone).

Partition: S is a power of two, 2 <= S <= 2^B; shard ``j`` holds exactly the codes whose
leading ``s = log2 S`` bits, read as an integer, equal ``j`` (shards may be empty). So a shard
is a contiguous range of the lexicographic key order, and in the lexicographic order of a
query ``q`` the shards come whole, sorted by ``lead(q) XOR j``: a lex search reads the
query's own shard first and moves on only when that shard runs out (usually it touches one
shard). Every item of shard ``j`` is at Hamming distance >= popcount(lead(q) XOR j) from
``q``: Hamming k-NN visits the shards by that bound and stops when it exceeds the k-th
distance found; a radius search skips shards whose bound exceeds the radius. Hybrid and
prefix searches visit only the shards whose leading bits match the query's prefix.

Every result is exactly that of one index over the whole collection (the orders of
:func:`cbir.codes.rank`, ties included): per-shard results are merged in the engine's total
order (:func:`cbir.indexer.results.order_candidates`), and cursors are the same opaque keys
(code || id) as a single index's, so the shard a cursor continues in is read from its bits.

Writes: a sharded index is **read-only**. An upsert that changes an item's leading bits would
move it between two LMDB environments, which no one transaction covers (a crash would leave it
twice or nowhere); ``open_index(path, readonly=False)`` and :class:`IndexWriter` refuse it
with a ``ValueError``, and :meth:`ShardedReader.add` & co. raise ``PermissionError``. Change
the collection by rebuilding (``cbir index build --shards S``; the swap is atomic).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Self

import numpy as np

from cbir.codes import CodeLayout, Codes
from cbir.indexer import publish as _publish
from cbir.indexer.build import _pid_alive, _tmp_dir, build_index
from cbir.indexer.env import is_sharded, new_manifest, read_manifest, write_manifest
from cbir.indexer.lexmodes import LexModes, uncertain_order
from cbir.indexer.publish import MANIFEST, SHARDS_DIR
from cbir.indexer.reader import IndexReader
from cbir.indexer.results import (
    PrefixPage,
    SearchResult,
    empty_result,
    make_result,
    order_candidates,
)
from cbir.indexer.rows import as_ids, check_codes, head64, make_keys
from cbir.indexer.stats import dir_bytes, packed_coverage

READ_ONLY = (
    "is a sharded index, which is read-only: a write that moves an item between shards "
    "cannot be one transaction. Open it with open_index(path) (readonly) and change the "
    "collection by rebuilding it (cbir index build --shards S, an atomic swap)"
)


def shard_bits_for(shards: int, nbits: int) -> int:
    """log2 of ``shards``; ValueError unless it is a power of two with 2 <= S <= 2^nbits."""
    s = int(shards)
    if s < 2 or s & (s - 1):
        raise ValueError(
            f"--shards {shards}: the number of shards must be a power of two >= 2 "
            "(shards split the collection by its leading code bits), e.g. 2, 4, 8"
        )
    bits = s.bit_length() - 1
    if bits > nbits:
        raise ValueError(
            f"--shards {shards} needs {bits} leading bits but the codes have {nbits}; "
            f"use at most {1 << min(nbits, 16)} shards"
        )
    return bits


def shard_of(packed: np.ndarray, shard_bits: int) -> np.ndarray:
    """Shard (int64) of each packed code row: its leading ``shard_bits`` bits as an integer."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1, np.asarray(packed).shape[-1])
    return (head64(packed) >> np.uint64(64 - shard_bits)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------
def build_sharded_index(
    out_dir,
    ids,
    codes: Codes,
    shards: int,
    meta=None,
    conf=None,
    layout: CodeLayout | None = None,
    model_hash: str = "",
    build_params: dict | None = None,
    overwrite: bool = True,
    progress: bool = False,
    force: bool = False,
) -> Path:
    """Build a sharded index of ``shards`` (a power of two) shards at ``out_dir`` atomically.

    Each shard is written by :func:`build_index` into one temporary directory, the top-level
    manifest last, and the whole directory is published as one build is
    (:mod:`cbir.indexer.publish`: ``out_dir`` new, empty or an existing cbir index, plain or
    sharded; cbir never deletes a file it did not write). ``shards=1`` builds a plain index.
    """
    if int(shards) == 1:
        return build_index(
            out_dir, ids, codes, meta, conf, layout, model_hash, build_params, overwrite, progress, force
        )
    out = Path(out_dir).absolute()
    if layout is None:
        layout = CodeLayout(nbits=codes.nbits)
    codes = check_codes(codes, layout.nbits)
    ids = as_ids(ids, len(codes))
    sb = shard_bits_for(shards, layout.nbits)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    if meta is not None and len(meta) != len(ids):
        raise ValueError(f"got {len(meta)} metadata rows for {len(ids)} codes")
    mode = _publish.check_output(out, force)
    if mode == "index" and not overwrite:
        raise FileExistsError(f"{out} exists (overwrite=False)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _publish.cleanup_stale(out.parent, out.name, out, _pid_alive)
    which = shard_of(codes.packed, sb)
    tmp = _tmp_dir(out)
    entries = []
    try:
        (tmp / SHARDS_DIR).mkdir(parents=True)
        for j in range(int(shards)):
            rows = np.flatnonzero(which == j)
            rel = f"{SHARDS_DIR}/{j:04d}"
            params = dict(build_params or {}, shard=j, shards=int(shards), shard_bits=sb)
            build_index(
                tmp / rel,
                ids[rows],
                codes[rows],
                None if meta is None else [meta[i] for i in rows.tolist()],
                None if conf is None else np.asarray(conf)[rows],
                layout,
                model_hash,
                params,
                progress=progress,
            )
            entries.append({"path": rel, "prefix": j, "count": len(rows)})
        man = new_manifest(layout, model_hash, dict(build_params or {}, shards=int(shards)))
        man.update(count=len(ids), generation=1, shard_bits=sb, shards=entries)
        write_manifest(tmp, man)  # last: marks a complete sharded index
        _publish.fsync_dir(tmp)
        _publish.publish(tmp, out, _publish.check_output(out, force))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # cbir's own temporary directory
        raise
    return out


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _concat(q: np.ndarray, parts: list[SearchResult], nbits: int, order: str) -> SearchResult:
    """Results already in the global order, one after the other."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_result(q, nbits, order)
    if len(parts) == 1:
        return parts[0]
    return SearchResult(
        np.concatenate([p.ids for p in parts]),
        Codes(np.concatenate([p.codes.packed for p in parts]), nbits),
        np.concatenate([p.distances for p in parts]),
        np.concatenate([p.prefix_lengths for p in parts]),
        order,
    )


def _merge(
    q: np.ndarray, parts: list[SearchResult], nbits: int, order: str, k: int | None, perm_fn=None
) -> SearchResult:
    """Per-shard results merged in the exact ``order`` (or ``perm_fn(codes, ids)``), cut to k."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_result(q, nbits, order)
    codes = np.concatenate([p.codes.packed for p in parts])
    ids = np.concatenate([p.ids for p in parts])
    dist = np.concatenate([p.distances for p in parts])
    perm = perm_fn(codes, ids) if perm_fn else order_candidates(q, codes, ids, order, dist)
    if k is not None:
        perm = perm[: int(k)]
    return make_result(q, codes[perm], ids[perm], nbits, order, dist[perm])


def _skip(r: SearchResult, n: int) -> SearchResult:
    if n <= 0:
        return r
    return SearchResult(
        r.ids[n:],
        r.codes[n:] if len(r) > n else Codes.empty(r.codes.nbits),
        r.distances[n:],
        r.prefix_lengths[n:],
        r.order,
    )


def _key_hex(codes: np.ndarray, ids: np.ndarray, i: int) -> str:
    return make_keys(codes[i : i + 1], ids[i : i + 1])[0].tobytes().hex()


class ShardedReader:
    """Searches a sharded index (see the module docstring) with the API of
    :class:`~cbir.indexer.reader.IndexReader`; results equal one index over the whole
    collection. Read-only; thread-safe (each shard reader is)."""

    readonly = True

    def __init__(self, path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._closed = False
        self._shards: list[IndexReader] = []
        self._open()

    def _open(self) -> None:
        man = read_manifest(self.path)
        if not is_sharded(man):
            raise ValueError(f"{self.path} is not a sharded index (open it with open_index)")
        ents = sorted(man["shards"], key=lambda e: int(e["prefix"]))
        sb = int(man["shard_bits"])
        if [int(e["prefix"]) for e in ents] != list(range(1 << sb)):
            raise ValueError(f"{self.path / MANIFEST}: shards must cover prefixes 0..{(1 << sb) - 1}")
        readers = []
        try:
            for e in ents:
                readers.append(IndexReader(self.path / e["path"], readonly=True))
        except BaseException:
            for r in readers:
                r.close()
            raise
        self.manifest = man
        self.layout = CodeLayout.from_dict(man["layout"])
        self.nbits = self.layout.nbits
        self.nb = (self.nbits + 7) // 8
        self.shard_bits = sb
        self._shards = readers

    # lifecycle ------------------------------------------------------------------------------
    @property
    def shards(self) -> list[IndexReader]:
        """The shard readers, shard ``j`` (leading bits = j) at position j."""
        with self._lock:
            if self._closed:
                raise ValueError("index reader is closed")
            return list(self._shards)

    def refresh(self) -> bool:
        """Refresh every shard; an index rebuilt in place (a new top-level manifest) is
        re-opened whole. True when anything changed."""
        with self._lock:
            try:
                uuid = read_manifest(self.path).get("index_uuid")
            except (OSError, ValueError):
                uuid = self.manifest.get("index_uuid")  # mid-swap: keep what we have
            if uuid != self.manifest.get("index_uuid"):
                old = self._shards
                self._open()
                for r in old:
                    r.close()
                return True
            changed = [r.refresh() for r in self._shards]  # every shard, not the first to change
            return any(changed)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for r in self._shards:
                r.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def count(self) -> int:
        return sum(r.count() for r in self.shards)

    def __len__(self) -> int:
        return self.count()

    @property
    def generation(self) -> int:
        return sum(r.generation for r in self.shards)

    @property
    def model_hash(self) -> str:
        return self.manifest.get("model_hash", "")

    @property
    def has_label_index(self) -> bool:
        return all(r.has_label_index for r in self.shards)

    def derived(self) -> list:
        """Bring every shard's derived structures up to date (the server's warm-up)."""
        return [r.derived() for r in self.shards]

    def preload(self) -> int:
        """:meth:`IndexReader.preload` of every shard; the bytes touched."""
        return sum(r.preload() for r in self.shards)

    # helpers ---------------------------------------------------------------------------------
    def _query(self, code) -> np.ndarray:
        return self.shards[0]._query(code)

    def _queries(self, codes) -> np.ndarray:
        return self.shards[0]._queries(codes)

    def _lead(self, row: np.ndarray) -> int:
        """The shard of one packed code row (its leading ``shard_bits`` bits; Python ints: a
        numpy call per query costs more)."""
        return int.from_bytes(row[:8].tobytes().ljust(8, b"\0"), "big") >> (64 - self.shard_bits)

    def _plan(self, lead: int) -> list[int]:
        """The shards in the lexicographic order of a query in shard ``lead``: ``j XOR lead``."""
        plans = self.__dict__.setdefault("_plans", {})
        got = plans.get(lead)
        if got is None:
            got = plans[lead] = sorted(range(len(self.shards)), key=lambda j: j ^ lead)
        return got

    def _cursor_shard(self, cursor) -> tuple[bytes | None, int | None]:
        key = self.shards[0]._cursor_key(cursor)
        if key is None:
            return None, None
        return key, self._lead(np.frombuffer(key[: self.nb], np.uint8))

    # lexicographic ---------------------------------------------------------------------------
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
        """:meth:`IndexReader.search_lex` over all shards: the shards in the order of
        ``lead(q) XOR j``, each read only while the page is not full."""
        q = self._query(code)
        k, offset = int(k), int(offset)
        if k < 0 or offset < 0:
            raise ValueError("k and offset must be >= 0")
        shards = self.shards
        if conf is not None and conf_threshold is not None:
            if cursor is not None or labels is not None:
                raise ValueError("uncertainty-aware probing (conf=) takes no cursor or labels")
            need = k + offset
            parts = [
                r.search_lex(q.tobytes(), need, 0, conf, conf_threshold, probe_budget) for r in shards if r.count()
            ]
            flips = shards[0].wildcard_flips(conf, conf_threshold, probe_budget)
            res = _merge(q, parts, self.nbits, "lex", need, lambda c, i: uncertain_order(q, c, i, flips))
            return _skip(res, offset)
        ckey, cshard = self._cursor_shard(cursor)
        plan = self._plan(self._lead(q))
        if cshard is not None:
            plan = plan[plan.index(cshard) :]
        parts, off, rem = [], offset, k
        qb = q.tobytes()
        for j in plan:
            if rem == 0:
                break
            r = shards[j]
            n = r.count()
            if n == 0:
                continue
            ck = ckey.hex() if j == cshard and ckey is not None else None
            if ck is None and labels is None:  # whole shard: its count says what offset skips
                if n <= off:
                    off -= n
                    continue
                got = r.search_lex(qb, rem, off)
                off = 0
            else:
                got = r.search_lex(qb, off + rem, cursor=ck, labels=labels)
                taken = len(got)
                got = _skip(got, off)
                off = max(0, off - taken)
            parts.append(got)
            rem -= len(got)
        res = _concat(q, parts, self.nbits, "lex")
        if cursor is None and res.next_cursor is None:
            return res  # (one shard's page as it is: no cursor asked for, none to give)
        nxt = (
            _key_hex(res.codes.packed, res.ids, len(res) - 1)
            if cursor is not None and len(res) and len(res) >= k
            else None
        )
        return SearchResult(res.ids, res.codes, res.distances, res.prefix_lengths, "lex", nxt)

    search_lex_batch = LexModes.search_lex_batch  # one query at a time through search_lex

    # prefix ----------------------------------------------------------------------------------
    def search_prefix(self, bits, limit: int = 100, cursor: str | bytes | None = None, labels=None) -> PrefixPage:
        """:meth:`IndexReader.search_prefix` over the shards whose leading bits match the
        prefix, in ascending shard (= key) order."""
        shards = self.shards
        pb, p = shards[0]._prefix_arg(bits)
        limit = int(limit)
        if limit < 0:
            raise ValueError("limit must be >= 0")
        sb = self.shard_bits
        c = min(p, sb)
        lead = self._lead(np.frombuffer(pb.ljust(self.nb, b"\0"), np.uint8)) >> (sb - c)
        plan = [j for j in range(len(shards)) if j >> (sb - c) == lead]
        prefix = Codes(np.frombuffer(pb, np.uint8)[None, :], p).to_bits()[0] if p else ""
        ckey, cshard = self._cursor_shard(cursor)
        if cshard is not None:
            if cshard not in plan:
                raise ValueError("cursor does not belong to this prefix")
            plan = plan[plan.index(cshard) :]
        ids, codes, rem, nxt = [], [], limit, None
        for j in plan:
            r = shards[j]
            if r.count() == 0:
                continue
            page = r.search_prefix(prefix, rem + 1, ckey.hex() if j == cshard and ckey is not None else None, labels)
            if len(page) > rem:  # the page is full; its next item is where the next one starts
                nxt = _key_hex(page.codes.packed, page.ids, rem)
                ids.append(page.ids[:rem])
                codes.append(page.codes.packed[:rem])
                break
            ids.append(page.ids)
            codes.append(page.codes.packed)
            rem -= len(page)
        if not ids:
            return PrefixPage(np.zeros(0, np.int64), Codes.empty(self.nbits), None)
        return PrefixPage(np.concatenate(ids), Codes(np.concatenate(codes), self.nbits), nxt)

    def search_prefix_batch(self, prefixes, limit: int = 100, labels=None) -> list[PrefixPage]:
        return [self.search_prefix(p, limit, labels=labels) for p in prefixes]

    # Hamming / hybrid ------------------------------------------------------------------------
    def search_hamming(
        self, code, k: int | None = None, radius: int | None = None, method: str = "auto", labels=None
    ) -> SearchResult:
        """:meth:`IndexReader.search_hamming` over the shards, visited by their distance
        bound popcount(lead(q) XOR j); stops when the bound exceeds the k-th distance found."""
        q = self._query(code)
        shards = self.shards
        k = shards[0]._check_hamming_args(k, radius, method)
        if k == 0:
            return empty_result(q, self.nbits, "hamming")
        lead = self._lead(q)
        bound = {j: (j ^ lead).bit_count() for j in range(len(shards))}
        parts, best = [], None
        for j in sorted(bound, key=lambda j: (bound[j], j)):
            if radius is not None and bound[j] > radius:
                continue
            if k is not None and best is not None and len(best) >= k and bound[j] > best.distances[k - 1]:
                break
            if shards[j].count() == 0:
                continue
            parts.append(shards[j].search_hamming(q.tobytes(), k, radius, method, labels))
            if k is not None:
                best = _merge(q, parts, self.nbits, "hamming", k)
                parts = [best]
        return best if best is not None else _merge(q, parts, self.nbits, "hamming", k)

    def search_hamming_batch(
        self, codes, k: int | None = None, radius: int | None = None, method: str = "auto", labels=None
    ) -> list[SearchResult]:
        """Every shard answers the whole batch (one FAISS call per shard where FAISS is used);
        the per-query results are merged."""
        Q = self._queries(codes)
        shards = self.shards
        k = shards[0]._check_hamming_args(k, radius, method)
        QC = Codes(Q, self.nbits)
        per = [r.search_hamming_batch(QC, k, radius, method, labels) for r in shards if r.count()]
        return [_merge(Q[i], [p[i] for p in per], self.nbits, "hamming", k) for i in range(len(Q))]

    def search_hybrid(self, code, k: int = 10, class_bits: int | None = None, labels=None) -> SearchResult:
        """:meth:`IndexReader.search_hybrid` over the shards whose leading bits match the
        query's first ``class_bits`` bits (one shard when class_bits >= log2 S)."""
        q = self._query(code)
        cb = self.layout.class_bits if class_bits is None else int(class_bits)
        if not 0 <= cb <= self.nbits:
            raise ValueError(f"class_bits must be in 0..{self.nbits}")
        if cb == 0:
            return self.search_hamming(q.tobytes(), k=k, labels=labels)
        sb = self.shard_bits
        c = min(cb, sb)
        lead = self._lead(q) >> (sb - c)
        parts = [
            r.search_hybrid(q.tobytes(), k, cb, labels)
            for j, r in enumerate(self.shards)
            if j >> (sb - c) == lead and r.count()
        ]
        return _merge(q, parts, self.nbits, "hamming", max(0, int(k)))

    def search_hybrid_batch(self, codes, k: int = 10, class_bits: int | None = None, labels=None) -> list[SearchResult]:
        Q = self._queries(codes)
        return [self.search_hybrid(Q[i].tobytes(), k, class_bits, labels) for i in range(len(Q))]

    # items, labels, statistics ----------------------------------------------------------------
    def get(self, id: int):
        """The stored item ``id`` or None (ids are unique across shards)."""
        for r in self.shards:
            it = r.get(id)
            if it is not None:
                return it
        return None

    def get_many(self, ids) -> list:
        return [self.get(int(i)) for i in np.asarray(ids).reshape(-1)]

    def ids_with_labels(self, labels) -> np.ndarray:
        parts = [r.ids_with_labels(labels) for r in self.shards]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def stats(self, coverage: bool = True) -> dict:
        """The statistics of :meth:`IndexReader.stats` for the whole collection (sizes summed,
        coverage over all codes) plus ``shards``: count and disk bytes of each shard."""
        shards = self.shards
        per = [r.stats(coverage=False) for r in shards]
        n = sum(s["count"] for s in per)
        st = {
            "format_version": self.manifest.get("format_version"),
            "count": n,
            "n": n,
            "nbits": self.nbits,
            "generation": self.generation,
            "model_hash": self.model_hash,
            "layout": self.layout.to_dict(),
            "build": self.manifest.get("build", {}),
            "shard_bits": self.shard_bits,
            "shards": [{"prefix": j, "count": s["count"], "disk_bytes": s["disk_bytes"]} for j, s in enumerate(per)],
        }
        for f in ("lmdb_bytes", "derived_bytes"):
            st[f] = sum(s[f] for s in per)
        st["disk_bytes"] = dir_bytes(self.path)
        st["disk_bytes_per_item"] = st["disk_bytes"] / n if n else None
        if coverage:
            packed = [r.derived().materialize()[0] for r in shards if r.count()]
            st["coverage"] = packed_coverage(np.concatenate(packed), self.nbits) if packed else None
        return st

    # writes: refused ---------------------------------------------------------------------------
    def _refuse(self, *a, **kw):
        raise PermissionError(f"{self.path} {READ_ONLY}")

    add = upsert = delete = update_meta = _refuse


def compact_sharded(path) -> dict:
    """:func:`compact_index` of every shard; the sizes are summed."""
    from cbir.indexer.build import compact_index

    path = Path(path).absolute()
    man = read_manifest(path)
    outs = [compact_index(path / e["path"]) for e in man["shards"]]
    return {
        "before": sum(o["before"] for o in outs),
        "after": sum(o["after"] for o in outs),
        "generation": sum(o["generation"] for o in outs),
        "shards": len(outs),
    }
