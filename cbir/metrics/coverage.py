"""Coverage of a set of binary codes (thesis Table 3.5): how well the codes spread the items.

All functions take a :class:`cbir.codes.Codes` of ``N >= 1`` codes of ``B`` bits. A *bucket* is
a distinct code value; ``n_c`` is the number of items whose code is ``c``, ``p_c = n_c / N``.
Logarithms are base 2 (entropies in bits). The prefix of depth ``d`` of a code is its first
``d`` bits (bit 0 = most important, see :mod:`cbir.codes`).
"""

from __future__ import annotations

import numpy as np

from cbir.codes import Codes, lex_order, xor_prefix_length

__all__ = [
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
]


def _check(codes) -> Codes:
    if not isinstance(codes, Codes):
        raise ValueError(
            f"codes must be a cbir.codes.Codes, got {type(codes).__name__}; wrap bits with Codes.from_bits(bits)"
        )
    if len(codes) == 0:
        raise ValueError("coverage needs at least one code; got an empty Codes")
    return codes


def _consecutive_cpl(codes: Codes) -> np.ndarray:
    """Common-prefix lengths of neighbours in lexicographic order: ``(N - 1,)`` int64."""
    sp = codes.packed[lex_order(codes)]
    return xor_prefix_length(sp[1:] ^ sp[:-1], codes.nbits)


def _counts_from_cpl(cpl: np.ndarray, n: int, depth: int) -> np.ndarray:
    """Bucket sizes of the depth-``depth`` prefixes given neighbour common-prefix lengths."""
    cuts = np.flatnonzero(cpl < depth) + 1
    edges = np.concatenate([[0], cuts, [n]])
    return np.diff(edges)


def _entropy(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() + 0.0)


def bucket_counts(codes: Codes) -> np.ndarray:
    """``n_c`` for every distinct code, in ascending lexicographic order of the codes."""
    codes = _check(codes)
    return _counts_from_cpl(_consecutive_cpl(codes), len(codes), codes.nbits)


def code_entropy(codes: Codes) -> float:
    """Entropy of the code distribution in bits: ``H = -sum_c p_c log2 p_c`` over distinct codes.

    0 when all codes are equal; ``log2 N`` when all are distinct; at most ``min(B, log2 N)``.
    """
    return _entropy(bucket_counts(codes))


def unique_ratio(codes: Codes) -> float:
    """Unique-code percentage: ``100 * (number of distinct codes) / N``."""
    codes = _check(codes)
    return 100.0 * len(bucket_counts(codes)) / len(codes)


def average_collision_count(codes: Codes) -> float:
    """Average collision count: ``sum_c n_c^2 / N - 1``.

    The mean, over items, of the number of *other* items sharing the item's code (0 when all
    codes are distinct, ``N - 1`` when all are equal).
    """
    c = bucket_counts(codes).astype(np.float64)
    return float((c * c).sum() / c.sum() - 1.0)


def prefix_entropy(codes: Codes) -> np.ndarray:
    """``(B,)`` float64: element ``d - 1`` is the entropy (bits) of the depth-``d`` prefixes.

    ``H_d = -sum_p p log2 p`` over distinct ``d``-bit prefixes ``p``; non-decreasing in ``d``,
    ``H_B`` = :func:`code_entropy`.
    """
    codes = _check(codes)
    cpl = _consecutive_cpl(codes)
    n = len(codes)
    return np.array([_entropy(_counts_from_cpl(cpl, n, d)) for d in range(1, codes.nbits + 1)])


def prefix_balance(codes: Codes) -> np.ndarray:
    """``(B,)`` float64 prefix balance: ``H_d / min(d, log2 N)`` for ``d = 1..B``.

    The depth-``d`` prefix entropy relative to the most a set of ``N`` codes can reach at that
    depth: 1 means the first ``d`` bits split the items as evenly as possible (a balanced tree
    down to depth ``d``), 0 that all items share one prefix. Defined as 1 when ``N = 1``.
    """
    codes = _check(codes)
    h = prefix_entropy(codes)
    cap = np.minimum(np.arange(1, codes.nbits + 1, dtype=np.float64), np.log2(len(codes)))
    return np.divide(h, cap, out=np.ones_like(h), where=cap > 0)


def bit_balance(codes: Codes) -> np.ndarray:
    """``(B,)`` float64: per-bit mean, the fraction of codes whose bit ``j`` is 1 (0.5 = balanced)."""
    codes = _check(codes)
    return codes.to_bits().mean(axis=0, dtype=np.float64)


