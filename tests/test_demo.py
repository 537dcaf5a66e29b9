"""The main job, end to end, as a newcomer runs it."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

TINY = [
    "--no-progress",
    "--epochs",
    "1",
    "--head-steps",
    "10",
    "--image-size",
    "16",
    "--width",
    "8",
    "--grpc-queries",
    "2",
    "--feature-views",
    "1",
    "--threads",
    "1",
    "--depth",
    "6",
]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_cbir_demo_tiny_run_leads_with_tie_aware_map_and_random_coverage(tmp_path):
    # a real process, as a user runs it: the CLI's logging setup (INFO to stderr) is in force
    r = subprocess.run(
        [sys.executable, "-m", "cbir", "demo", "--out", str(tmp_path), *TINY],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    # no log lines in the terminal (stdout or stderr): the per-RPC and training lines are in demo.log
    terminal = (out + r.stderr).splitlines()
    assert not [line for line in terminal if re.search(r"\b(INFO|DEBUG)\b", line)], terminal
    log = (tmp_path / "demo.log").read_text()
    assert "cbir.server.rpc: rpc method=Search status=OK" in log and "INFO cbir.train: epoch 1" in log
    assert f"log (training and per-RPC server lines): {tmp_path / 'demo.log'}" in out

    report = json.loads((tmp_path / "demo_report.json").read_text())
    k = report["k"]
    assert "two-stage" in report["trained"] and "convnet width 8" in report["trained"]
    assert report["train"]["head_stage"] == ["tree"] and report["train"]["head_steps"] == 10
    # the example: chosen by a stated rule, with the query's class and every hit's class
    ex = report["example"]
    assert ex["rule"] == f"the query with the median lexicographic AP@{k} (ties by database id) of all 300 queries"
    assert f"example: {ex['rule']}" in out
    same = sum(h["same_class"] for h in ex["hits"])
    head = f"query {ex['query']} (class {ex['query_class']}) code "
    assert head in out and f"{same}/5 of its top 5 hits share its class" in out
    hit_lines = [line for line in out.splitlines() if line.lstrip().startswith("id ") and " class " in line]
    assert len(hit_lines) == len(ex["hits"]) == 5
    for line, hit in zip(hit_lines, ex["hits"]):
        assert line.split()[:4] == ["id", str(hit["id"]), "class", hit["class"]], line
        assert ("same class" in line) == hit["same_class"] == (hit["class"] == ex["query_class"]), line
    ap_median = float(re.search(rf"AP@{k} ([0-9.]+) \(mAP", out).group(1))
    assert abs(ap_median - ex[f"ap@{k}_lex"]) < 1e-4

    scores = out[out.index("tie-aware mAP@") :]
    lines = scores.splitlines()
    assert lines[0].strip().startswith(f"tie-aware mAP@{k} (lexicographic)")
    assert lines[1].strip().startswith(f"tie-aware mAP@{k} (Hamming)")
    assert lines[2].strip().startswith(f"id-order  mAP@{k} (lexicographic)")
    assert "uniformly random codes" in scores and "ratio" in scores
    cov = report["coverage"]
    assert cov["n"] == 1497 and cov["random_fixed_bits"] == 4
    assert 0 < cov["random_unique_percent"] <= 100
    assert 0 <= report[f"tie_map@{k}_lex"] <= 1


def test_median_ap_query_is_the_median_not_the_first():
    from cbir.cli.demo_cmd import _median_ap_query
    from cbir.codes import Codes
    from cbir.evaluate import EncodedProtocol
    from cbir.metrics import average_precisions

    db = Codes.from_bits(np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=bool))
    q = Codes.from_bits(np.array([[0, 0], [1, 1], [0, 1], [1, 0], [0, 0]], dtype=bool))
    db_labels, q_labels = np.array([0, 0, 1, 1]), np.array([1, 1, 0, 1, 0])
    enc = EncodedProtocol(db, np.ones((4, 2)), db_labels, np.arange(4), q, np.ones((5, 2)), q_labels, np.arange(5), 0)
    aps = average_precisions(q, q_labels, db, db_labels, 4, order="lex", db_ids=np.arange(4))
    ex = _median_ap_query(enc, 4)
    assert len(set(aps.round(6))) > 1 and aps[0] != np.median(aps)  # the first query is not typical
    assert ex["ap"] == np.sort(aps)[2] and aps[ex["position"]] == ex["ap"]
    assert (aps < ex["ap"]).sum() <= 2 <= (aps <= ex["ap"]).sum() - 1
    assert ex["rule"].startswith("the query with the median lexicographic AP@4") and ex["n"] == 5


@pytest.mark.parametrize("value", ["0", "-1"])
def test_demo_k_below_one_is_refused_naming_the_flag(value, capsys):
    from cbir.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "-k", value, "--out", "unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument -k/--k: must be >= 1, got {value}" in err


@pytest.mark.slow
def test_cbir_demo_default_runs_and_scores(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cbir", "demo", "--out", str(tmp_path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "demo_report.json").read_text())
    k = report["k"]
    assert report[f"tie_map@{k}_lex"] > 0.8, report
    assert report[f"map@{k}_lex"] > 0.8, report
    assert report["coverage"]["n"] == 1497
    assert "tie-aware mAP@" in out.stdout and "unique codes" in out.stdout
