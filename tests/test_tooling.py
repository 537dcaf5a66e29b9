"""The type checker is configured and clean: ``mypy`` (from the repository root, configured by
``[tool.mypy]`` in pyproject.toml) exits 0 on the modules listed there — the same command as
CONTRIBUTING.md's Checks block."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install -e '.[test]')")
def test_mypy_clean(tmp_path):
    # a fresh cache: the result must not depend on what an earlier run left in .mypy_cache
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout
