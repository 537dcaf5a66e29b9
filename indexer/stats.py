"""``IndexReader.stats()``: counts, layout, disk sizes and coverage of one snapshot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cbir.codes import Codes
from cbir.indexer.derived import View
from cbir.indexer.env import file_size
from cbir.indexer.publish import DERIVED_DIR, LMDB_DIR, MANIFEST


def dir_bytes(p: Path) -> int:
    """Allocated bytes (st_blocks) of all files under ``p``."""
    tot = 0
    for root, _dirs, files in os.walk(p):
        for f in files:
            try:
                tot += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return tot


def reader_stats(r, coverage: bool = True) -> dict:
    st = {
        "format_version": r.manifest.get("format_version"),
        "count": r._count,
        "n": r._count,
        "nbits": r.nbits,
        "generation": r.generation,
        "model_hash": r.model_hash,
        "layout": r.layout.to_dict(),
        "build": r.manifest.get("build", {}),
        "lmdb_bytes": dir_bytes(r.path / LMDB_DIR),
        "derived_bytes": dir_bytes(r.path / DERIVED_DIR),
    }
    st["disk_bytes"] = st["lmdb_bytes"] + st["derived_bytes"] + file_size(r.path / MANIFEST)
    st["disk_bytes_per_item"] = st["disk_bytes"] / r._count if r._count else None
    if coverage:
        st["coverage"] = _coverage(r.derived(), r.nbits) if r._count else None
    return st


def _coverage(v: View, nbits: int) -> dict:
    if not v.exact:
        return compute_coverage(v, nbits)
    out = v.base.load_json("coverage")  # computed once per generation when persisted
    if out is None:
        out = compute_coverage(v, nbits)
        v.base.save_json("coverage", out)
    return out


def compute_coverage(v: View, nbits: int) -> dict:
    return packed_coverage(v.materialize()[0], nbits)


def packed_coverage(packed: np.ndarray, nbits: int) -> dict:
    """Coverage figures of the packed codes ``packed`` (n, nb)."""
    from cbir.metrics import coverage as cov

    n = len(packed)
    codes = Codes(np.ascontiguousarray(packed), nbits)
    if n * nbits <= (1 << 26):
        return cov.coverage_report(codes)
    # large index: the same figures without the O(N B^2) bit-correlation matrix
    counts = cov.bucket_counts(codes)
    cf = counts.astype(np.float64)
    p = cf / n
    sizes, nbk = np.unique(counts, return_counts=True)
    return {
        "n": int(n),
        "nbits": nbits,
        "unique_codes": len(counts),
        "unique_percent": float(100.0 * len(counts) / n),
        "entropy_bits": float(-(p * np.log2(p)).sum() + 0.0),
        "max_entropy_bits": float(min(nbits, np.log2(n))),
        "average_collision_count": float((cf * cf).sum() / n - 1.0),
        "largest_bucket": int(counts.max()),
        "prefix_entropy": [float(x) for x in cov.prefix_entropy(codes)],
        "bucket_size_histogram": {"sizes": [int(x) for x in sizes], "buckets": [int(x) for x in nbk]},
    }
