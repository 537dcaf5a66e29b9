"""Retrieval, coverage and robustness metrics: pure functions on codes and labels.

Definitions live in the docstrings of :mod:`cbir.metrics.retrieval`, :mod:`cbir.metrics.buckets`,
:mod:`cbir.metrics.coverage` and :mod:`cbir.metrics.robustness`; everything is re-exported here.
"""

from cbir.metrics.buckets import (
    PRCurve,
    RadiusPrecision,
    expected_average_precision,
    hamming_counts,
    lex_counts,
    precision_recall_by_radius,
    precision_within_radius,
    tie_aware_average_precision,
    tie_aware_average_precisions,
)
from cbir.metrics.coverage import (
    average_collision_count,
    bit_balance,
    bit_correlation,
    bucket_counts,
    bucket_size_histogram,
    code_entropy,
    coverage_report,
    prefix_balance,
    prefix_entropy,
    random_expectation,
    unique_ratio,
)
from cbir.metrics.retrieval import (
    BruteForceSearcher,
    Searcher,
    average_precision_at_k,
    average_precisions,
    check_overlap,
    mean_average_precision,
    precision_at_k,
    ranked_relevance,
    recall_at_k,
    relevance,
    relevant_counts,
)
from cbir.metrics.robustness import bit_flip_rate, code_retention, pairwise_common_prefix

__all__ = [
    # retrieval
    "Searcher",
    "BruteForceSearcher",
    "relevance",
    "relevant_counts",
    "ranked_relevance",
    "average_precision_at_k",
    "average_precisions",
    "mean_average_precision",
    "precision_at_k",
    "recall_at_k",
    "hamming_counts",
    "lex_counts",
    "PRCurve",
    "precision_recall_by_radius",
    "RadiusPrecision",
    "precision_within_radius",
    "expected_average_precision",
    "tie_aware_average_precisions",
    "tie_aware_average_precision",
    "check_overlap",
    # coverage
    "bucket_counts",
    "code_entropy",
    "unique_ratio",
    "average_collision_count",
    "prefix_entropy",
    "prefix_balance",
    "bit_balance",
    "bit_correlation",
    "bucket_size_histogram",
    "coverage_report",
    "random_expectation",
    # robustness
    "pairwise_common_prefix",
    "code_retention",
    "bit_flip_rate",
]
