"""``cbir bench`` on an ensemble: the hardness section (groups, tie-aware mAP per group,
risk-coverage PNG, prediction-set probing on the IDK queries) on a tiny ensemble."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cbir import metrics as M
from cbir.bench.hardness import hardness_groups, risk_coverage
from cbir.cli import main
from cbir.ensemble import EnsembleHasher
from cbir.models.hasher import Hasher
from cbir.models.registry import MethodSpec, create_method, resolve_params


def _member(seed):
    torch.manual_seed(seed)
    spec = MethodSpec(
        backbone="convnet",
        num_classes=10,
        nbits=None,
        depth=4,
        class_names=tuple(str(i) for i in range(10)),
        backbone_kwargs=(("width", 8),),
    )
    params = resolve_params("ddtl", None)
    return Hasher(create_method("ddtl", spec, params), "ddtl", spec, params, image_size=32, device="cpu")


@pytest.fixture(scope="module")
def ensemble_path(tmp_path_factory):
    """3 random-init members; the margin is the median gap between the two most confident
    classes on digits queries, so about half the queries are IDK."""
    from cbir.data import load_dataset

    ens = EnsembleHasher([_member(s) for s in (0, 1, 2)], "seed")
    conf = ens.encode_imageset_decisions(load_dataset("digits").query)[3].confidence
    srt = np.sort(conf, axis=1)
    ens = EnsembleHasher(ens.members, "seed", margin=float(np.median(srt[:, -1] - srt[:, -2])))
    return ens.save(tmp_path_factory.mktemp("ens") / "ens.pt")


def _bench(path, out, *extra) -> dict:
    args = ["bench", "--model", str(path), "--dataset", "digits", "--no-robustness", "--k", "100"]
    assert main([*args, "--limit-database", "600", "--no-progress", "--out", str(out), *extra]) == 0
    return json.loads((out / "report.json").read_text())


def test_bench_hardness_section(tmp_path, ensemble_path, capsys):
    rep = _bench(ensemble_path, tmp_path / "b")
    h = rep["hardness"]
    assert h["members"] == 3 and h["k"] == 100
    fr = h["fractions"]
    assert set(fr) == {"easy", "hard", "idk"} and abs(sum(fr.values()) - 1.0) < 1e-12
    assert 0.1 < fr["idk"] < 0.9
    n = rep["data"]["query_size"]
    assert sum(h["counts"][g] for g in ("easy", "hard", "idk")) == n
    # the groups' mAPs average to the overall figure; at coverage 1.0 the curve is the overall mAP
    for order in ("lex", "hamming"):
        overall = rep["retrieval"]["tie_aware_map_at_k"][order]
        assert h["tie_aware_map_at_k_all"][order] == pytest.approx(overall, abs=1e-12)
        rc = h["risk_coverage"][order]
        assert rc["coverage"][-1] == 1.0 and rc["map"][-1] == pytest.approx(overall, abs=1e-12)
        parts = [(h["counts"][g], h["tie_aware_map_at_k"][g][order]) for g in ("easy", "hard", "idk")]
        assert sum(c * m for c, m in parts if c) / n == pytest.approx(overall, abs=1e-12)
    # the plot and the Markdown section exist
    assert (tmp_path / "b" / "risk_coverage.png").stat().st_size > 1000
    assert "risk_coverage.png" in rep["files"]["plots"]
    md = (tmp_path / "b" / "report.md").read_text()
    assert "## Hardness" in md and "prediction set" in md
    p = h["probing"]
    assert p["queries"] == h["counts"]["idk"] and p["mean_set_size"] >= 2
    assert p["latency_ratio"] > 0 and p["latency_ratio_top2"] > 0
    assert "hardness" in capsys.readouterr().out


def test_bench_probing_recall_matches_brute_force(tmp_path, ensemble_path):
    """recall_plain is recall@k of the engine's lex order (cbir.metrics, ids = positions) on the
    idk queries; the prediction-set recall is that of a brute-force union of their subtrees."""
    from cbir.bench import BenchConfig, load_bench_data

    rep = _bench(ensemble_path, tmp_path / "b", "--no-plots")
    assert "## Hardness" in (tmp_path / "b" / "report.md").read_text()
    assert "risk_coverage.png" not in (tmp_path / "b" / "report.md").read_text()
    ens = Hasher.load(ensemble_path, device="cpu")
    cfg = BenchConfig(model=str(ensemble_path), dataset="digits", k=100, limit_database=600, robustness=False)
    data = load_bench_data(cfg, ens.image_size)
    qc, _, qi, dec = ens.encode_imageset_decisions(data.query)
    dc, _, di = ens.encode_imageset(data.database)
    ql, dl = data.query_labels[qi], data.db_labels[di]
    idk = hardness_groups(dec)["idk"]
    assert idk.sum() == rep["hardness"]["counts"]["idk"]
    want = M.recall_at_k(qc[np.flatnonzero(idk)], ql[idk], dc, dl, [100], order="lex")[0]
    p = rep["hardness"]["probing"]
    assert p["recall_plain"] == pytest.approx(float(want), abs=1e-12)
    cb = ens.layout.class_bits
    dbits, qbits = dc.to_bits(), qc.to_bits()
    dcls = (dbits[:, :cb] * (1 << np.arange(cb - 1, -1, -1))).sum(axis=1)
    rec, rec_filled = [], []
    weights = 1 << np.arange(dbits.shape[1] - 1, -1, -1)
    for i, s in zip(np.flatnonzero(idk), [dec.sets()[j] for j in np.flatnonzero(idk)]):
        sel = np.flatnonzero(np.isin(dcls, s))
        xor = ((dbits[sel, cb:] ^ qbits[i, cb:]) * weights[cb:]).sum(axis=1)
        crank = np.array([s.index(c) for c in dcls[sel]])
        top = sel[np.lexsort((sel, crank, xor))][:100]
        rec.append((dl[top] == ql[i]).sum() / (dl == ql[i]).sum())
        # filled: then the other items in the plain lex order of the query code (XOR, then id)
        rest = np.flatnonzero(~np.isin(dcls, s))
        full = ((dbits[rest] ^ qbits[i]) * weights).sum(axis=1)
        filled = np.concatenate([top, rest[np.lexsort((rest, full))]])[:100]
        rec_filled.append((dl[filled] == ql[i]).sum() / (dl == ql[i]).sum())
    assert p["recall_set_only"] == pytest.approx(float(np.mean(rec)), abs=1e-12)
    assert p["recall_prediction_set"] == pytest.approx(float(np.mean(rec_filled)), abs=1e-12)
    assert p["mean_returned"]["full_set"] == 100 and p["mean_returned"]["plain"] == 100
    lo, hi = p["recall_gain_ci95"]  # a bootstrap interval of the paired per-query differences
    assert lo <= p["recall_gain"] <= hi


def test_gain_interval_is_the_paired_bootstrap_of_the_mean():
    """Percentile bootstrap of the mean difference: for many queries it is close to the normal
    interval mean +- 1.96 s / sqrt(n); seeded; degenerate and tiny inputs handled."""
    from cbir.bench.hardness import gain_interval

    diff = np.random.default_rng(1).normal(0.15, 0.3, 400)
    lo, hi = gain_interval(diff)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert lo < diff.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(diff.mean(), abs=0.1 * half)
    assert gain_interval(diff) == [lo, hi]  # seeded
    assert gain_interval(diff, seed=2) != [lo, hi]
    assert gain_interval(np.full(5, 0.25)) == [0.25, 0.25]
    assert gain_interval(np.array([0.3])) is None and gain_interval(np.zeros(0)) is None


def test_single_model_has_no_hardness_section(tmp_path):
    path = _member(0).save(tmp_path / "one.pt")
    rep = _bench(path, tmp_path / "b")
    assert rep["hardness"] is None and not (tmp_path / "b" / "risk_coverage.png").exists()


def test_risk_coverage_orders_by_confidence():
    ap = np.array([0.1, 0.9, 0.5, 0.7])
    hard = np.array([0.9, 0.1, 0.5, 0.1])  # most confident: rows 1 and 3 (tie: by position), then 2, 0
    rc = risk_coverage(ap, hard)
    assert rc["coverage"] == [0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(rc["map"], [0.9, 0.8, 0.7, 0.55])
    assert risk_coverage(np.zeros(0), np.zeros(0))["coverage"] == []


def test_bench_probing_through_an_index_equals_the_encoded_database(tmp_path, ensemble_path):
    """With --index the probing runs on that index (ids mapped to database rows): same figures."""
    assert (
        main(["index", "build", "--model", str(ensemble_path), "--dataset", "digits", "--out", str(tmp_path / "ix")])
        == 0
    )
    common = ["bench", "--model", str(ensemble_path), "--dataset", "digits", "--no-robustness", "--k", "100"]
    common += ["--no-plots", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--index", str(tmp_path / "ix"), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "report.json").read_text())["hardness"] for d in ("a", "b"))
    assert b["probing"]["index"] == str(tmp_path / "ix") and a["probing"]["index"].startswith("temporary")
    for key in ("queries", "recall_plain", "recall_prediction_set", "recall_top2"):
        assert a["probing"][key] == b["probing"][key], key
    assert a["fractions"] == b["fractions"]
