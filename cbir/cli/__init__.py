"""The ``cbir`` command line: ``cbir <command> --help`` describes each command.

Each command lives in its own module exposing ``register(subparsers)``; the module adds its
parser and sets ``func`` (called with the parsed namespace, returns an exit code).

Start-up is lazy: :data:`COMMANDS` is a static table of command names, their modules and a
one-line help, so ``cbir --help`` imports no command module and ``cbir <command>`` imports only
that command's module (``cbir search`` and ``cbir --help`` never import torch).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (command, module defining it, one-line help for `cbir --help`), in the order --help lists them.
COMMANDS = [
    ("train", "cbir.cli.train_cmd", "train a hashing model"),
    ("demo", "cbir.cli.demo_cmd", "train, encode, search and score on an embedded dataset"),
    ("serve", "cbir.cli.serve_cmd", "serve an index over gRPC (cbir.v1.SearchService, health, reflection)"),
    ("search", "cbir.cli.search_cmd", "query a cbir gRPC server"),
    ("bench", "cbir.cli.bench_cmd", "retrieval / coverage / robustness report of a model (or compare models)"),
    ("index", "cbir.cli.index_cmd", "build an on-disk index / print index statistics"),
    ("export", "cbir.cli.export_cmd", "export a trained hasher (TorchScript / ONNX)"),
]
COMMAND_MODULES = [module for _, module, _ in COMMANDS]


def _chosen_command(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first argument that is not an option), if any."""
    names = {name for name, _, _ in COMMANDS}
    for a in argv:
        if not a.startswith("-"):
            return a if a in names else None
    return None


def build_parser(argv: list[str] | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The parser; only the command chosen in ``argv`` (every command with ``full``) gets its real
    sub-parser, built by importing its module; the others are listed by name and help alone."""
    parser = argparse.ArgumentParser(
        prog="cbir",
        description="Content-based image retrieval with deep, ordered binary hash codes.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = _chosen_command(list(sys.argv[1:] if argv is None else argv))
    for name, module, help_ in COMMANDS:
        if full or name == chosen:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_, add_help=False)
    return parser


def _prog(args) -> str:
    """``cbir index build``: the command and its sub-command (``<family>_command``), if any."""
    sub = getattr(args, f"{args.command}_command", None)
    return " ".join(["cbir", args.command] + ([sub] if sub else []))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
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
