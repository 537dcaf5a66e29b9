"""The compiled loop of :func:`cbir.indexer.hybrid.bucket_knn` (numba; imported on first use).
Read :mod:`cbir.indexer.hybrid` for the algorithm; this module only holds the kernel."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always")
def _popcount(v):
    # SWAR popcount (LLVM turns this idiom into one popcnt instruction)
    v = v - ((v >> np.uint64(1)) & np.uint64(0x5555555555555555))
    v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (v * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(cache=True, nogil=True)
def bucket_knn_kernel(
    offs, perm, codes_all, fm, start, tab, rad, base, bound, shifts, smask,
    q, top, k, alive, use_alive, limit, probe_ns, candidate_ns,
):  # fmt: skip
    """(count, positions, x, distances) of the kept rows within the k-th distance, or count
    -1 when the charged cost passed ``limit`` (>= 0)."""
    m = len(shifts)
    qs = np.empty(m, np.uint64)
    for t in range(m):
        qs[t] = (q >> shifts[t]) & smask[t]
    hist = np.zeros(66, np.int64)
    cap = 1024
    kj = np.empty(cap, np.int64)  # kept candidates: CSR index, x, distance
    kx = np.empty(cap, np.uint64)
    kd = np.empty(cap, np.uint8)
    nk = 0
    cost = 0
    dk = 64
    done = False
    for g in range(len(tab)):
        t = tab[g]
        r = rad[g]
        b = base[g]
        qt = qs[t]
        g0 = start[g]
        g1 = start[g + 1]
        cost += probe_ns * (g1 - g0)
        for p in range(g0, g1):
            v = np.int64(qt ^ fm[p]) + b
            lo = offs[v]
            hi = offs[v + 1]
            cost += candidate_ns * (hi - lo)
            if limit >= 0 and cost > limit:
                return -1, kj, kx, kd
            for j in range(lo, hi):
                x = codes_all[j] ^ q
                if x > top:
                    continue
                ok = True
                for tt in range(m):  # first discovery: > r before table t, >= r after it
                    if tt != t:
                        dt = _popcount((x >> shifts[tt]) & smask[tt])
                        if dt < r + (1 if tt < t else 0):
                            ok = False
                            break
                if not ok:
                    continue
                if use_alive and not alive[perm[j]]:
                    continue
                if nk == cap:
                    cap *= 2
                    kj2 = np.empty(cap, np.int64)
                    kx2 = np.empty(cap, np.uint64)
                    kd2 = np.empty(cap, np.uint8)
                    kj2[:nk] = kj[:nk]
                    kx2[:nk] = kx[:nk]
                    kd2[:nk] = kd[:nk]
                    kj, kx, kd = kj2, kx2, kd2
                dd = _popcount(x)
                kj[nk] = j
                kx[nk] = x
                kd[nk] = np.uint8(dd)
                nk += 1
                hist[dd] += 1
        c = 0
        for dist in range(bound[g] + 1):  # every row within bound[g] has been seen
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
    out_p = np.empty(nk, np.int64)
    out_x = np.empty(nk, np.uint64)
    out_d = np.empty(nk, np.uint8)
    n = 0
    for i in range(nk):
        if kd[i] <= dk:
            out_p[n] = perm[kj[i]]
            out_x[n] = kx[i]
            out_d[n] = kd[i]
            n += 1
    return n, out_p, out_x, out_d
