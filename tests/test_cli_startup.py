"""``cbir --help``, ``cbir search`` and ``import cbir.client`` start without torch/torchvision
(issue 14 item 6): checked in fresh interpreters with ``-X importtime``."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision")


def _imported(args: list[str]) -> tuple[set[str], subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    mods = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return mods, proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "cbir.cli", "--help"],
        ["-m", "cbir.cli", "search", "--help"],
        ["-c", "import cbir.client"],
    ],
)
def test_no_torch_on_the_client_paths(args):
    mods, proc = _imported(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cbir" in mods  # the importtime listing was read
    assert not mods & set(HEAVY), f"{args} imported {sorted(mods & set(HEAVY))}"


def test_cbir_search_runs_without_torch():
    """A real ``cbir search`` call (no server listening: UNAVAILABLE after the client's retries)."""
    mods, proc = _imported(
        ["-m", "cbir.cli", "search", "--address", f"127.0.0.1:{_free_port()}", "--id", "1", "--timeout", "2"]
    )
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr
    assert "grpc" in mods and not mods & set(HEAVY)


def test_static_command_table_matches_the_modules():
    """The help listed without importing a module is the module's own, for every command."""
    from cbir.cli import COMMANDS, build_parser

    parser = build_parser([], full=True)
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert list(sub.choices) == [name for name, _, _ in COMMANDS]
    assert helps == {name: help_ for name, _, help_ in COMMANDS}
    # the lazy parser of one command parses exactly like the full one
    lazy = build_parser(["search", "--id", "3"]).parse_args(["search", "--id", "3", "-k", "4"])
    full = parser.parse_args(["search", "--id", "3", "-k", "4"])
    assert {k: v for k, v in vars(lazy).items() if k != "func"} == {k: v for k, v in vars(full).items() if k != "func"}
