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
complete). The work is charged at ``PROBE_NS`` per probe and ``CANDIDATE_NS`` per candidate
(:mod:`cbir.indexer._hybrid_kernel`); over ``budget`` the search stops and returns ``None``
(the caller scans the bucket). :func:`bucket_topk` then ranks the rows within the k-th
distance in a second compiled loop and returns the answer's arrays (ids, big-endian codes,
distances, prefix lengths), so the caller builds the result without a numpy call per field.

With ``cb = 0`` the bucket is the whole base: the plain exact Hamming k-NN (the reader's
``search_hamming`` fast path).

The kernels are compiled on first use and cached on disk (``numba`` ``cache=True``: in the
package's ``__pycache__``, or ``NUMBA_CACHE_DIR``); numba is imported only then (~1 s from the
cache). A reader's first Hamming queries do not wait for that: :func:`ready` loads the kernels
in a background thread while the numpy MIH search answers; hybrid search loads them at once
(its numpy fallback is a scan of the bucket); :func:`warm` is the server's preload.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from cbir.indexer.mih import MIH, flip_masks

_KERNELS = None
_LOCK = threading.Lock()
#: load the kernels of a MIH in a background thread on its first query (its queries take the
#: numpy paths meanwhile; numba's import and the cache load take ~1 s); False: load them in the
#: calling thread
BACKGROUND = True
#: the background thread waits this long before it loads (the queries right after opening an
#: index then do not share the GIL with numba's import)
LOAD_DELAY_S = 0.25


def _kernels():
    """The compiled loops (numba imported and the kernels compiled, or loaded from their cache,
    on first use): (probe loop, ranking)."""
    global _KERNELS
    if _KERNELS is None:
        from cbir.indexer import _hybrid_kernel as hk

        _KERNELS = (hk.bucket_knn_kernel, hk.rank_kernel)
    return _KERNELS


def applies(mih: MIH) -> bool:
    """Whether the kernels can search this MIH: its tables are combined into one CSR with the
    codes stored again in bucket order (direct tables of <= 64-bit codes)."""
    comb = mih._combined()
    return comb is not None and comb[3] is not None


def warm(mih: MIH, ids: np.ndarray, nbits: int, alive: np.ndarray | None) -> None:
    """Compile (or load from the cache) both kernels for the array types of this MIH, ``ids``
    and ``alive`` (numba specialises on them), with one tiny query; then :func:`ready` is True."""
    if applies(mih) and mih.n:
        bucket_topk(mih, int(mih._combined()[3][0]), 1, 0, mih.n, ids, nbits, alive)
    mih.__dict__["_kernels_ready"] = True


def _warm_later(mih: MIH, ids: np.ndarray, nbits: int, alive: np.ndarray | None) -> None:
    time.sleep(LOAD_DELAY_S)
    warm(mih, ids, nbits, alive)


def ready(mih: MIH, ids: np.ndarray, nbits: int, alive: np.ndarray | None, wait: bool = False) -> bool:
    """Whether the kernels are loaded for this MIH. ``wait`` (hybrid search, whose numpy
    fallback is a scan of the bucket): load them now, or wait for the thread loading them.
    Otherwise (plain Hamming search, whose numpy MIH search is a full-speed fallback), with
    :data:`BACKGROUND` a thread starts loading them (once per MIH) and this returns False."""
    if mih.__dict__.get("_kernels_ready"):
        return True
    with _LOCK:
        t = mih.__dict__.get("_kernels_loading")
        if t is None and (wait or not BACKGROUND):
            mih.__dict__["_kernels_loading"] = t = threading.current_thread()
            mine = True
        else:
            mine = False
            if t is None:
                t = threading.Thread(
                    target=_warm_later, args=(mih, ids, nbits, alive), name="cbir-kernel-load", daemon=True
                )
                mih.__dict__["_kernels_loading"] = t
                t.start()
    if mine:
        warm(mih, ids, nbits, alive)
        return True
    if wait or not BACKGROUND:
        t.join()
        if not mih.__dict__.get("_kernels_ready"):  # (the loading thread failed: load here)
            warm(mih, ids, nbits, alive)
        return True
    return False


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
        shifts = [64 - st - s for s, st in zip(mih.sizes, mih.starts)]
        smask = [(1 << s) - 1 for s in mih.sizes]
        g = len(tab)
        plan = np.zeros((5, g + 1), np.int64)
        plan[0] = start
        plan[1, :g], plan[2, :g], plan[3, :g], plan[4, :g] = tab, rad, base, bound
        got = cache[cb] = (np.concatenate(fm).astype(np.uint64), plan, np.array([shifts, smask], np.uint64))
    return got


