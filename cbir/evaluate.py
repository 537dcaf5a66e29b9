"""Encode a protocol's query and database sets with a model and score the codes.

Used by ``cbir demo`` and the benchmarks; ``cbir bench`` builds fuller reports on the same
metric functions (:mod:`cbir.metrics`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cbir.codes import Codes

__all__ = ["EncodedProtocol", "encode_protocol", "retrieval_summary"]


@dataclass
class EncodedProtocol:
    db_codes: Codes
    db_conf: np.ndarray
    db_labels: np.ndarray
    db_index: np.ndarray
    query_codes: Codes
    query_conf: np.ndarray
    query_labels: np.ndarray
    query_index: np.ndarray
    encode_s: float


def encode_protocol(hasher, splits, progress: bool = True, num_workers: int = 0) -> EncodedProtocol:
    """Encode ``splits.database`` and ``splits.query`` (unreadable images are skipped)."""
    t0 = time.perf_counter()
    db_codes, db_conf, db_idx = hasher.encode_imageset(splits.database, progress=progress, desc="encode database",
                                                       num_workers=num_workers)
    q_codes, q_conf, q_idx = hasher.encode_imageset(splits.query, progress=progress, desc="encode queries",
                                                    num_workers=num_workers)
    return EncodedProtocol(db_codes, db_conf, splits.database.labels[db_idx], db_idx,
                           q_codes, q_conf, splits.query.labels[q_idx], q_idx, time.perf_counter() - t0)


def retrieval_summary(enc: EncodedProtocol, k: int = 1000) -> dict:
    """mAP@k (lexicographic and Hamming orders), mAP@all and the database coverage report."""
    from cbir.metrics import coverage_report, mean_average_precision

    kk = min(k, len(enc.db_codes))
    out = {"k": kk}
    for order in ("lex", "hamming"):
        out[f"map@{kk}_{order}"] = mean_average_precision(
            enc.query_codes, enc.query_labels, enc.db_codes, enc.db_labels, kk, order=order)
    out["map@all_hamming"] = mean_average_precision(
        enc.query_codes, enc.query_labels, enc.db_codes, enc.db_labels, None, order="hamming")
    cov = coverage_report(enc.db_codes)
    out["coverage"] = {key: cov[key] for key in ("n", "nbits", "unique_codes", "unique_percent", "entropy_bits",
                                                 "average_collision_count", "largest_bucket")}
    out["coverage"]["prefix_entropy"] = [round(v, 3) for v in cov["prefix_entropy"]]
    return out
