"""Ensemble t-test confidence, IDK and hardness against scipy and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cbir.uncertainty import (
    DEFAULT_TAU,
    bit_agreement,
    class_decision,
    decide,
    majority_bits,
    one_vs_rest,
    ttest_confidence,
)


def test_confidence_equals_scipy_ttest_1samp():
    rng = np.random.default_rng(0)
    for e in (2, 3, 5, 10):
        o = rng.normal(rng.normal(0, 2, (40, 3)), 1.0, (e, 40, 3))
        res = stats.ttest_1samp(o, 0.0, axis=0)
        want = -np.sign(o.mean(axis=0)) * np.log(res.pvalue)
        np.testing.assert_allclose(ttest_confidence(o), want, rtol=1e-9, atol=1e-12)


def test_confidence_hand_computed():
    # O = (1, 2, 3): mean 2, S = 1, t = 2 / (1/sqrt 3) = 2 sqrt 3, df = 2
    t = 2 * np.sqrt(3)
    p = 2 * stats.t.sf(t, 2)
    assert ttest_confidence(np.array([1.0, 2.0, 3.0])) == pytest.approx(-np.log(p))
    assert ttest_confidence(np.array([-1.0, -2.0, -3.0])) == pytest.approx(np.log(p))
    # the members dispute: mean 0 -> p = 1 -> confidence 0
    assert ttest_confidence(np.array([-1.0, 1.0])) == 0.0


def test_confidence_edge_cases_are_finite():
    same = np.array([[2.0, 0.0, -2.0]] * 4)  # identical members: S = 0
    c = ttest_confidence(same)
    assert c[0] > 100 and c[1] == 0.0 and c[2] < -100 and np.isfinite(c).all()
    tiny = np.array([50.0, 50.1, 49.9, 50.05])  # p far below double precision in linear space
    assert 20 < ttest_confidence(tiny) < 700
    with pytest.raises(ValueError, match="at least 2 ensemble members"):
        ttest_confidence(np.ones((1, 3)))


def test_decide_thresholds():
    conf = np.array([-5.0, -DEFAULT_TAU, 0.0, DEFAULT_TAU + 1e-9, 9.0])
    assert decide(conf).tolist() == [-1, 0, 0, 1, 1]
    assert decide(conf, tau=1.0, tau_neg=-10.0).tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="tau_neg <= tau"):
        decide(conf, tau=-1.0)


def test_one_vs_rest_is_log_odds():
    z = np.random.default_rng(1).normal(size=(6, 4))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(one_vs_rest(z), np.log(p / (1 - p)), rtol=1e-10)


def test_class_decision_easy_and_hard():
    # 5 members, 3 instances, 3 classes: instance 0 all say class 1; instance 1 split 0 vs 2;
    # instance 2 all say "no class more likely than not" (flat logits): every class is in the set
    e = 5
    z = np.zeros((e, 3, 3))
    z[:, 0] = [0.0, 6.0, 0.0]
    z[:, 0] += np.random.default_rng(0).normal(0, 0.1, (e, 3))
    z[:3, 1] = [5.0, 0.0, 0.0]
    z[3:, 1] = [0.0, 0.0, 5.0]
    z[:, 2] = 0.0
    d = class_decision(z)
    assert d.idk.tolist() == [False, True, True]
    assert d.sets()[0] == [1] and d.predicted[0] == 1
    assert sorted(d.sets()[1]) == [0, 2] and sorted(d.sets()[2]) == [0, 1, 2]
    assert d.hardness[0] < 0.1 and d.hardness[1] > d.hardness[0]


def test_bit_agreement_and_majority():
    bits = np.array([[[1, 0, 1, 1]], [[1, 1, 0, 1]], [[1, 0, 0, 0]], [[1, 1, 1, 0]]])  # E=4, N=1, B=4
    np.testing.assert_allclose(bit_agreement(bits), [[1.0, 0.5, 0.5, 0.5]])
    assert majority_bits(bits).tolist() == [[True, False, True, True]]  # ties follow member 0
    assert majority_bits(bits, primary=2).tolist() == [[True, False, False, False]]
