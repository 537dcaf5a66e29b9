"""The fast path of hybrid search (codes of <= 64 bits): exact Hamming k-NN inside one class
bucket through the combined MIH tables, in as few numpy calls as possible.

The bucket (the items whose first ``cb`` bits equal the query's) is exactly the set of rows
whose ``x = q XOR c`` (big-endian uint64) is below ``2^(64 - cb)``, so no position range is
needed: candidates are filtered on ``x``, which the combined tables give without a gather
(``mihc_codes``: the codes again in bucket order). Probes that flip a class bit inside the
leading substring can only find rows outside the bucket and are left out.

Per stage (substring radii ``r_lo..r_hi``, all tables at once, as :meth:`MIH.knn`): the probe
values, the ranges of the CSR, the candidates' ``x``; a candidate found by table ``t0`` at
radius ``r`` is kept iff that is its first discovery (substring distance ``> r`` in the tables
before ``t0``, ``>= r`` in those after it: the thresholds per probe and table are computed
once per stage plan). After radius ``r`` every row within ``m (r + 1) - 1`` has been seen, so
once ``k`` kept rows lie within that bound the answer is every kept row within the k-th
distance (ties complete). The cost model and budget are those of :meth:`MIH.knn`; ``None``
means "over budget" (the caller scans the bucket).
"""

from __future__ import annotations

import numpy as np

from cbir.indexer.mih import MIH, flip_masks

#: distance bins (0..64) and the marker of a candidate that is not kept
_NBINS = 66
_FAR = 65


#: radius-1 tables probed in the first stage with radius 0 (the rest one table per stage; all
#: of them, as :meth:`MIH.knn`, measured as fast as fewer at 10^7 clustered codes)
FIRST_R1 = 3


def _stages(mih: MIH) -> list[tuple[tuple[int, int], ...]]:
    """The probe order (radius, table), grouped into stages: radius 0 in every table and
    radius 1 in the first :data:`FIRST_R1` tables first (most answers are certain after it),
    then one (radius, table) at a time."""
    key = ("stages", FIRST_R1)
    got = mih.__dict__.setdefault("_bucket_plans", {}).get(key)
    if got is None:
        order = [(r, t) for r in range(max(mih.sizes) + 1) for t in range(mih.m) if r <= mih.sizes[t]]
        first = min(len(order), mih.m + FIRST_R1)
        got = mih.__dict__["_bucket_plans"][key] = [tuple(order[:first])] + [(rt,) for rt in order[first:]]
    return got


def _plan(mih: MIH, si: int, stage, cb: int):
    """Probes of one stage that can reach the bucket: (flip masks, table of each probe, its CSR
    offset, per-table first-discovery thresholds, estimated cost, distance bound after it)."""
    cache = mih.__dict__.setdefault("_bucket_plans", {})
    key = (si, cb, FIRST_R1)
    got = cache.get(key)
    if got is None:
        bases = np.asarray(mih._combined()[0], dtype=np.uint64)
        fm, tab, rad = [], [], []
        for r, t in stage:
            s, st = mih.sizes[t], mih.starts[t]
            f = flip_masks(s, r)
            forb = 0  # code bits j < cb of this substring: flipping one leaves the bucket
            for j in range(st, min(st + s, cb)):
                forb |= 1 << (st + s - 1 - j)
            if forb:
                f = f[(f & np.uint64(forb)) == 0]
            fm.append(f)
            tab.append(np.full(len(f), t, dtype=np.int64))
            rad.append(np.full(len(f), r, dtype=np.uint8))
        fm_a, tab_a, rad_a = np.concatenate(fm), np.concatenate(tab), np.concatenate(rad)
        thr = np.stack([(rad_a + (tab_a > t)).astype(np.uint8) for t in range(mih.m)])  # (m, probes)
        cost = MIH.STEP_COST + MIH.PROBE_COST * len(fm_a)
        r, t = stage[-1]  # unseen rows: distance > r in tables <= t, >= r in the others
        bound = min(mih.m * r + t, 64)
        got = cache[key] = (fm_a, tab_a, bases[tab_a], thr, cost, bound)
    return got


