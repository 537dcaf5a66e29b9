"""Hamming and hybrid search modes of :class:`~cbir.indexer.reader.IndexReader`, and the one
place where the MIH-vs-FAISS choice is made (:class:`AutoPolicy`, :class:`MethodChooser`).

Every search runs on a :class:`~cbir.indexer.derived.View` (base arrays + replayed writes).
What a query may return is a :class:`Filter`: live base rows (deletes are skipped *inside*
the MIH candidate loop and by a FAISS ``IDSelector``, never by asking for more candidates),
optionally a position range (hybrid: the class-prefix bucket, a contiguous run of the sorted
base) and a label filter (sorted allowed ids). Rows added since the base are scanned directly.
All paths return exactly :func:`cbir.codes.rank`'s order (distance, then ``q XOR c``, then id).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import numpy as np

from cbir.codes import Codes
from cbir.indexer import hybrid
from cbir.indexer.derived import View
from cbir.indexer.lexmodes import FILTER_BRUTE_MAX, _isin_sorted, _prefix_mask
from cbir.indexer.mih import MIH
from cbir.indexer.readerbase import ReaderAttrs
from cbir.indexer.results import (
    SearchResult,
    empty_result,
    hamming_result_u64,
    hamming_to,
    make_result,
    order_candidates,
)

METHODS = ("auto", "mih", "faiss", "brute")
#: hybrid buckets of at most this many rows are scanned (cheaper than any index)
SLICE_SCAN_MAX = 4096
#: class prefixes of at most this many bits: the bounds of every bucket are found once per base
CLASS_BOUNDS_MAX_BITS = 12


@dataclass(frozen=True)
class AutoPolicy:
    """How ``method="auto"`` chooses between MIH and a FAISS flat scan.

    MIH is given a cost budget equal to the estimated cost of the flat scan
    (``flat_ns_per_item`` x N nanoseconds, see MIH's cost model); a query whose MIH search
    would exceed it is answered by FAISS instead. When MIH keeps running over budget on an
    index (an exponential average of the over-budget rate, weight ``smoothing``, at or above
    ``give_up_rate``: e.g. uniform codes, where exact k-NN needs a large radius), queries go
    straight to FAISS and MIH is retried on every ``retry_every``-th query."""

    flat_ns_per_item: float = 1.5
    #: cost of a numpy scan of a slice (hybrid's fallback), ns per item
    slice_ns_per_item: float = 6.0
    give_up_rate: float = 0.5
    smoothing: float = 0.2
    retry_every: int = 16


class MethodChooser:
    """The state of the ``auto`` choice of one reader (thread-safe): ``over_budget_rate``
    and ``queries``, updated by :meth:`record` after every MIH attempt."""

    def __init__(self, policy: AutoPolicy | None = None) -> None:
        self.policy = policy or AutoPolicy()
        self.over_budget_rate = 0.0
        self.queries = 0
        self._lock = threading.Lock()

    def flat_budget(self, n: int) -> int:
        return max(2 * MIH.STEP_COST, int(n * self.policy.flat_ns_per_item))

    def slice_budget(self, n: int) -> int:
        return max(2 * MIH.STEP_COST, int(n * self.policy.slice_ns_per_item))

    def try_mih(self) -> bool:
        with self._lock:
            self.queries += 1
            p = self.policy
            return self.over_budget_rate < p.give_up_rate or self.queries % p.retry_every == 0

    def record(self, over_budget: bool) -> None:
        with self._lock:
            s = self.policy.smoothing
            self.over_budget_rate = (1 - s) * self.over_budget_rate + s * float(over_budget)


class Filter:
    """What one search may return from view ``v``: live rows, optionally base positions in
    ``[lo, hi)`` and ids in the sorted array ``allowed``."""

    def __init__(
        self, v: View, lo: int | None = None, hi: int | None = None, allowed: np.ndarray | None = None
    ) -> None:
        self.v = v
        self.lo = 0 if lo is None else lo
        self.hi = v.base.n if hi is None else hi
        self.ranged = lo is not None
        self.allowed = allowed
        self._sel = None

    def keep(self):
        """``keep(positions) -> mask`` for the MIH loop, or None when everything is kept."""
        alive = self.v.alive_mask()
        allowed, ids = self.allowed, self.v.base.ids
        lo, hi, ranged = self.lo, self.hi, self.ranged
        if alive is None and allowed is None and not ranged:
            return None

        def keep(pos):
            m = np.ones(len(pos), dtype=bool) if alive is None else alive[pos]
            if ranged:
                m &= (pos >= lo) & (pos < hi)
            if allowed is not None:
                m &= _isin_sorted(np.asarray(ids[pos]), allowed)
            return m

        return keep

    def selector(self):
        """FAISS selector of the kept base rows (None: all rows)."""
        if self.allowed is None:
            return self.v.selector()
        if self._sel is None:
            from cbir.indexer.faissidx import Selector

            m = _isin_sorted(np.asarray(self.v.base.ids), self.allowed)
            alive = self.v.alive_mask()
            self._sel = Selector(m if alive is None else m & alive)
        return self._sel

    def slice_mask(self) -> np.ndarray | None:
        """Kept rows of base positions [lo, hi) (None: all)."""
        alive, allowed = self.v.alive_mask(), self.allowed
        if alive is None and allowed is None:
            return None
        m = np.ones(self.hi - self.lo, dtype=bool) if alive is None else alive[self.lo : self.hi].copy()
        if allowed is not None:
            m &= _isin_sorted(np.asarray(self.v.base.ids[self.lo : self.hi]), allowed)
        return m

    def added(self, q: np.ndarray, prefix_bits: int) -> np.ndarray:
        """Mask of the view's added rows that may be returned."""
        v = self.v
        m = _prefix_mask(v.add_codes, q, prefix_bits) if prefix_bits else np.ones(len(v.add_ids), bool)
        if self.allowed is not None:
            m &= _isin_sorted(v.add_ids, self.allowed)
        return m


def _cut_k(pos: np.ndarray, dist: np.ndarray, k: int | None):
    """Candidates within the k-th smallest distance (ties included)."""
    if k is None or len(pos) <= k:
        return pos, dist
    dk = np.partition(dist, k - 1)[k - 1]
    m = dist <= dk
    return pos[m], dist[m]


def _brute(q, codes: np.ndarray, mask, k, radius, head64: np.ndarray | None = None):
    """(rows, distances) of the candidates among ``codes`` (rows where ``mask``) that can be in
    the top-k within ``radius`` (all ties at the k-th distance included). ``head64``: the same
    rows as big-endian uint64 (codes of <= 64 bits: one XOR and popcount per row)."""
    if head64 is not None:
        q64 = np.uint64(int.from_bytes(q.tobytes().ljust(8, b"\0"), "big"))
        dist = np.bitwise_count(np.asarray(head64) ^ q64)
    else:
        dist = hamming_to(q, np.asarray(codes))
    if mask is None and radius is None:
        rows = np.arange(len(dist))
    else:
        sel = np.ones(len(dist), bool) if mask is None else mask.copy()
        if radius is not None:
            sel &= dist <= radius
        rows = np.flatnonzero(sel)
        dist = dist[rows]
    rows, dist = _cut_k(rows, dist, k)
    return rows, dist.astype(np.int32, copy=False)


class HammingModes(ReaderAttrs):
    """Mixin: needs ``nbits``, ``nb``, ``layout``, ``derived()``, ``_query``, ``_queries``,
    ``_codes_of``, ``ids_with_labels``."""

    def __init__(self) -> None:
        self.chooser = MethodChooser()  # Hamming searches
        self.hybrid_chooser = MethodChooser()  # hybrid (bucket-restricted) searches: their own record

    # one base search -------------------------------------------------------------------------
    def _base_hits(self, q, k, radius, method: str, flt: Filter):
        """(positions, distances) of base candidates for one query (see :func:`_brute`)."""
        d = flt.v.base
        lo, hi = flt.lo, flt.hi
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int32))
        if hi <= lo or (k is not None and k <= 0):
            return empty
        h64 = d.head64[lo:hi] if self.nb <= 8 else None
        if method == "brute" or (flt.ranged and (method == "faiss" or hi - lo <= SLICE_SCAN_MAX)):
            rows, dist = _brute(q, d.codes[lo:hi], flt.slice_mask(), k, radius, h64)
            return rows + lo, dist
        if method in ("mih", "auto"):
            budget = None
            chooser = self.hybrid_chooser if flt.ranged else self.chooser
            if method == "auto":
                if not chooser.try_mih():
                    budget = -1
                else:
                    budget = chooser.slice_budget(hi - lo) if flt.ranged else chooser.flat_budget(d.n)
            res = None
            if budget != -1:
                keep = flt.keep()
                res = d.mih.range(q, radius, budget, keep) if radius is not None else d.mih.knn(q, k, budget, keep)
                if method == "auto":
                    chooser.record(res is None)
            if res is not None:
                return _cut_k(res[0], res[1], k) if radius is not None else res
            if flt.ranged:  # hybrid over budget: scan the bucket
                rows, dist = _brute(q, d.codes[lo:hi], flt.slice_mask(), k, radius, h64)
                return rows + lo, dist
        sel = flt.selector()
        if radius is not None:
            pos, dist = d.faiss.range(q, radius, sel)
            return _cut_k(pos, dist, k)
        return d.faiss.knn(q, k, sel)

    def _finish(self, q, flt: Filter, pos, dist, k, radius, prefix_bits: int = 0) -> SearchResult:
        """Merge base candidates with the added rows and sort in the exact Hamming order."""
        v = flt.v
        b = v.base
        codes, ids = b.codes[pos], b.ids[pos]
        if self.nb <= 8 and not len(v.add_ids):  # one uint64 per code: no byte-wise work
            q64 = np.uint64(int.from_bytes(q.tobytes().ljust(8, b"\0"), "big"))
            return hamming_result_u64(codes, ids, b.head64[pos] ^ q64, dist, self.nbits, k)
        if len(v.add_ids):  # rows written since the base generation: scanned directly
            m = flt.added(q, prefix_bits)
            ad = hamming_to(q, v.add_codes[m])
            sel = np.ones(len(ad), bool) if radius is None else ad <= radius
            codes = np.concatenate([codes, v.add_codes[m][sel]])
            ids = np.concatenate([ids, v.add_ids[m][sel]])
            dist = np.concatenate([dist, ad[sel]])
        perm = order_candidates(q, codes, ids, "hamming", dist)
        if k is not None:
            perm = perm[: int(k)]
        return make_result(q, codes[perm], ids[perm], self.nbits, "hamming", dist[perm])

    def _selected(self, q, allowed, k, radius, prefix_bits: int = 0) -> SearchResult:
        """Exact search over the (few) ids a label filter selects."""
        ids, codes = self._codes_of(allowed)
        m = _prefix_mask(codes, q, prefix_bits)
        rows, dist = _brute(q, codes, m, k, radius)
        perm = order_candidates(q, codes[rows], ids[rows], "hamming", dist)
        if k is not None:
            perm = perm[:k]
        rows = rows[perm]
        return make_result(q, codes[rows], ids[rows], self.nbits, "hamming", dist[perm])

    def _allowed(self, labels):
        return None if labels is None else self.ids_with_labels(labels)

    # Hamming ---------------------------------------------------------------------------------
    def search_hamming(
        self, code, k: int | None = None, radius: int | None = None, method: str = "auto", labels=None
    ) -> SearchResult:
        """Exact Hamming k-NN (``k``), range (``radius``: all with distance <= radius), or both
        (the ``k`` nearest within ``radius``); ties in the lexicographic order, then id.
        ``method``: ``auto`` (see :class:`AutoPolicy`), ``mih``, ``faiss`` or ``brute``
        (numpy); all give identical results. ``labels``: only items carrying one of them."""
        q = self._query(code)
        k = self._check_hamming_args(k, radius, method)
        allowed = self._allowed(labels)
        v = self.derived()
        if v.n == 0 or k == 0 or (allowed is not None and len(allowed) == 0):
            return empty_result(q, self.nbits, "hamming")
        if allowed is not None and len(allowed) <= FILTER_BRUTE_MAX:
            return self._selected(q, allowed, k, radius)
        if (
            radius is None
            and allowed is None
            and method in ("auto", "mih")
            and self.nb <= 8
            and not len(v.add_ids)
            and hybrid.applies(v.base.mih)
        ):
            got = self._topk_fast(q, k, 0, v, v.base.n, self.chooser, method == "auto")
            if got is not None:
                return got
            if method == "auto" and hybrid.ready(v.base.mih, v.base.ids, self.nbits, v.alive_mask()):
                method = "faiss"  # (over MIH's budget: the compiled loop said so)
        flt = Filter(v, allowed=allowed)
        pos, dist = self._base_hits(q, k, radius, method, flt)
        return self._finish(q, flt, pos, dist, k, radius)

    @staticmethod
    def _check_hamming_args(k, radius, method):
        if k is None and radius is None:
            raise ValueError("search_hamming needs k, radius or both")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        return None if k is None else max(0, int(k))

    def search_hamming_batch(
        self, codes, k: int | None = None, radius: int | None = None, method: str = "auto", labels=None
    ) -> list[SearchResult]:
        """:meth:`search_hamming` for every query row; the queries FAISS answers (all of them
        for ``method="faiss"``, those over MIH's budget for ``auto``) are one FAISS call on all
        cores."""
        Q = self._queries(codes)
        k = self._check_hamming_args(k, radius, method)
        allowed = self._allowed(labels)
        v = self.derived()
        if (
            len(Q) < 2
            or method in ("mih", "brute")
            or v.n == 0
            or k == 0
            or (allowed is not None and len(allowed) <= FILTER_BRUTE_MAX)
        ):
            return [self.search_hamming(Q[i].tobytes(), k, radius, method, labels) for i in range(len(Q))]
        flt = Filter(v, allowed=allowed)
        hits: list = [None] * len(Q)
        if method == "auto":
            for i in range(len(Q)):
                if self.chooser.try_mih():
                    keep = flt.keep()
                    budget = self.chooser.flat_budget(v.base.n)
                    res = (
                        v.base.mih.range(Q[i], radius, budget, keep)
                        if radius is not None
                        else v.base.mih.knn(Q[i], k, budget, keep)
                    )
                    self.chooser.record(res is None)
                    hits[i] = res
        rest = [i for i in range(len(Q)) if hits[i] is None]
        if rest and v.base.n:
            f = v.base.faiss
            sel = flt.selector()
            got = f.range_batch(Q[rest], radius, sel) if radius is not None else f.knn_batch(Q[rest], k, sel)
            for i, h in zip(rest, got):
                hits[i] = h
        out = []
        for i in range(len(Q)):
            pos, dist = hits[i] if hits[i] is not None else (np.zeros(0, np.int64), np.zeros(0, np.int32))
            if radius is not None:
                pos, dist = _cut_k(pos, dist, k)
            out.append(self._finish(Q[i], flt, pos, dist, k, radius))
        return out

    # hybrid ------------------------------------------------------------------------------------
    def search_hybrid(self, code, k: int = 10, class_bits: int | None = None, labels=None) -> SearchResult:
        """Items whose first ``class_bits`` bits (default: the layout's class bits) equal the
        query's, ranked by Hamming distance on the remaining bits, ties in lexicographic order
        then id. Only same-prefix items are returned (fewer than ``k`` if the bucket is small).
        With no class bits this is :meth:`search_hamming`. Sub-linear: the bucket is a
        contiguous run of the sorted base, searched through the MIH tables restricted to it
        (codes of <= 64 bits: :func:`cbir.indexer.hybrid.bucket_topk`; a scan of the bucket only
        when MIH would cost more)."""
        q = self._query(code)
        cb = self.layout.class_bits if class_bits is None else int(class_bits)
        if not 0 <= cb <= self.nbits:
            raise ValueError(f"class_bits must be in 0..{self.nbits}")
        if cb == 0:
            return self.search_hamming(q.tobytes(), k=k, labels=labels)
        k = int(k)
        allowed = self._allowed(labels)
        v = self.derived()
        if k <= 0 or v.n == 0 or (allowed is not None and len(allowed) == 0):
            return empty_result(q, self.nbits, "hamming")
        if allowed is not None and len(allowed) <= FILTER_BRUTE_MAX:
            return self._selected(q, allowed, k, None, cb)
        lo, hi = self._prefix_range(v.base, q, cb)
        flt = Filter(v, lo, hi, allowed)
        if (
            self.nb <= 8
            and allowed is None
            and not len(v.add_ids)
            and hi - lo > SLICE_SCAN_MAX
            and hybrid.applies(v.base.mih)
        ):
            got = self._topk_fast(q, k, cb, v, hi - lo, self.hybrid_chooser, wait=True)
            if got is not None:
                return got
            pos, dist = self._base_hits(q, k, None, "brute", flt)  # over budget: scan the bucket
            return self._finish(q, flt, pos, dist, k, None, cb)
        pos, dist = self._base_hits(q, k, None, "auto", flt)
        return self._finish(q, flt, pos, dist, k, None, cb)

    def _topk_fast(
        self, q, k: int, cb: int, v: View, bucket_n: int, chooser, budgeted: bool = True, wait: bool = False
    ):
        """Top-k of the class bucket of width ``cb`` (``cb = 0``: the whole base) through the
        compiled :func:`cbir.indexer.hybrid.bucket_topk` (<= 64-bit codes, no label filter, no
        rows added since the base, :func:`cbir.indexer.hybrid.applies`). None when its kernels
        are still loading (:func:`cbir.indexer.hybrid.ready`; ``wait``: wait for them), when MIH
        is over its budget (``budgeted``: the chooser's flat budget for ``cb = 0``, its slice
        budget for a bucket) or the chooser says it keeps being."""
        b = v.base
        mih = b.mih
        alive = v.alive_mask()
        if not hybrid.ready(mih, b.ids, self.nbits, alive, wait):
            return None
        budget = None
        if budgeted:
            if not chooser.try_mih():
                return None
            budget = chooser.flat_budget(b.n) if cb == 0 else chooser.slice_budget(bucket_n)
        q64 = int.from_bytes(q.tobytes(), "big") << (8 * (8 - self.nb))
        got = hybrid.bucket_topk(mih, q64, k, cb, bucket_n, b.ids, self.nbits, alive, budget)
        if budgeted:
            chooser.record(got is None)
        if got is None:
            return None
        ids, c_be, dist, cpl = got
        if sys.byteorder != "little":  # (the kernel byte-swaps: the bytes of a little-endian uint64)
            c_be = c_be.byteswap()
        packed = c_be.view(np.uint8).reshape(len(ids), 8)
        if self.nb < 8:
            packed = np.ascontiguousarray(packed[:, : self.nb])
        return SearchResult(ids, Codes._trusted(packed, self.nbits), dist, cpl, "hamming")

    def _prefix_range(self, d, q: np.ndarray, p: int) -> tuple[int, int]:
        """Positions [lo, hi) of the sorted codes starting with the first ``p`` bits of q:
        binary searches on ``head64`` (and on the bytes beyond for p > 64), O(log N); class
        prefixes of <= :data:`CLASS_BOUNDS_MAX_BITS` bits read the bounds of every bucket,
        found once per base."""
        h = int.from_bytes(q[:8].tobytes().ljust(8, b"\0"), "big")
        if 1 <= p <= CLASS_BOUNDS_MAX_BITS:  # the bounds of all 2^p buckets, found once per base
            cache = d.__dict__.setdefault("_class_bounds", {})
            bounds = cache.get(p)
            if bounds is None:
                starts = np.arange(1 << p, dtype=np.uint64) << np.uint64(64 - p)
                bounds = cache[p] = np.searchsorted(d.head64, starts).tolist() + [d.n]
            c = h >> (64 - p)
            return bounds[c], bounds[c + 1]
        p8 = min(p, 64)
        lo_v = (h >> (64 - p8)) << (64 - p8)
        hi_v = lo_v + (1 << (64 - p8)) - 1
        lo = int(np.searchsorted(d.head64, np.uint64(lo_v), side="left"))
        hi = int(np.searchsorted(d.head64, np.uint64(hi_v), side="right"))
        if p <= 64 or hi <= lo:
            return lo, hi
        nfull = (p + 7) // 8
        mask = np.full(nfull - 8, 0xFF, dtype=np.uint8)
        if p % 8:
            mask[-1] = (0xFF << (8 - p % 8)) & 0xFF
        target = (q[8:nfull] & mask).tobytes()

        def bound(a: int, z: int, right: bool) -> int:
            while a < z:
                mid = (a + z) // 2
                val = (np.asarray(d.codes[mid, 8:nfull]) & mask).tobytes()
                if val < target or (right and val == target):
                    a = mid + 1
                else:
                    z = mid
            return a

        return bound(lo, hi, False), bound(lo, hi, True)

    def search_hybrid_batch(self, codes, k: int = 10, class_bits: int | None = None, labels=None) -> list[SearchResult]:
        Q = self._queries(codes)
        return [self.search_hybrid(Q[i].tobytes(), k, class_bits, labels) for i in range(len(Q))]
