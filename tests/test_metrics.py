"""Tests of cbir.metrics against hand-computed cases, brute force and scikit-learn."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from cbir.codes import Codes, hamming_distance, rank
from cbir.metrics import (
    BruteForceSearcher,
    Searcher,
    average_collision_count,
    average_precision_at_k,
    average_precisions,
    bit_balance,
    bit_correlation,
    bit_flip_rate,
    bucket_size_histogram,
    check_overlap,
    code_entropy,
    code_retention,
    coverage_report,
    expected_average_precision,
    hamming_counts,
    mean_average_precision,
    precision_at_k,
    precision_recall_by_radius,
    precision_within_radius,
    prefix_balance,
    prefix_entropy,
    ranked_relevance,
    recall_at_k,
    relevance,
    relevant_counts,
    tie_aware_average_precision,
    tie_aware_average_precisions,
    unique_ratio,
)


def codes_from_ints(values, nbits):
    """Codes whose big-endian value (bit 0 = MSB) is each int."""
    bits = [[(v >> (nbits - 1 - j)) & 1 for j in range(nbits)] for v in values]
    return Codes.from_bits(np.array(bits, dtype=np.uint8).reshape(len(values), nbits))


# --------------------------------------------------------------------------------------------
# relevance
# --------------------------------------------------------------------------------------------
def test_relevance_single_and_multi_label():
    rel = relevance(np.array([0, 1]), np.array([1, 0, 0, 2]))
    assert rel.tolist() == [[False, True, True, False], [True, False, False, False]]
    q = np.array([[1, 0, 1], [0, 0, 0]])
    d = np.array([[0, 0, 1], [0, 1, 0], [1, 1, 1]])
    assert relevance(q, d).tolist() == [[True, False, True], [False, False, False]]
    assert relevant_counts(q, d).tolist() == [2, 0]
    assert relevant_counts(np.array([0, 7]), np.array([1, 0, 0, 2])).tolist() == [2, 0]
    assert relevance(np.array(["cat"]), np.array(["dog", "cat"])).tolist() == [[False, True]]


def test_relevance_validation():
    with pytest.raises(ValueError, match="1-D"):
        relevance(np.array([0, 1]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="multi-hot"):
        relevance(np.array([[2], [3]]), np.array([[2]]))
    with pytest.raises(ValueError, match="widths differ"):
        relevance(np.array([[1, 0]]), np.array([[1, 0, 0]]))


def test_ranked_relevance_empty_slots():
    rel = ranked_relevance(np.array([1]), np.array([1, 0, 1]), np.array([[2, 1, -1]]))
    assert rel.tolist() == [[True, False, False]]


# --------------------------------------------------------------------------------------------
# AP / mAP
# --------------------------------------------------------------------------------------------
def test_average_precision_hand_computed():
    rel = np.array(
        [
            [1, 0, 1, 0],  # (1/2)(1/1 + 2/3)
            [0, 1, 0, 1],  # (1/2)(1/2 + 2/4)
            [0, 0, 0, 0],  # nothing relevant in top k -> 0
            [1, 1, 1, 1],
        ],
        dtype=bool,
    )
    ap = average_precision_at_k(rel)
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2, 0.5, 0.0, 1.0])


def test_map_counts_queries_without_relevant_items_as_zero():
    db = codes_from_ints([0b000, 0b001, 0b111], 3)
    q = codes_from_ints([0b000, 0b000], 3)
    # query 0 (class 0): ranking 0,1,2 -> classes 0,1,1 -> AP@2 = 1
    # query 1 (class 5): nothing relevant anywhere -> 0, still counted
    m = mean_average_precision(q, np.array([0, 5]), db, np.array([0, 1, 1]), k=2)
    assert m == pytest.approx(0.5)
    # nothing relevant in the top 1 (but relevant items further down): 0 and counted
    aps = average_precisions(q[:1], np.array([1]), db, np.array([0, 1, 1]), k=1)
    assert aps.tolist() == [0.0]


def test_map_at_k_hand_computed_lex_and_hamming():
    # 4-bit codes; query 0b0000. Lex order: by value of code (XOR with 0).
    db = codes_from_ints([0b1000, 0b0111, 0b0001, 0b0011], 4)
    labels = np.array([1, 0, 1, 1])
    q = codes_from_ints([0b0000], 4)
    # lex ranking: 0001(1), 0011(1), 0111(0), 1000(1) -> rel 1,1,0,1
    assert rank(q, db, order="lex").tolist() == [[2, 3, 1, 0]]
    ap_lex = mean_average_precision(q, np.array([1]), db, labels, order="lex")
    assert ap_lex == pytest.approx((1 + 1 + 3 / 4) / 3)
    # @2: rel 1,1 -> 1
    assert mean_average_precision(q, np.array([1]), db, labels, k=2) == pytest.approx(1.0)
    # hamming ranking: d=1: 0001, 1000 (lex tie-break 0001 < 1000); d=2: 0011; d=3: 0111
    # -> rel 1,1,1,0
    assert rank(q, db, order="hamming").tolist() == [[2, 0, 3, 1]]
    ap_ham = mean_average_precision(q, np.array([1]), db, labels, order="hamming")
    assert ap_ham == pytest.approx(1.0)


def test_map_multilabel():
    db = codes_from_ints([0b00, 0b01, 0b10, 0b11], 2)
    db_labels = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    q = codes_from_ints([0b00], 2)
    # lex ranking 0,1,2,3; query labels [1,0] -> rel 0,1,1,0 -> (1/2)(1/2 + 2/3)
    m = mean_average_precision(q, np.array([[1, 0]]), db, db_labels)
    assert m == pytest.approx((0.5 + 2 / 3) / 2)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 60))
def test_map_all_matches_sklearn_without_ties(seed, n):
    rng = np.random.default_rng(seed)
    nbits = 12
    values = rng.choice(2**nbits, size=n, replace=False)  # distinct codes -> no ties in lex order
    db = codes_from_ints(values.tolist(), nbits)
    qv = int(rng.integers(0, 2**nbits))
    q = codes_from_ints([qv], nbits)
    labels = rng.integers(0, 3, size=n)
    qlab = int(rng.integers(0, 3))
    y = labels == qlab
    got = mean_average_precision(q, np.array([qlab]), db, labels, k=None)
    if not y.any():
        assert got == 0.0
        return
    score = -(values ^ qv).astype(np.float64)  # higher score = earlier in lex order
    assert got == pytest.approx(average_precision_score(y, score))
    # the (Q, k) relevance form agrees as well
    order = np.argsort(-score, kind="stable")
    assert average_precision_at_k(y[order][None, :])[0] == pytest.approx(got)


def test_map_validation_messages():
    db = codes_from_ints([1, 2, 3], 4)
    q = codes_from_ints([1], 4)
    with pytest.raises(ValueError, match="same model"):
        mean_average_precision(codes_from_ints([1], 5), [0], db, [0, 1, 0])
    with pytest.raises(ValueError, match="same queries"):
        mean_average_precision(q, [0, 1], db, [0, 1, 0])
    with pytest.raises(ValueError, match="positive integer"):
        mean_average_precision(q, [0], db, [0, 1, 0], k=0)
    with pytest.raises(ValueError, match="order only selects"):
        mean_average_precision(q, [0], db, [0, 1, 0], searcher=BruteForceSearcher(db), order="hamming")
    # an order that agrees with the searcher's is accepted
    assert mean_average_precision(
        q, [0], db, [0, 1, 0], searcher=BruteForceSearcher(db, "hamming"), order="hamming"
    ) == mean_average_precision(q, [0], db, [0, 1, 0], order="hamming")
    with pytest.raises(ValueError, match="Codes"):
        mean_average_precision(q.packed, [0], db, [0, 1, 0])


# --------------------------------------------------------------------------------------------
# searchers
# --------------------------------------------------------------------------------------------
@st.composite
def search_cases(draw):
    nbits = draw(st.sampled_from([1, 3, 8, 13, 31, 57, 58, 64, 65, 100, 130]))
    pool = draw(st.integers(1, 6))
    n = draw(st.integers(1, 25))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2, (pool, nbits))
    # mostly duplicates of a few codes plus some near-duplicates: many ties of both kinds
    bits = base[rng.integers(0, pool, n)]
    flip = rng.random((n, nbits)) < draw(st.sampled_from([0.0, 0.05, 0.5]))
    bits = bits ^ flip
    qbits = base[rng.integers(0, pool, 4)] ^ (rng.random((4, nbits)) < 0.1)
    ids = None
    kind = draw(st.sampled_from(["none", "perm", "dups"]))
    if kind == "perm":
        ids = rng.permutation(n) * 3 + 7
    elif kind == "dups":
        ids = rng.integers(0, 4, n)
    k = draw(st.sampled_from([None, 1, 2, 5, n, n + 3]))
    return Codes.from_bits(qbits), Codes.from_bits(bits), ids, k


@settings(max_examples=150, deadline=None)
@given(case=search_cases(), order=st.sampled_from(["lex", "hamming"]))
def test_bruteforce_searcher_equals_codes_rank(case, order):
    q, db, ids, k = case
    got = BruteForceSearcher(db, order=order, ids=ids).search(q, k)
    want = rank(q, db, k, order=order, ids=ids)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def test_bruteforce_searcher_is_a_searcher_and_fast_enough():
    rng = np.random.default_rng(0)
    db = Codes.from_bits(rng.integers(0, 2, (10_000, 32)))
    q = Codes.from_bits(rng.integers(0, 2, (200, 32)))
    s = BruteForceSearcher(db, order="hamming")
    assert isinstance(s, Searcher)
    out = s.search(q, 100)
    assert out.shape == (200, 100)
    np.testing.assert_array_equal(out[:5], rank(q[:5], db, 100, order="hamming"))


def test_custom_searcher_with_ids_and_padding():
    db = codes_from_ints([0b00, 0b01, 0b10, 0b11], 2)
    db_ids = np.array([40, 10, 30, 20])
    labels = np.array([1, 1, 0, 1])

    class IdSearcher:
        """Returns ids instead of positions, and only 3 of k results padded with -1."""

        def search(self, query, k):
            pos = rank(query, db, k)
            out = db_ids[pos]
            out[:, 3:] = -1
            return out

    q = codes_from_ints([0b00], 2)
    # ranking positions 0,1,2,(3 dropped) -> rel 1,1,0 -> AP = 1
    m = mean_average_precision(q, [1], None, labels, searcher=IdSearcher(), db_ids=db_ids)
    assert m == pytest.approx(1.0)
    p = precision_at_k(q, [1], None, labels, ks=[1, 3, 4], searcher=IdSearcher(), db_ids=db_ids)
    np.testing.assert_allclose(p, [1.0, 2 / 3, 2 / 4])
    with pytest.raises(ValueError, match="db_ids"):
        mean_average_precision(q, [1], None, labels, searcher=IdSearcher())

    class Dup:
        def search(self, query, k):
            return np.zeros((len(query), 2), dtype=np.int64)

    with pytest.raises(ValueError, match="twice"):
        mean_average_precision(q, [1], None, labels, searcher=Dup())


# --------------------------------------------------------------------------------------------
# P@k, recall@k
# --------------------------------------------------------------------------------------------
def test_precision_and_recall_at_k_hand_computed():
    db = codes_from_ints([0, 1, 2, 3, 4], 3)
    labels = np.array([1, 0, 1, 1, 0])
    q = codes_from_ints([0, 0], 3)
    ql = np.array([1, 9])  # the second query has no relevant item at all
    # lex ranking of both: 0,1,2,3,4 -> rel for q0: 1,0,1,1,0
    p = precision_at_k(q, ql, db, labels, ks=[1, 2, 4, 10])
    np.testing.assert_allclose(p, [(1 + 0) / 2, (0.5 + 0) / 2, (0.75 + 0) / 2, (0.3 + 0) / 2])
    r = recall_at_k(q, ql, db, labels, ks=[1, 3, 4])
    np.testing.assert_allclose(r, [(1 / 3) / 2, (2 / 3) / 2, 1.0 / 2])


def test_precision_recall_at_k_vs_brute_force():
    rng = np.random.default_rng(3)
    db = Codes.from_bits(rng.integers(0, 2, (80, 10)))
    q = Codes.from_bits(rng.integers(0, 2, (15, 10)))
    dl, ql = rng.integers(0, 4, 80), rng.integers(0, 5, 15)
    ks = [1, 5, 17, 80]
    for order in ("lex", "hamming"):
        rel = relevance(ql, dl)[np.arange(15)[:, None], rank(q, db, order=order)]
        p = precision_at_k(q, ql, db, dl, ks=ks, order=order)
        r = recall_at_k(q, ql, db, dl, ks=ks, order=order)
        tot = rel.sum(axis=1)
        for i, k in enumerate(ks):
            assert p[i] == pytest.approx(rel[:, :k].sum(axis=1).mean() / k)
            want = np.where(tot > 0, rel[:, :k].sum(axis=1) / np.maximum(tot, 1), 0).mean()
            assert r[i] == pytest.approx(want)


# --------------------------------------------------------------------------------------------
# Hamming radius
# --------------------------------------------------------------------------------------------
def test_precision_within_radius_hand_computed():
    db = codes_from_ints([0b0000, 0b0001, 0b0011, 0b0111, 0b1111], 4)
    labels = np.array([0, 1, 0, 0, 0])
    q = codes_from_ints([0b0000, 0b1100], 4)
    # q0: ball r=2 = {0000, 0001, 0011}; class 0 -> 2/3.
    # q1 (1100): distances 2,3,4,3,2 -> ball {0000, 1111}, class 1 -> 0/2.
    res = precision_within_radius(q, np.array([0, 1]), db, labels, r=2)
    assert res.precision == pytest.approx((2 / 3 + 0) / 2)
    assert res.empty_fraction == 0.0
    # r=0: q0 ball {0000} -> 1; q1 empty ball -> scores 0, counted
    res0 = precision_within_radius(q, np.array([0, 1]), db, labels, r=0)
    assert res0.precision == pytest.approx(0.5)
    assert res0.empty_fraction == 0.5


def test_radius_metrics_vs_brute_force():
    rng = np.random.default_rng(7)
    nbits = 9
    db = Codes.from_bits(rng.integers(0, 2, (70, nbits)))
    q = Codes.from_bits(rng.integers(0, 2, (12, nbits)))
    dl, ql = rng.integers(0, 3, 70), rng.integers(0, 4, 12)
    dist = hamming_distance(q, db)
    rel = ql[:, None] == dl[None, :]
    pr = precision_recall_by_radius(q, ql, db, dl)
    assert pr.radius.tolist() == list(range(nbits + 1))
    for r in range(nbits + 1):
        precs, recs, empties = [], [], 0
        for i in range(12):
            ball = dist[i] <= r
            nrel = rel[i].sum()
            precs.append(rel[i][ball].sum() / ball.sum() if ball.any() else 0.0)
            recs.append(rel[i][ball].sum() / nrel if nrel else 0.0)
            empties += not ball.any()
        assert pr.precision[r] == pytest.approx(np.mean(precs))
        assert pr.recall[r] == pytest.approx(np.mean(recs))
        assert pr.empty_fraction[r] == pytest.approx(empties / 12)
        pw = precision_within_radius(q, ql, db, dl, r=r)
        assert pw.precision == pytest.approx(np.mean(precs))
    n, rr = hamming_counts(q, ql, db, dl)
    for i in range(12):
        assert n[i].tolist() == np.bincount(dist[i], minlength=nbits + 1).tolist()
        assert rr[i].tolist() == np.bincount(dist[i][rel[i]], minlength=nbits + 1).tolist()


# --------------------------------------------------------------------------------------------
# tie-aware AP
# --------------------------------------------------------------------------------------------
def brute_tie_ap(n_groups, r_groups, k=None):
    """Mean AP@k over every ordering of the items inside each tie group."""
    groups = [[1] * r + [0] * (n - r) for n, r in zip(n_groups, r_groups)]
    total = sum(n_groups)
    kk = total if k is None else min(k, total)
    aps = []
    for perms in itertools.product(*[itertools.permutations(g) for g in groups]):
        flags = np.array([f for p in perms for f in p], dtype=bool)[:kk]
        aps.append(average_precision_at_k(flags[None, :])[0])
    return float(np.mean(aps))


@pytest.mark.parametrize(
    "n_groups,r_groups",
    [
        ([3, 2, 2], [1, 1, 2]),
        ([4, 3], [2, 1]),
        ([1, 5, 1], [1, 2, 0]),
        ([2, 0, 3, 2], [0, 0, 2, 1]),
        ([6], [3]),
        ([2, 2, 2], [0, 0, 0]),
        ([1, 1, 1, 1], [1, 0, 1, 0]),  # no ties: equals the ordinary AP
    ],
)
def test_tie_aware_ap_equals_mean_over_all_tie_orderings(n_groups, r_groups):
    n = np.array([n_groups])
    r = np.array([r_groups])
    for k in [None] + list(range(1, sum(n_groups) + 2)):
        got = expected_average_precision(n, r, k)[0]
        assert got == pytest.approx(brute_tie_ap(n_groups, r_groups, k), abs=1e-12), k


@settings(max_examples=30, deadline=None)
@given(
    groups=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=4),
    k=st.one_of(st.none(), st.integers(1, 10)),
)
def test_tie_aware_ap_random_groups(groups, k):
    n_groups = [a + b for a, b in groups]
    r_groups = [a for a, _ in groups]
    if sum(n_groups) == 0 or sum(n_groups) > 8:
        return
    got = expected_average_precision(np.array([n_groups]), np.array([r_groups]), k)[0]
    assert got == pytest.approx(brute_tie_ap(n_groups, r_groups, k), abs=1e-12)


def test_tie_aware_map_from_codes_vs_brute_force():
    rng = np.random.default_rng(11)
    nbits = 3
    db = Codes.from_bits(rng.integers(0, 2, (7, nbits)))
    q = Codes.from_bits(rng.integers(0, 2, (4, nbits)))
    dl, ql = rng.integers(0, 2, 7), rng.integers(0, 2, 4)
    dist = hamming_distance(q, db)
    rel = ql[:, None] == dl[None, :]
    for k in (None, 1, 3, 5):
        want = []
        for i in range(4):
            n = np.bincount(dist[i], minlength=nbits + 1)
            r = np.bincount(dist[i][rel[i]], minlength=nbits + 1)
            want.append(brute_tie_ap(n.tolist(), r.tolist(), k))
        got = tie_aware_average_precisions(q, ql, db, dl, k=k)
        np.testing.assert_allclose(got, want, atol=1e-12)
        assert tie_aware_average_precision(q, ql, db, dl, k=k) == pytest.approx(np.mean(want))


def test_tie_aware_equals_hamming_map_without_ties_and_is_order_free():
    # distinct Hamming distances from the query: no ties, so tie-aware = deterministic AP
    db = codes_from_ints([0b0000, 0b0001, 0b0011, 0b0111, 0b1111], 4)
    labels = np.array([1, 0, 1, 1, 0])
    q = codes_from_ints([0b0000], 4)
    for k in (None, 2, 4):
        det = mean_average_precision(q, [1], db, labels, k=k, order="hamming")
        assert tie_aware_average_precision(q, [1], db, labels, k=k) == pytest.approx(det)
    # shuffling the database never changes the tie-aware figure
    rng = np.random.default_rng(5)
    db2 = Codes.from_bits(rng.integers(0, 2, (60, 6)))
    l2 = rng.integers(0, 3, 60)
    q2 = Codes.from_bits(rng.integers(0, 2, (10, 6)))
    ql2 = rng.integers(0, 3, 10)
    perm = rng.permutation(60)
    for k in (None, 10):
        a = tie_aware_average_precision(q2, ql2, db2, l2, k=k)
        b = tie_aware_average_precision(q2, ql2, db2[perm], l2[perm], k=k)
        assert a == pytest.approx(b, abs=1e-12)


# --------------------------------------------------------------------------------------------
# coverage
# --------------------------------------------------------------------------------------------
def test_coverage_all_equal_codes():
    c = codes_from_ints([5] * 8, 4)
    assert code_entropy(c) == 0.0
    assert unique_ratio(c) == pytest.approx(100 / 8)
    assert average_collision_count(c) == pytest.approx(7.0)
    np.testing.assert_allclose(prefix_entropy(c), np.zeros(4))
    np.testing.assert_allclose(prefix_balance(c), np.zeros(4))
    sizes, buckets = bucket_size_histogram(c)
    assert sizes.tolist() == [8] and buckets.tolist() == [1]
    np.testing.assert_allclose(bit_balance(c), [0, 1, 0, 1])


def test_coverage_all_distinct_codes():
    c = codes_from_ints(list(range(8)), 3)  # every 3-bit code once
    assert code_entropy(c) == pytest.approx(3.0)
    assert unique_ratio(c) == 100.0
    assert average_collision_count(c) == 0.0
    np.testing.assert_allclose(prefix_entropy(c), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(prefix_balance(c), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(bit_balance(c), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(bit_correlation(c), np.eye(3), atol=1e-12)
    sizes, buckets = bucket_size_histogram(c)
    assert sizes.tolist() == [1] and buckets.tolist() == [8]


def test_coverage_mixed_and_prefix():
    # 4-bit codes; buckets: 0000 x2, 0001 x1, 1000 x1
    c = codes_from_ints([0b0000, 0b1000, 0b0000, 0b0001], 4)
    assert code_entropy(c) == pytest.approx(1.5)
    assert unique_ratio(c) == pytest.approx(75.0)
    assert average_collision_count(c) == pytest.approx((4 + 1 + 1) / 4 - 1)
    # depth 1: {0:3, 1:1}; depths 2-3 same; depth 4: {2,1,1}
    h1 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    np.testing.assert_allclose(prefix_entropy(c), [h1, h1, h1, 1.5])
    np.testing.assert_allclose(prefix_balance(c), [h1, h1 / 2, h1 / 2, 1.5 / 2])
    sizes, buckets = bucket_size_histogram(c)
    assert sizes.tolist() == [1, 2] and buckets.tolist() == [2, 1]


def test_bit_correlation_known():
    bits = np.array([[0, 0, 1, 1], [1, 1, 0, 1], [0, 0, 1, 1], [1, 1, 0, 1]])
    corr = bit_correlation(Codes.from_bits(bits))
    assert corr[0, 1] == pytest.approx(1.0)  # identical bits
    assert corr[0, 2] == pytest.approx(-1.0)  # complementary bits
    assert corr[0, 3] == 0.0  # constant bit
    np.testing.assert_allclose(np.diag(corr), 1.0)


def test_coverage_report_is_json_and_consistent():
    rng = np.random.default_rng(1)
    c = Codes.from_bits(rng.integers(0, 2, (300, 12)))
    rep = coverage_report(c)
    json.dumps(rep)
    assert rep["n"] == 300 and rep["nbits"] == 12
    assert rep["entropy_bits"] == pytest.approx(code_entropy(c))
    assert rep["unique_percent"] == pytest.approx(unique_ratio(c))
    assert rep["average_collision_count"] == pytest.approx(average_collision_count(c))
    assert rep["prefix_entropy"][-1] == pytest.approx(rep["entropy_bits"])
    np.testing.assert_allclose(rep["prefix_balance"], prefix_balance(c))
    assert len(rep["bit_balance"]) == 12
    hist = rep["bucket_size_histogram"]
    assert sum(s * b for s, b in zip(hist["sizes"], hist["buckets"])) == 300
    # entropy against a direct count over distinct rows
    _, counts = np.unique(c.packed, axis=0, return_counts=True)
    p = counts / 300
    assert rep["entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    assert np.all(np.diff(rep["prefix_entropy"]) >= -1e-12)
    with pytest.raises(ValueError, match="at least one"):
        coverage_report(Codes.empty(8))


# --------------------------------------------------------------------------------------------
# robustness
# --------------------------------------------------------------------------------------------
def test_code_retention_hand_computed():
    clean = codes_from_ints([0b1010, 0b1010, 0b0000, 0b1111], 4)
    pert = codes_from_ints([0b1010, 0b1011, 0b0100, 0b0111], 4)
    # common prefixes: 4, 3, 1, 0
    np.testing.assert_allclose(code_retention(clean, pert), [3 / 4, 2 / 4, 2 / 4, 1 / 4])
    np.testing.assert_allclose(bit_flip_rate(clean, pert), [1 / 4, 1 / 4, 0, 1 / 4])
    with pytest.raises(ValueError, match="same order"):
        code_retention(clean, pert[:2])


def test_code_retention_vs_prefix_brute_force():
    rng = np.random.default_rng(2)
    clean = Codes.from_bits(rng.integers(0, 2, (50, 19)))
    bits = clean.to_bits() ^ (rng.random((50, 19)) < 0.05)
    pert = Codes.from_bits(bits)
    ret = code_retention(clean, pert)
    for d in range(1, 20):
        same = np.all(clean.prefix(d).packed == pert.prefix(d).packed, axis=1).mean()
        assert ret[d - 1] == pytest.approx(same)


# --------------------------------------------------------------------------------------------
# run-level
# --------------------------------------------------------------------------------------------
def test_check_overlap():
    assert check_overlap([1, 2, 3], [4, 5]).tolist() == []
    with pytest.raises(ValueError, match="allow=True"):
        check_overlap(["a1", "b2", "c3"], ["c3", "d4"])
    assert check_overlap(["a1", "b2", "c3"], ["c3", "a1"], allow=True).tolist() == [0, 2]
