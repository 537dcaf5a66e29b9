"""The load benchmark runs end to end at a tiny size (slow: starts a server subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_server_small_run(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_server.py"),
            "--n",
            "20000",
            "--requests",
            "60",
            "--duration",
            "2",
            "--image-requests",
            "40",
            "--backbone",
            "convnet",
            "--concurrency",
            "1,4",
            "--image-concurrency",
            "8",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    for needle in (
        "Ping (empty RPC)",
        "Search code LEX",
        "Search code HAM",
        "Search image",
        "raw batched inference",
        "x Ping QPS",
        "x raw inference",
    ):
        assert needle in out.stdout, out.stdout
