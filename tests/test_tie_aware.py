"""Tie-aware mAP in lexicographic order and the random-code coverage yardstick, checked against
exhaustive enumeration and simulation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cbir.codes import Codes, rank
from cbir.metrics import (
    average_collision_count,
    average_precision_at_k,
    lex_counts,
    random_expectation,
    tie_aware_average_precisions,
    unique_ratio,
)


def _mean_ap_over_all_tie_orders(q, ql, db, dl, k, order):
    """Exhaustive: average AP@k over every order of the tied items. Lex: every permutation of
    the tie-breaking ids (only identical codes tie). Hamming: every permutation of the database,
    stably sorted by distance (all items at one distance tie)."""
    n = len(db)
    dist = np.array([[int(np.bitwise_count(a ^ b).sum()) for b in db.packed] for a in q.packed])
    aps = []
    for perm in itertools.permutations(range(n)):
        perm = np.array(perm)
        if order == "lex":
            ranking = rank(q, db, k, order="lex", ids=perm)
        else:
            ranking = np.stack([perm[np.argsort(d[perm], kind="stable")] for d in dist])[:, :k]
        rel = ql[:, None] == dl[ranking]
        aps.append(average_precision_at_k(rel))
    return np.mean(aps, axis=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [2, 4, None])
@pytest.mark.parametrize("order", ["lex", "hamming"])
def test_tie_aware_equals_exhaustive_average(seed, k, order):
    rng = np.random.default_rng(seed)
    db = Codes.from_bits(rng.integers(0, 2, (6, 3)).astype(bool))  # 6 items, 3 bits: many ties
    q = Codes.from_bits(rng.integers(0, 2, (3, 3)).astype(bool))
    dl, ql = rng.integers(0, 2, 6), rng.integers(0, 2, 3)
    got = tie_aware_average_precisions(q, ql, db, dl, k, order=order)
    want = _mean_ap_over_all_tie_orders(q, ql, db, dl, k, order)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_lex_tie_aware_equals_plain_map_when_codes_are_distinct():
    rng = np.random.default_rng(5)
    db = Codes(np.unique(rng.integers(0, 256, (60, 2), dtype=np.uint8), axis=0)[:50], 16)
    q = Codes(rng.integers(0, 256, (7, 2), dtype=np.uint8), 16)
    dl, ql = rng.integers(0, 3, 50), rng.integers(0, 3, 7)
    rel = ql[:, None] == dl[rank(q, db, 20, order="lex")]
    np.testing.assert_allclose(
        tie_aware_average_precisions(q, ql, db, dl, 20, order="lex"), average_precision_at_k(rel), atol=1e-12
    )


def test_lex_counts_groups_and_multilabel():
    db = Codes.from_bits(np.array([[0, 0], [0, 0], [1, 1], [0, 1]], bool))
    q = Codes.from_bits(np.array([[0, 1]], bool))
    dl = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.uint8)
    ql = np.array([[1, 0]], np.uint8)
    n, r = lex_counts(q, ql, db, dl)
    # q=01: 01^01=00 (item 3), 01^00=01 (items 0, 1), 01^11=10 (item 2)
    assert n.tolist() == [[1, 2, 1]] and r.tolist() == [[0, 1, 1]]


def test_random_expectation_matches_simulation():
    rng = np.random.default_rng(0)
    n, b, c = 800, 10, 2
    cls = rng.integers(0, 4, n)
    sims = []
    for _ in range(300):
        bits = np.zeros((n, b), bool)
        bits[:, 0], bits[:, 1] = cls >> 1 & 1, cls & 1
        bits[:, c:] = rng.integers(0, 2, (n, b - c))
        codes = Codes.from_bits(bits)
        sims.append((unique_ratio(codes), average_collision_count(codes)))
    sims = np.array(sims)
    e = random_expectation(codes, c)
    se = sims.std(axis=0) / np.sqrt(len(sims))
    assert abs(e["unique_percent"] - sims[:, 0].mean()) < 4 * se[0] + 1e-9
    assert abs(e["average_collision_count"] - sims[:, 1].mean()) < 4 * se[1] + 1e-9
    # all-uniform case, closed form: collisions (N - 1) / 2^B
    assert random_expectation(codes)["average_collision_count"] == pytest.approx((n - 1) / 2**b)
    with pytest.raises(ValueError, match="fixed_bits"):
        random_expectation(codes, b + 1)