def _masks(mih: MIH) -> np.ndarray:
    """(m, 1) uint64: the bits of each substring in the left-aligned uint64 codes."""
    got = mih.__dict__.get("_bucket_masks")
    if got is None:
        got = np.array([((1 << s) - 1) << (64 - st - s) for s, st in zip(mih.sizes, mih.starts)], np.uint64)
        got = mih.__dict__["_bucket_masks"] = got[:, None]
    return got


def bucket_knn(
    mih: MIH, q64: int, k: int, cb: int, bucket_n: int, alive: np.ndarray | None = None, budget: int | None = None
):
    """(positions, x, distances) of every live row of the class bucket of ``q64`` (the query's
    first 8 bytes as a big-endian int) within the k-th smallest distance, ties included; at
    most ``bucket_n`` rows are in the bucket. None when the estimated cost exceeds ``budget``
    or a stage would cost more than scanning the bucket."""
    comb = mih._combined()
    assert comb is not None and comb[3] is not None and 1 <= cb <= 64
    _bases, offs, perm, codes_all = comb
    m = mih.m
    k = min(k, bucket_n)
    if k <= 0:
        return _within([], [], [], perm, 0)
    qn = np.uint64(q64)
    qs = np.array([(q64 >> (64 - st - s)) & ((1 << s) - 1) for s, st in zip(mih.sizes, mih.starts)], np.uint64)
    top = np.uint64(1 << (64 - cb)) if cb < 64 else np.uint64(1)  # x < top: the same class bits
    masks = _masks(mih)
    scan = MIH.STEP_COST + MIH.CANDIDATE_COST * bucket_n
    hist = np.zeros(_NBINS, np.int64)
    IDX, X, D = [], [], []  # per stage: CSR index, x, distance (_FAR: not kept) of the candidates
    cost = 0
    for si, stage in enumerate(_stages(mih)):
        fm, tab, base_rep, thr, step, guaranteed = _plan(mih, si, stage, cb)
        cost += step
        if step > scan or (budget is not None and cost > budget):
            return None
        vals = ((fm ^ qs[tab]) + base_rep).astype(np.intp)
        lo = offs[vals]
        ln = offs[vals + 1] - lo
        hit = np.flatnonzero(ln)
        if len(hit):
            lo, ln = lo[hit].astype(np.intp), ln[hit]
            cs = np.cumsum(ln)
            tot = int(cs[-1])
            idx = np.repeat(lo - (cs - ln), ln) + np.arange(tot)
            x = codes_all[idx] ^ qn
            keep = x < top
            if m > 1:  # substring distances of every table at once: (m, candidates)
                keep &= (np.bitwise_count(masks & x) >= np.repeat(thr[:, hit], ln, axis=1)).all(axis=0)
            if alive is not None:
                keep &= alive[perm[idx]]
            d = np.where(keep, np.bitwise_count(x), np.uint8(_FAR))  # (no compaction: the few
            hist += np.bincount(d, minlength=_NBINS)  # rows within the k-th distance are taken last)
            IDX.append(idx)
            X.append(x)
            D.append(d)
            cost += MIH.CANDIDATE_COST * tot
            if budget is not None and cost > budget:
                return None
        cum = np.cumsum(hist)  # every row within ``guaranteed`` has been seen
        if cum[guaranteed] >= k:
            return _within(IDX, X, D, perm, int(np.searchsorted(cum, k)))
    return _within(IDX, X, D, perm, 64)


def _within(IDX, X, D, perm, dk: int):
    """(positions, x, distances) of the kept candidates within distance ``dk``."""
    if not IDX:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.uint8)
    idx, x, d = (IDX[0], X[0], D[0]) if len(IDX) == 1 else (np.concatenate(IDX), np.concatenate(X), np.concatenate(D))
    s = np.flatnonzero(d <= dk)
    return perm[idx[s]].astype(np.int64), x[s], d[s]
