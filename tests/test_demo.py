"""The main job, end to end, as a newcomer runs it."""

import json
import subprocess
import sys

import pytest


def test_cbir_demo_tiny_run_leads_with_tie_aware_map_and_random_coverage(tmp_path, capsys):
    from cbir.cli import main

    rc = main(
        [
            "demo",
            "--out",
            str(tmp_path),
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
    )
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    report = json.loads((tmp_path / "demo_report.json").read_text())
    k = report["k"]
    assert "two-stage" in report["trained"] and "convnet width 8" in report["trained"]
    assert report["train"]["head_stage"] == ["tree"] and report["train"]["head_steps"] == 10
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
