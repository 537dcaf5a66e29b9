"""The ``cbir`` command line: ``cbir <command> --help`` describes each command.

Each command lives in its own module exposing ``register(subparsers)``; the module adds its
parser and sets ``func`` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules defining sub-commands, in the order they are listed by --help.
COMMAND_MODULES = [
    "cbir.cli.train_cmd",
    "cbir.cli.demo_cmd",
    "cbir.cli.serve_cmd",
    "cbir.cli.search_cmd",
    "cbir.cli.bench_cmd",
    "cbir.cli.index_cmd",
    "cbir.cli.export_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbir",
        description="Content-based image retrieval with deep, ordered binary hash codes.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _prog(args) -> str:
    """``cbir index build``: the command and its sub-command (``<family>_command``), if any."""
    sub = getattr(args, f"{args.command}_command", None)
    return " ".join(["cbir", args.command] + ([sub] if sub else []))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:  # user errors: one clear line, no traceback
        print(f"{_prog(args)}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
