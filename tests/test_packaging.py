"""Packaging and CLI: one import namespace, every package installed, every command has --help."""

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    # sub-folders of cbir/ that are mapped elsewhere are not part of cbir's own tree
    assert found - listed == set(), "add these packages to [tool.setuptools] packages"
    assert {"cbir", "cbir.indexer", "cbir.server"} <= listed
    assert not any(p.split(".")[0] != "cbir" for p in listed), "one import namespace: cbir.*"


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "cbir.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "demo"):
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", ["train", "demo"])
def test_subcommand_help(cmd):
    out = subprocess.run([sys.executable, "-m", "cbir.cli", cmd, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage:" in out.stdout


def test_cli_user_error_is_one_line_not_a_traceback(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbir.cli",
            "train",
            "--dataset",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "error:" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cbir.cli",
            "train",
            "--param",
            "nonsense=1",
            "--epochs",
            "0",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "unknown parameter" in out.stderr


def test_train_list_methods():
    out = subprocess.run(
        [sys.executable, "-m", "cbir.cli", "train", "--list-methods"], capture_output=True, text=True, check=True
    )
    assert "ddtl" in out.stdout and "beta=0.1" in out.stdout
