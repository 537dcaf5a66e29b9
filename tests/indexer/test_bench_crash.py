"""The crash benchmark itself (real SIGKILLs of real build and writer processes): a short run
finds every killed index consistent and says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_crash_short_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_crash.py"), "--builds", "2", "--writes", "2",
         "--n", "20000", "--write-n", "5000", "--batches", "4", "--batch-size", "500", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "builds: 2/2 consistent" in p.stdout and "writes: 2/2 consistent" in p.stdout
    assert list(tmp_path.iterdir()) == []  # (its scratch directory removed)
