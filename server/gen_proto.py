"""Regenerate the committed protobuf/gRPC stubs in ``cbir/v1/`` from ``proto/cbir/v1/*.proto``.

Usage: ``python -m cbir.server.gen_proto [--out DIR] [--check]``.

``--out`` writes into another root (``DIR/cbir/v1/...``), which the stub test uses to compare
a fresh generation byte for byte with the committed files; ``--check`` does exactly that and
exits 1 on any difference. Needs ``grpcio-tools`` (a test extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_PACKAGE_DIR = Path("cbir") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto sources, relative to ``proto_root``, sorted."""
    files = sorted((proto_root / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root / PROTO_PACKAGE_DIR}")
    return [f.relative_to(proto_root) for f in files]


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run grpc_tools.protoc; returns the generated files (under ``out_root/cbir/v1``)."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # lazily: only a test/dev dependency

    out_root = Path(out_root)
    (out_root / PROTO_PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in proto_files(proto_root)],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    return generated_files(out_root)


def generated_files(root: Path = REPO_ROOT) -> list[Path]:
    d = Path(root) / PROTO_PACKAGE_DIR
    return sorted(p for p in d.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def diff(committed_root: Path = REPO_ROOT) -> list[str]:
    """Names of generated files that differ from (or are missing in) ``committed_root``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in generate(Path(tmp))}
    committed = {p.name: p.read_bytes() for p in generated_files(committed_root)}
    return sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cbir.server.gen_proto", description=__doc__)
    ap.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repo)")
    ap.add_argument("--check", action="store_true", help="only compare with the committed stubs")
    args = ap.parse_args(argv)
    if args.check:
        bad = diff()
        for name in bad:
            print(f"stale generated stub: cbir/v1/{name}", file=sys.stderr)
        return 1 if bad else 0
    for p in generate(args.out):
        print(p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
