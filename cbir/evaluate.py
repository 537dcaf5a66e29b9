"""Encode a protocol's query and database sets with a model and score the codes.

Used by ``cbir demo`` and the benchmarks; ``cbir bench`` builds fuller reports on the same
metric functions (:mod:`cbir.metrics`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cbir.codes import Codes

__all__ = ["EncodedProtocol", "encode_protocol", "retrieval_summary", "format_summary"]


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
    db_codes, db_conf, db_idx = hasher.encode_imageset(
        splits.database, progress=progress, desc="encode database", num_workers=num_workers
    )
    q_codes, q_conf, q_idx = hasher.encode_imageset(
        splits.query, progress=progress, desc="encode queries", num_workers=num_workers
    )
    return EncodedProtocol(
        db_codes,
        db_conf,
        splits.database.labels[db_idx],
        db_idx,
        q_codes,
        q_conf,
        splits.query.labels[q_idx],
        q_idx,
        time.perf_counter() - t0,
    )


def retrieval_summary(enc: EncodedProtocol, k: int = 1000, fixed_bits: int = 0) -> dict:
    """The headline figures of a protocol, order-independent ones first.

    * ``tie_map@k_lex`` / ``tie_map@k_hamming``: tie-aware mAP@k (expected AP over all orders of
      tied items, He et al. 2018; :func:`cbir.metrics.tie_aware_average_precisions`), which does
      not depend on the database order;
    * ``map@k_lex`` / ``map@k_hamming`` and ``map@all_hamming``: AP of the engine's total order,
      ties broken by database id (this one does depend on the ids when many codes collide);
    * ``coverage``: unique %, entropy, average collision count (``sum n^2 / N - 1``), largest
      bucket and per-depth prefix entropy of the database codes, with ``random_unique_percent`` /
      ``random_average_collision_count``: what uniformly random codes give at the same N and B
      (the first ``fixed_bits`` bits, e.g. DDTL's class bits, kept as observed;
      :func:`cbir.metrics.coverage.random_expectation`), and ``unique_ratio`` = unique % / random.
    """
    from cbir.metrics import coverage_report, mean_average_precision, tie_aware_average_precisions
    from cbir.metrics.coverage import random_expectation

    kk = min(k, len(enc.db_codes))
    out = {"k": kk}
    for order in ("lex", "hamming"):
        out[f"tie_map@{kk}_{order}"] = float(
            np.mean(
                tie_aware_average_precisions(
                    enc.query_codes, enc.query_labels, enc.db_codes, enc.db_labels, kk, order=order
                )
            )
        )
    for order in ("lex", "hamming"):
        out[f"map@{kk}_{order}"] = mean_average_precision(
            enc.query_codes, enc.query_labels, enc.db_codes, enc.db_labels, kk, order=order, db_ids=enc.db_index
        )
    out["map@all_hamming"] = mean_average_precision(
        enc.query_codes, enc.query_labels, enc.db_codes, enc.db_labels, None, order="hamming", db_ids=enc.db_index
    )
    cov = coverage_report(enc.db_codes)
    out["coverage"] = {
        key: cov[key]
        for key in (
            "n",
            "nbits",
            "unique_codes",
            "unique_percent",
            "entropy_bits",
            "average_collision_count",
            "largest_bucket",
        )
    }
    out["coverage"]["prefix_entropy"] = [round(v, 3) for v in cov["prefix_entropy"]]
    rnd = random_expectation(enc.db_codes, fixed_bits)
    out["coverage"].update(
        random_fixed_bits=rnd["fixed_bits"],
        random_unique_percent=rnd["unique_percent"],
        random_average_collision_count=rnd["average_collision_count"],
        unique_ratio=cov["unique_percent"] / rnd["unique_percent"],
    )
    return out


def format_summary(summary: dict, indent: str = "  ") -> list[str]:
    """Printable lines of :func:`retrieval_summary`: tie-aware mAP first, then id-order, then coverage."""
    k, cov = summary["k"], summary["coverage"]
    fixed = f", first {cov['random_fixed_bits']} bits as observed" if cov["random_fixed_bits"] else ""
    return [
        f"{indent}tie-aware mAP@{k} (lexicographic)   {summary[f'tie_map@{k}_lex']:.4f}",
        f"{indent}tie-aware mAP@{k} (Hamming)         {summary[f'tie_map@{k}_hamming']:.4f}",
        f"{indent}id-order  mAP@{k} (lexicographic)   {summary[f'map@{k}_lex']:.4f}   (ties broken by database id)",
        f"{indent}id-order  mAP@{k} (Hamming)         {summary[f'map@{k}_hamming']:.4f}",
        f"{indent}id-order  mAP@all (Hamming)          {summary['map@all_hamming']:.4f}",
        f"{indent}unique codes      {cov['unique_codes']} / {cov['n']} ({cov['unique_percent']:.2f} %); uniformly random "
        f"codes{fixed}: {cov['random_unique_percent']:.2f} % (ratio {cov['unique_ratio']:.3f})",
        f"{indent}avg collisions    {cov['average_collision_count']:.3f}; uniformly random codes: "
        f"{cov['random_average_collision_count']:.3f}",
        f"{indent}code entropy      {cov['entropy_bits']:.3f} bits; largest bucket {cov['largest_bucket']}",
    ]