def _probe(mih: MIH, q64: int, k: int, cb: int, bucket_n: int, alive, budget):
    """The probe loop: (count, positions, x, distances) of every live row of the class bucket
    of ``q64`` (the query's first 8 bytes as a big-endian int) within the k-th smallest
    distance, ties included (the first ``count`` entries; at most ``bucket_n`` rows are in the
    bucket), or None when the estimated cost exceeds ``budget``. The arrays are this thread's
    scratch buffers (:func:`_scratch`): valid until its next probe."""
    assert applies(mih) and 0 <= cb <= 64
    _bases, offs, perm, codes_all = mih._combined()
    k = min(k, bucket_n)
    if k <= 0:
        return 0, np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.uint8)
    fm, plan, sub = _plan(mih, cb)
    top = (1 << (64 - cb)) - 1 if cb < 64 else 0  # x <= top: the same class bits (cb = 0: all rows)
    limit = -1 if budget is None else int(budget)
    use_alive = alive is not None
    al = alive if alive is not None else _NO_ALIVE
    kernel = _kernels()[0]
    args = (offs, perm, codes_all, fm, plan, sub, np.uint64(q64), np.uint64(top), int(k), al, use_alive, limit)
    buf = _scratch(0)
    while True:
        n, need = kernel(*args, *buf)
        if n != -2:
            break
        buf = _scratch(need)
    return None if n < 0 else (n, *buf)


_TLS = threading.local()
#: entries of the largest scratch buffers a thread keeps (17 B each); a probe that needs more
#: gets buffers of its own, freed with its answer
SCRATCH_KEEP = 1 << 20


def _scratch(need: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Buffers for the probe loop's kept rows (positions, x, distances) of at least ``need``
    entries: this thread's (search threads run the kernel in parallel, so each has its own; a
    probe's answer lives in them until the thread's next probe), or for a need above
    :data:`SCRATCH_KEEP` new ones."""
    buf = getattr(_TLS, "buf", None)
    if buf is not None and len(buf[0]) >= need:
        return buf
    cap = max(4096, need + need // 2)
    new = (np.empty(cap, np.int64), np.empty(cap, np.uint64), np.empty(cap, np.uint8))
    if cap <= SCRATCH_KEEP:
        _TLS.buf = new
    return new


def bucket_topk(
    mih: MIH,
    q64: int,
    k: int,
    cb: int,
    bucket_n: int,
    ids: np.ndarray,
    nbits: int,
    alive: np.ndarray | None = None,
    budget: int | None = None,
):
    """The hybrid answer itself: the first ``k`` live rows of the bucket in the Hamming order
    (distance, then lexicographic, then id) as (ids, codes as uint64 whose bytes are the
    big-endian code, distances int32, common-prefix lengths int32); ``ids`` are the base's ids
    by position. None when over ``budget``."""
    got = _probe(mih, q64, k, cb, bucket_n, alive, budget)
    if got is None:
        return None
    n, pos, x, d = got
    return _kernels()[1](pos, x, d, n, int(k), ids, np.uint64(q64), int(nbits))


_NO_ALIVE = np.ones(1, np.bool_)
