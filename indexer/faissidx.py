"""FAISS binary flat index over packed codes, made exact for the cbir tie order.

Codes are already whole bytes with zero pad bits, so FAISS sees ``d = 8 * ceil(B / 8)``
dimensions and the same Hamming distances. Labels are row positions of the ``codes`` array
(the index's derived arrays map positions to ids, playing the role of IndexBinaryIDMap2).

Threads are set explicitly on every call (``omp_set_num_threads`` is per calling thread): one
for a single query (a parallel scan of one query is slower than a serial one below millions of
codes, and the server runs queries on several threads), all cores of this process
(:func:`batch_threads`) for a batch, which is one FAISS call.

Rows to skip (deleted items, ids outside a label filter) are passed as a FAISS ``IDSelector``
(a bitmap of the rows to keep), so they are skipped inside the scan.

On a machine with GPUs (``faiss.get_num_gpus() > 0`` and a GPU build of FAISS) unfiltered k-NN
runs on ``GpuIndexBinaryFlat`` (k <= :data:`GPU_MAX_K`; range queries, filtered queries and
larger k use the CPU index, which is kept).

``knn`` completes ties: FAISS returns k hits with arbitrary order among equal distances, so all
items within the k-th distance are gathered (a wider search or a range search) and the caller
sorts them in the exact order.
"""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)

GPU_MAX_K = 2048


def _faiss():
    import faiss  # imported lazily: importing faiss costs ~0.2 s

    return faiss


def batch_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "GpuIndexBinaryFlat") and faiss.get_num_gpus() > 0


class Selector:
    """Rows of an index a search may return (a FAISS ``IDSelectorBitmap`` over a bool mask)."""

    def __init__(self, keep: np.ndarray) -> None:
        faiss = _faiss()
        self.keep = np.asarray(keep, dtype=bool)
        self._bits = np.packbits(self.keep, bitorder="little")
        self.sel = faiss.IDSelectorBitmap(len(self.keep), faiss.swig_ptr(self._bits))
        self.params = faiss.SearchParameters(sel=self.sel)
        self.count = int(self.keep.sum())


class FaissBinary:
    """``IndexBinaryFlat`` over ``codes`` (or a saved index file, memory-mapped)."""

    def __init__(self, codes: np.ndarray | None = None, use_gpu: bool | None = None, path=None) -> None:
        faiss = _faiss()
        if path is not None:
            self.cpu = faiss.read_index_binary(str(path), faiss.IO_FLAG_MMAP)
            self.n, self.nb = self.cpu.ntotal, self.cpu.d // 8
        elif codes is None:
            raise ValueError("FaissBinary needs codes or a path")
        else:
            self.n, self.nb = codes.shape
            self.cpu = faiss.IndexBinaryFlat(8 * self.nb)
            if self.n:
                self.cpu.add(np.ascontiguousarray(codes))
        self.gpu = None
        if use_gpu is None:
            use_gpu = gpu_available()
        if use_gpu and self.n:  # pragma: no cover - GPU machines only
            try:
                self._res = faiss.StandardGpuResources()
                self.gpu = faiss.GpuIndexBinaryFlat(self._res, self.cpu)
            except (RuntimeError, AttributeError) as exc:
                log.warning("GPU FAISS unavailable (%s); using CPU", exc)
                self.gpu = None

    def save(self, path) -> None:
        _faiss().write_index_binary(self.cpu, str(path))

    # raw calls ------------------------------------------------------------------------------
    def _search(self, Q: np.ndarray, k: int, sel: Selector | None, threads: int):
        faiss = _faiss()
        faiss.omp_set_num_threads(threads)
        if sel is None and self.gpu is not None and k <= GPU_MAX_K:  # pragma: no cover
            return self.gpu.search(Q, k)
        if sel is None:
            return self.cpu.search(Q, k)
        return self.cpu.search(Q, k, params=sel.params)

    def _range(self, Q: np.ndarray, radius: int, sel: Selector | None, threads: int):
        faiss = _faiss()
        faiss.omp_set_num_threads(threads)
        # FAISS binary range search returns distances < radius (strict)
        if sel is None:
            return self.cpu.range_search(Q, int(radius) + 1)
        return self.cpu.range_search(Q, int(radius) + 1, params=sel.params)

    # exact k-NN / range -----------------------------------------------------------------------
    def knn_batch(self, Q: np.ndarray, k: int, sel: Selector | None = None, threads: int | None = None) -> list:
        """For each query row: (positions, distances) of every kept item within its k-th
        smallest distance (ties complete; at least min(k, kept) items). One FAISS call (plus
        one range call for the queries whose ties ran past the first answer)."""
        Q = np.ascontiguousarray(Q, dtype=np.uint8).reshape(-1, self.nb)
        avail = self.n if sel is None else sel.count
        k = min(int(k), avail)
        nq = len(Q)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int32))
        if k <= 0 or nq == 0:
            return [empty] * nq
        threads = (1 if nq == 1 else batch_threads()) if threads is None else threads
        # one scan with some slack: if the (k2)-th distance exceeds the k-th, all ties are in
        k2 = min(avail, k + max(32, k // 2))
        if self.gpu is not None and sel is None and k2 > GPU_MAX_K:  # pragma: no cover
            k2 = max(k, GPU_MAX_K) if k <= GPU_MAX_K else k2
        D, I = self._search(Q, k2, sel, threads)
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * nq
        redo, radii = [], []
        for i in range(nq):
            d, ii = D[i].astype(np.int32), I[i].astype(np.int64)
            dk = int(d[k - 1])
            if k2 == avail or int(d[k2 - 1]) > dk:
                m = d <= dk
                out[i] = (ii[m], d[m])
            else:
                redo.append(i)
                radii.append(dk)
        for i, dk in zip(redo, radii):  # ties beyond k2: everything within the k-th distance
            out[i] = self.range(Q[i], dk, sel, threads)
        return out

    def knn(self, q: np.ndarray, k: int, sel: Selector | None = None):
        return self.knn_batch(q[None, :], k, sel, threads=1)[0]

    def range(
        self, q: np.ndarray, radius: int, sel: Selector | None = None, threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.n == 0 or radius < 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        _lims, D, I = self._range(np.ascontiguousarray(q, dtype=np.uint8)[None, :], radius, sel, threads)
        return I.astype(np.int64), D.astype(np.int32)

    def range_batch(self, Q: np.ndarray, radius: int, sel: Selector | None = None) -> list:
        Q = np.ascontiguousarray(Q, dtype=np.uint8).reshape(-1, self.nb)
        if self.n == 0 or radius < 0 or len(Q) == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.int32))] * len(Q)
        lims, D, I = self._range(Q, radius, sel, 1 if len(Q) == 1 else batch_threads())
        return [
            (I[lims[i] : lims[i + 1]].astype(np.int64), D[lims[i] : lims[i + 1]].astype(np.int32))
            for i in range(len(Q))
        ]

    def knn_raw(self, q: np.ndarray, k: int, threads: int = 1):
        """Plain FAISS top-k (no tie completion): the baseline the benchmark compares with."""
        k = min(k, self.n)
        D, I = self._search(np.ascontiguousarray(q).reshape(-1, self.nb), k, None, threads)
        return I[0], D[0]
