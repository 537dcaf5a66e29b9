"""Shared helpers of the index tests: data generators and brute-force references."""

from __future__ import annotations

import numpy as np

from cbir.codes import Codes, rank


def random_codes(rng, n: int, nbits: int, kind: str) -> Codes:
    """``uniform``, ``clustered`` (few centres + few flipped bits) or ``dups`` (few codes)."""
    if kind == "uniform" or n == 0:
        bits = rng.integers(0, 2, (n, nbits), dtype=np.uint8)
    elif kind == "clustered":
        centres = rng.integers(0, 2, (max(1, n // 20), nbits), dtype=np.uint8)
        bits = centres[rng.integers(0, len(centres), n)].copy()
        flips = rng.random((n, nbits)) < 0.06
        bits ^= flips.astype(np.uint8)
    elif kind == "dups":
        pool = rng.integers(0, 2, (3, nbits), dtype=np.uint8)
        bits = pool[rng.integers(0, 3, n)]
    else:
        raise ValueError(kind)
    return Codes.from_bits(bits)


def random_ids(rng, n: int) -> np.ndarray:
    big = rng.integers(0, 2**40, n)
    return np.unique(np.concatenate([big, rng.integers(0, 50, n)]))[:n] if n else np.zeros(0, np.int64)


def ref_ids(q: Codes, codes: Codes, ids: np.ndarray, k, order: str) -> np.ndarray:
    if len(codes) == 0:
        return np.zeros(0, np.int64)
    return ids[rank(q, codes, k, order=order, ids=ids)[0]]


def ref_radius(q: Codes, codes: Codes, ids: np.ndarray, radius: int, k=None) -> np.ndarray:
    if len(codes) == 0:
        return np.zeros(0, np.int64)
    order = rank(q, codes, None, order="hamming", ids=ids)[0]
    d = np.bitwise_count(codes.packed ^ q.packed[0]).sum(axis=1)
    out = [i for i in order if d[i] <= radius]
    return ids[np.asarray(out, dtype=np.int64)][:k]


def queries_for(rng, codes: Codes, nbits: int, n: int = 4) -> Codes:
    qs = [rng.integers(0, 2, (n, nbits), dtype=np.uint8)]
    if len(codes):
        qs.append(codes.to_bits()[rng.integers(0, len(codes), n)])
    return Codes.from_bits(np.concatenate(qs))


def save_tiny_model(path, class_names=("a", "b", "c"), nbits=10, depth=8, seed=0):
    """Save an untrained DDTL hasher on a tiny convnet (32x32 input) at ``path``; returns the path."""
    import torch

    from cbir.models.hasher import Hasher
    from cbir.models.registry import MethodSpec, create_method, resolve_params

    torch.manual_seed(seed)
    spec = MethodSpec(
        backbone="convnet",
        num_classes=len(class_names),
        nbits=nbits,
        depth=depth,
        class_names=tuple(class_names),
        backbone_kwargs=(("width", 8),),
    )
    params = resolve_params("ddtl", None)
    h = Hasher(create_method("ddtl", spec, params), "ddtl", spec, params, image_size=32, device="cpu")
    return h.save(path)
