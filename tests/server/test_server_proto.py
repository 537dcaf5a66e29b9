"""The committed stubs in cbir/v1 are exactly what grpcio-tools generates from proto/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cbir.server import gen_proto


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) not installed")
    from importlib.metadata import version

    committed = gen_proto.generated_files()
    names = {p.name for p in committed}
    assert {"search_pb2.py", "search_pb2.pyi", "search_pb2_grpc.py"} <= names
    grpc_file = Path(gen_proto.REPO_ROOT, "cbir", "v1", "search_pb2_grpc.py").read_text()
    made_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_file).group(1)
    have = version("grpcio-tools")
    if have != made_with:
        pytest.skip(f"stubs were generated with grpcio-tools {made_with}, this is {have}")
    fresh = {p.name: p.read_bytes() for p in gen_proto.generate(tmp_path)}
    assert set(fresh) == names
    for p in committed:
        assert fresh[p.name] == p.read_bytes(), f"cbir/v1/{p.name} is stale: run python -m cbir.server.gen_proto"
    assert gen_proto.diff() == []
    del grpc_tools


def test_stubs_import_and_describe_the_service():
    from cbir.v1 import search_pb2, search_pb2_grpc

    svc = search_pb2.DESCRIPTOR.services_by_name["SearchService"]
    assert svc.full_name == "cbir.v1.SearchService"
    assert {m.name for m in svc.methods} == {"Search", "BatchSearch", "Add", "Delete", "GetStats", "GetCode", "Ping"}
    assert set(search_pb2.SearchMode.keys()) == {"LEXICOGRAPHIC", "HAMMING", "HYBRID", "PREFIX"}
    assert hasattr(search_pb2_grpc, "SearchServiceStub")
