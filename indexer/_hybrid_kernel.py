"""The compiled loops of :mod:`cbir.indexer.hybrid` (numba; imported on first use). Read
:mod:`cbir.indexer.hybrid` for the algorithm; this module only holds the kernels."""

from __future__ import annotations

import numpy as np
from numba import njit

#: estimated cost of the probe loop (ns on one core): per probe (two random reads of the CSR
#: offsets) and per candidate (a sequential read, the first-discovery test)
PROBE_NS = 8
CANDIDATE_NS = 3


@njit(inline="always")
def _popcount(v):
    # SWAR popcount (LLVM turns this idiom into one popcnt instruction)
    v = v - ((v >> np.uint64(1)) & np.uint64(0x5555555555555555))
    v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (v * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(inline="always")
def _bit_length(v):
    n = 0
    s = 32
    while s:  # binary search for the highest set bit
        if v >> np.uint64(s):
            v >>= np.uint64(s)
            n += s
        s >>= 1
    return n + (1 if v else 0)


@njit(inline="always")
def _bswap(v):
    out = np.uint64(0)
    for _ in range(8):
        out = (out << np.uint64(8)) | (v & np.uint64(0xFF))
        v >>= np.uint64(8)
    return out


@njit(cache=True, nogil=True)
def bucket_knn_kernel(offs, perm, codes_all, fm, plan, sub, q, top, k, alive, use_alive, limit, kp, kx, kd):
    """(count, 0): the kept rows within the k-th distance are the first ``count`` entries of
    ``kp`` (positions), ``kx`` (x) and ``kd`` (distances), preallocated by the caller (the
    loop writes into them and never reallocates: a kernel that grew its own arrays ran 3x
    slower); (-1, 0) when the charged cost passed ``limit`` (>= 0); (-2, n) when the buffers
    hold fewer than the n entries needed (the caller grows them and calls again). ``plan``
    rows: group start in ``fm`` (G + 1 entries), table, radius, CSR base, distance bound after
    the group; ``sub`` rows: shift and mask of each table's substring."""
    m = sub.shape[1]
    ng = plan.shape[1] - 1
    cap = kp.shape[0]
    qs = np.empty(m, np.uint64)
    for t in range(m):
        qs[t] = (q >> sub[0, t]) & sub[1, t]
    hist = np.zeros(66, np.int64)
    nk = 0
    cost = 0
    dk = 64
    done = False
    for g in range(ng):
        t = plan[1, g]
        r = plan[2, g]
        b = plan[3, g]
        qt = qs[t]
        g0 = plan[0, g]
        g1 = plan[0, g + 1]
        cost += PROBE_NS * (g1 - g0)
        for p in range(g0, g1):
            v = np.int64(qt ^ fm[p]) + b
            lo = offs[v]
            hi = offs[v + 1]
            cost += CANDIDATE_NS * (hi - lo)
            if limit >= 0 and cost > limit:
                return -1, 0
            if nk + (hi - lo) > cap:  # (every candidate of this range might be kept)
                return -2, nk + (hi - lo)
            for j in range(lo, hi):
                x = codes_all[j] ^ q
                if x > top:
                    continue
                ok = True
                for tt in range(m):  # first discovery: > r before table t, >= r after it
                    if tt != t:
                        dt = _popcount((x >> sub[0, tt]) & sub[1, tt])
                        if dt < r + (1 if tt < t else 0):
                            ok = False
                            break
                if not ok:
                    continue
                if use_alive and not alive[perm[j]]:
                    continue
                dd = _popcount(x)
                kp[nk] = j
                kx[nk] = x
                kd[nk] = np.uint8(dd)
                nk += 1
                hist[dd] += 1
        c = 0
        for dist in range(plan[4, g] + 1):  # every row within the bound has been seen
            c += hist[dist]
            if c >= k:
                dk = dist
                done = True
                break
        if done:
            break
    if not done:  # every group probed: every kept row is a candidate; the k-th distance
        c = 0
        for dist in range(65):
            c += hist[dist]
            if c >= k:
                dk = dist
                break
    n = 0
    for i in range(nk):  # in place (n <= i): the rows within dk, CSR index -> position
        if kd[i] <= dk:
            kp[n] = perm[kp[i]]
            kx[n] = kx[i]
            kd[n] = kd[i]
            n += 1
    return n, 0


@njit(cache=True, nogil=True)
def rank_kernel(pos, x, d, n, k, ids, q, nbits):
    """The first ``k`` of ``n`` candidates in the Hamming order (distance, then ``x`` = the
    lexicographic order, then position = id order): (ids, codes as byte-swapped uint64 = the
    big-endian bytes, distances int32, common-prefix lengths int32)."""
    k = min(k, n)
    # counting sort by distance (stable), then each distance's run by (x, position): equal x
    # are copies of one code, whose positions are in id order
    cnt = np.zeros(66, np.int64)
    for i in range(n):
        cnt[d[i] + 1] += 1
    for i in range(1, 66):
        cnt[i] += cnt[i - 1]
    o = np.empty(n, np.int64)
    fill = cnt.copy()
    for i in range(n):
        o[fill[d[i]]] = i
        fill[d[i]] += 1
    for dist in range(65):
        a, z = cnt[dist], cnt[dist + 1]
        if a >= k:
            break
        if z - a > 16:  # a long run: by position, then stably by x
            run = o[a:z]
            run = run[np.argsort(pos[run])]
            o[a:z] = run[np.argsort(x[run], kind="mergesort")]
            continue
        for i in range(a + 1, z):  # a short run: insertion sort by (x, position)
            j = o[i]
            xj, pj = x[j], pos[j]
            h = i - 1
            while h >= a and (x[o[h]] > xj or (x[o[h]] == xj and pos[o[h]] > pj)):
                o[h + 1] = o[h]
                h -= 1
            o[h + 1] = j
    out_id = np.empty(k, np.int64)
    out_c = np.empty(k, np.uint64)
    out_d = np.empty(k, np.int32)
    out_l = np.empty(k, np.int32)
    for i in range(k):
        j = o[i]
        out_id[i] = ids[pos[j]]
        out_c[i] = _bswap(x[j] ^ q)
        out_d[i] = d[j]
        out_l[i] = min(nbits, 64 - _bit_length(x[j]))
    return out_id, out_c, out_d, out_l
