"""FAISS binary flat index over packed codes, made exact for the cbir tie order.

Codes are already whole bytes with zero pad bits, so FAISS sees ``d = 8 * ceil(B / 8)``
dimensions and the same Hamming distances. Labels are row positions of the ``codes`` array
(the index's derived arrays map positions to ids, playing the role of IndexBinaryIDMap2).
On a machine with GPUs (``faiss.get_num_gpus() > 0``) k-NN runs on ``GpuIndexBinaryFlat``
(k <= 2048, no range search there: range queries and larger k use the CPU copy, which is kept).

``knn`` completes ties: FAISS returns k hits with arbitrary order among equal distances, so all
items within the k-th distance are gathered (range search, or a wider GPU k-NN) and the caller
sorts them in the exact order.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

GPU_MAX_K = 2048


def _faiss():
    import faiss  # imported lazily: importing faiss costs ~0.2 s

    return faiss


class FaissBinary:
    def __init__(self, codes: np.ndarray, use_gpu: bool | None = None) -> None:
        faiss = _faiss()
        self.n, self.nb = codes.shape
        self.cpu = faiss.IndexBinaryFlat(8 * self.nb)
        if self.n:
            self.cpu.add(np.ascontiguousarray(codes))
        self.gpu = None
        if use_gpu is None:
            use_gpu = faiss.get_num_gpus() > 0
        if use_gpu and self.n:
            try:
                self._res = faiss.StandardGpuResources()
                self.gpu = faiss.index_binary_cpu_to_gpu(self._res, 0, self.cpu)
            except Exception as exc:  # pragma: no cover - GPU machines only
                log.warning("GPU FAISS unavailable (%s); using CPU", exc)
                self.gpu = None

    def _range_cpu(self, q: np.ndarray, radius: int):
        # FAISS binary range search returns distances < radius (strict)
        lims, D, I = self.cpu.range_search(q[None, :], int(radius) + 1)
        return I.astype(np.int64), D.astype(np.int32)

    def knn(self, q: np.ndarray, k: int):
        """(positions, distances) of every item within the k-th smallest distance (ties
        complete; at least min(k, N) items)."""
        k = min(int(k), self.n)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        q = np.ascontiguousarray(q, dtype=np.uint8)
        if self.gpu is not None and k < GPU_MAX_K:  # pragma: no cover - GPU machines only
            k2 = min(self.n, GPU_MAX_K, max(2 * k, k + 64))
            D, I = self.gpu.search(q[None, :], k2)
            D, I = D[0].astype(np.int32), I[0].astype(np.int64)
            dk = int(D[k - 1])
            if k2 == self.n or int(D[k2 - 1]) > dk:
                sel = D <= dk
                return I[sel], D[sel]
            return self._range_cpu(q, dk)
        # one scan with some slack: if the (k2)-th distance exceeds the k-th, all ties are in
        k2 = min(self.n, k + max(32, k // 2))
        D, I = self.cpu.search(q[None, :], k2)
        D, I = D[0].astype(np.int32), I[0].astype(np.int64)
        dk = int(D[k - 1])
        if k2 == self.n or int(D[k2 - 1]) > dk:
            sel = D <= dk
            return I[sel], D[sel]
        return self._range_cpu(q, dk)

    def knn_raw(self, q: np.ndarray, k: int):
        """Plain FAISS top-k (no tie completion): the baseline the benchmark compares with."""
        k = min(k, self.n)
        idx = self.gpu if self.gpu is not None and k <= GPU_MAX_K else self.cpu
        D, I = idx.search(np.ascontiguousarray(q[None, :]), k)
        return I[0], D[0]

    def range(self, q: np.ndarray, radius: int):
        if self.n == 0 or radius < 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        return self._range_cpu(np.ascontiguousarray(q, dtype=np.uint8), radius)
