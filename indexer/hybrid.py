"""The fast path of hybrid search (codes of <= 64 bits): exact Hamming k-NN inside one class
bucket through the combined MIH tables, in one compiled loop (numba, ``nogil``: search threads
run it in parallel).

The bucket (the items whose first ``cb`` bits equal the query's) is exactly the set of rows
whose ``x = q XOR c`` (big-endian uint64) is below ``2^(64 - cb)``, so no position range is
needed: candidates are filtered on ``x``, which the combined tables give without a gather
(``mihc_codes``: the codes again in bucket order). Probes that flip a class bit inside the
leading substring can only find rows outside the bucket and are left out.

The probes run in MIH order, one (radius ``r``, table ``t``) group at a time: every value at
substring distance ``r`` from the query's in table ``t``, the CSR range of each, the
candidates' ``x``. A candidate is kept iff this is its first discovery (substring distance
``> r`` in the tables before ``t``, ``>= r`` in those after it), it is in the bucket and alive.
After group (r, t) every row within ``m r + t`` has been seen (pigeonhole), so once ``k`` kept
rows lie within that bound the answer is every kept row within the k-th distance (ties
complete). The work is charged at :data:`PROBE_NS` per probe and :data:`CANDIDATE_NS` per
candidate; over ``budget`` (or over a scan of the bucket at ``scan_ns`` per row) the search
stops and returns ``None`` (the caller scans the bucket).

The kernel is compiled on first use and cached on disk (``numba`` ``cache=True``: in the
package's ``__pycache__``, or ``NUMBA_CACHE_DIR``); numba is imported only then.
"""

from __future__ import annotations

import numpy as np

from cbir.indexer.mih import MIH, flip_masks

#: estimated cost of the compiled loop (ns on one core): per probe (two random reads of the
#: CSR offsets) and per candidate (a sequential read, the first-discovery test)
PROBE_NS = 8
CANDIDATE_NS = 3

_KERNEL = None


def _kernel():
    """The compiled loop (numba imported and the kernel compiled, or loaded from its cache,
    on first use)."""
    global _KERNEL
    if _KERNEL is None:
        from cbir.indexer import _hybrid_kernel

        _KERNEL = _hybrid_kernel.bucket_knn_kernel
    return _KERNEL


def _plan(mih: MIH, cb: int):
    """The probe groups of a class width ``cb`` (computed once per MIH): flip masks of every
    (radius, table) in MIH order without those that flip a class bit, the group bounds, the
    table of each group, its radius, its CSR base and the distance bound after it."""
    cache = mih.__dict__.setdefault("_bucket_plans", {})
    got = cache.get(cb)
    if got is None:
        bases = [int(b) for b in mih._combined()[0]]
        fm, start, tab, rad, base, bound = [], [0], [], [], [], []
        for r in range(max(mih.sizes) + 1):
            for t in range(mih.m):
                s, st = mih.sizes[t], mih.starts[t]
                if r > s:
                    continue
                f = flip_masks(s, r)
                forb = 0  # code bits j < cb of this substring: flipping one leaves the bucket
                for j in range(st, min(st + s, cb)):
                    forb |= 1 << (st + s - 1 - j)
                if forb:
                    f = f[(f & np.uint64(forb)) == 0]
                fm.append(f)
                start.append(start[-1] + len(f))
                tab.append(t)
                rad.append(r)
                base.append(bases[t])
                bound.append(min(mih.m * r + t, 64))
        shifts = np.array([64 - st - s for s, st in zip(mih.sizes, mih.starts)], np.uint64)
        smask = np.array([(1 << s) - 1 for s in mih.sizes], np.uint64)
        got = cache[cb] = (
            np.concatenate(fm).astype(np.uint64),
            np.array(start, np.int64),
            np.array(tab, np.int64),
            np.array(rad, np.int64),
            np.array(base, np.int64),
            np.array(bound, np.int64),
            shifts,
            smask,
        )
    return got


def bucket_knn(
    mih: MIH, q64: int, k: int, cb: int, bucket_n: int, alive: np.ndarray | None = None, budget: int | None = None
):
    """(positions, x, distances) of every live row of the class bucket of ``q64`` (the query's
    first 8 bytes as a big-endian int) within the k-th smallest distance, ties included; at
    most ``bucket_n`` rows are in the bucket. None when the estimated cost exceeds ``budget``."""
    comb = mih._combined()
    assert comb is not None and comb[3] is not None and 1 <= cb <= 64
    _bases, offs, perm, codes_all = comb
    k = min(k, bucket_n)
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.uint8)
    fm, start, tab, rad, base, bound, shifts, smask = _plan(mih, cb)
    top = (1 << (64 - cb)) - 1 if cb < 64 else 0  # x <= top: the same class bits
    limit = -1 if budget is None else int(budget)
    use_alive = alive is not None
    al = alive if alive is not None else np.ones(1, np.bool_)
    n, pos, x, d = _kernel()(
        offs, perm, codes_all, fm, start, tab, rad, base, bound, shifts, smask,
        np.uint64(q64), np.uint64(top), int(k), al, use_alive, limit, PROBE_NS, CANDIDATE_NS,
    )  # fmt: skip
    if n < 0:
        return None
    return pos[:n], x[:n], d[:n]