def bit_correlation(codes: Codes) -> np.ndarray:
    """``(B, B)`` float64 Pearson correlation between bits over the ``N`` codes.

    Entry ``(i, j)`` is ``cov(b_i, b_j) / (std(b_i) std(b_j))``; for a constant bit (std 0) the
    off-diagonal entries are defined as 0. The diagonal is 1.
    """
    codes = _check(codes)
    x = codes.to_bits().astype(np.float64)
    x -= x.mean(axis=0)
    cov = x.T @ x / len(x)
    sd = np.sqrt(np.diag(cov))
    den = np.outer(sd, sd)
    corr = np.divide(cov, den, out=np.zeros_like(cov), where=den > 0)
    corr = np.clip(corr, -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    return corr


def bucket_size_histogram(codes: Codes) -> tuple[np.ndarray, np.ndarray]:
    """``(sizes, n_buckets)``: for every bucket size ``s`` that occurs (ascending), the number of
    distinct codes shared by exactly ``s`` items. ``sum(sizes * n_buckets) == N``."""
    sizes, counts = np.unique(bucket_counts(codes), return_counts=True)
    return sizes.astype(np.int64), counts.astype(np.int64)


def random_expectation(codes: Codes, fixed_bits: int = 0) -> dict:
    """What uniformly random codes would give at the same ``N`` and ``B``: a yardstick for
    :func:`unique_ratio` and :func:`average_collision_count`.

    ``fixed_bits = 0``: every code uniform over ``M = 2^B`` values. ``fixed_bits = c > 0``: the
    first ``c`` bits (e.g. DDTL's class bits) are kept as observed and the remaining
    ``B - c`` bits are uniform within each observed prefix group (``M = 2^(B - c)``). For a group
    of ``n`` items: expected distinct codes ``M (1 - (1 - 1/M)^n)`` and expected
    ``sum_c n_c^2 = n + n (n - 1) / M``; summed over groups, divided by ``N`` (unique %) and
    ``N`` minus 1 (average collision count). Returns ``{"fixed_bits", "unique_percent",
    "average_collision_count"}``.
    """
    codes = _check(codes)
    c = int(fixed_bits)
    if not 0 <= c <= codes.nbits:
        raise ValueError(f"fixed_bits must be in 0..{codes.nbits}, got {fixed_bits}")
    n = len(codes)
    groups = (np.array([n]) if c == 0 else _counts_from_cpl(_consecutive_cpl(codes), n, c)).astype(np.float64)
    m = 2.0 ** (codes.nbits - c)
    distinct = (m * -np.expm1(groups * np.log1p(-1.0 / m))) if m > 1 else np.ones_like(groups)
    sq = groups + groups * (groups - 1) / m
    return {
        "fixed_bits": c,
        "unique_percent": float(100.0 * distinct.sum() / n),
        "average_collision_count": float(sq.sum() / n - 1.0),
    }


def coverage_report(codes: Codes) -> dict:
    """Headline coverage figures as a JSON-serialisable dict (plain ints, floats and lists).

    Keys: ``n``, ``nbits``, ``unique_codes``, ``unique_percent`` (:func:`unique_ratio`),
    ``entropy_bits`` (:func:`code_entropy`), ``max_entropy_bits`` (``min(B, log2 N)``),
    ``average_collision_count``, ``largest_bucket``, ``prefix_entropy`` and ``prefix_balance``
    (lists over depth 1..B), ``bit_balance`` (list over bits), ``mean_abs_bit_correlation``
    (mean ``|corr|`` over pairs ``i != j``; 0 when B = 1) and ``bucket_size_histogram``
    (``{"sizes": [...], "buckets": [...]}``).
    """
    codes = _check(codes)
    n, b = len(codes), codes.nbits
    counts = bucket_counts(codes)
    cf = counts.astype(np.float64)
    pe = prefix_entropy(codes)
    cap = np.minimum(np.arange(1, b + 1, dtype=np.float64), np.log2(n))
    pb = np.divide(pe, cap, out=np.ones_like(pe), where=cap > 0)
    corr = bit_correlation(codes)
    off = np.abs(corr[~np.eye(b, dtype=bool)])
    sizes, nb = np.unique(counts, return_counts=True)
    return {
        "n": int(n),
        "nbits": int(b),
        "unique_codes": int(len(counts)),
        "unique_percent": float(100.0 * len(counts) / n),
        "entropy_bits": _entropy(counts),
        "max_entropy_bits": float(min(b, np.log2(n))),
        "average_collision_count": float((cf * cf).sum() / n - 1.0),
        "largest_bucket": int(counts.max()),
        "prefix_entropy": [float(v) for v in pe],
        "prefix_balance": [float(v) for v in pb],
        "bit_balance": [float(v) for v in bit_balance(codes)],
        "mean_abs_bit_correlation": float(off.mean()) if off.size else 0.0,
        "bucket_size_histogram": {
            "sizes": [int(v) for v in sizes],
            "buckets": [int(v) for v in nb],
        },
    }
