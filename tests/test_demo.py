"""The main job, end to end, as a newcomer runs it (slow: trains for the default epochs)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_cbir_demo_default_runs_and_scores(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cbir", "demo", "--out", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "demo_report.json").read_text())
    k = report["k"]
    assert report[f"map@{k}_lex"] > 0.8, report
    assert report["coverage"]["n"] == 1497
    assert "mAP@" in out.stdout and "unique codes" in out.stdout
