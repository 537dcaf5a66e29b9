"""``cbir search`` against a real server; ``cbir serve`` as a subprocess (SIGTERM -> clean exit)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbir.cli import main


def test_cbir_search_table(served, dataset, images, tmp_path, capsys):
    ids, codes, metas = dataset
    assert main(["search", "--address", served.address, "--id", str(int(ids[0])), "-k", "5", "--mode", "hamming"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("query code: ") and "(16 bits)" in lines[0]
    assert lines[1].split()[:4] == ["rank", "id", "hamming", "prefix"]
    assert lines[3].split()[1] == str(int(ids[0])) and lines[3].split()[2] == "0"
    assert "item0" in out and lines[-1].startswith("5 hits (hamming)")

    img = tmp_path / "q.png"
    img.write_bytes(images[0])
    assert main(["search", "--address", served.address, "--image", str(img), "-k", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["hits"]) == 3

    hexcode = codes.packed[3].tobytes().hex()
    assert (
        main(
            [
                "search",
                "--address",
                served.address,
                "--code",
                hexcode,
                "-k",
                "2",
                "--mode",
                "prefix",
                "--prefix-bits",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "hits (prefix)" in out


def test_cbir_search_json_keeps_every_field(server_factory, tmp_path, capsys):
    """Every hit carries all its fields, zero values included (the hit with id 0 at rank 0, a
    distance of 0), and integral numbers print as ints (labels ``[0]``, not ``[0.0]``)."""
    from cbir.codes import Codes
    from cbir.indexer import build_index, open_index

    rng = np.random.default_rng(7)
    codes = Codes.from_bits(rng.integers(0, 2, size=(40, 16)).astype(np.uint8))
    ids = np.arange(40, dtype=np.int64)  # id 0 is the query's own item
    metas = [{"labels": [i % 3], "count": 0, "score": 0.5} if i % 5 else {} for i in range(40)]
    reader = open_index(build_index(tmp_path / "ix", ids, codes, meta=metas), readonly=True)
    try:
        server = server_factory(reader, None, writable=False)
        assert main(["search", "--address", server.address, "--id", "0", "-k", "6", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        expected = reader.search_lex(codes[0:1], 6)
    finally:
        reader.close()
    hits = data["hits"]
    assert [h["id"] for h in hits] == expected.ids.tolist() and hits[0]["id"] == 0
    for j, h in enumerate(hits):
        assert set(h) == {"rank", "id", "hamming_distance", "common_prefix_length", "code", "metadata"}, h
        assert h["rank"] == j and type(h["rank"]) is int and type(h["id"]) is int
        assert h["hamming_distance"] == int(expected.distances[j])
        assert h["common_prefix_length"] == int(expected.prefix_lengths[j])
        assert h["code"] == codes.packed[h["id"]].tobytes().hex()
        assert h["metadata"] == metas[h["id"]]
        for v in h["metadata"].get("labels", []):
            assert type(v) is int, h
    assert hits[0]["hamming_distance"] == 0 and hits[0]["common_prefix_length"] == 16
    assert hits[0]["metadata"] == {}  # an item stored without metadata: the key is still there
    assert any(type(h["metadata"].get("count")) is int and h["metadata"]["score"] == 0.5 for h in hits)


def test_cbir_search_errors(served, capsys):
    assert main(["search", "--address", served.address, "--id", "987654321"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["search", "--address", served.address, "--code", "abcdef", "--nbits", "24"]) == 1
    assert "expects 16 bits" in capsys.readouterr().err
    assert main(["search", "--address", served.address, "--code", "zz"]) == 2
    capsys.readouterr()
    assert main(["search", "--address", served.address, "--id", "1000", "-k", "0"]) == 2
    assert "-k must be >= 1" in capsys.readouterr().err


def _read_line_with(proc, needle: str, timeout: float) -> str:
    import selectors
    import time

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    seen = []
    while time.monotonic() < end:
        if not sel.select(timeout=max(0.0, end - time.monotonic())):
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} within {timeout}s; got {seen!r}")


def test_cbir_serve_subprocess_sigterm(index_dir, hasher, tmp_path, dataset, images):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import grpc

    from cbir.server import connect
    from cbir.v1 import search_pb2 as pb

    model = hasher.save(tmp_path / "model.pt")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cbir.cli",
            "serve",
            "--index",
            str(index_dir),
            "--model",
            str(model),
            "--address",
            "127.0.0.1:0",
            "--grace",
            "5",
            "--image-formats",
            "png,gif",
            "--max-request-pixels",
            "2048",
            "--max-hits-per-call",
            "50",
            "--bulk-nice",
            "6",
            "--switch-interval-ms",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line_with(proc, "SERVING", timeout=60)
        address = line.rsplit(" on ", 1)[1].split()[0]
        assert address.startswith("127.0.0.1:")
        channel, stub = connect(address)
        with channel:
            resp = stub.Search(pb.SearchRequest(id=int(dataset[0][0]), k=3, mode=pb.HAMMING), timeout=10)
            assert len(resp.hits) == 3 and resp.hits[0].hamming_distance == 0
            # the limit flags reach the server
            for req, want in [
                (pb.SearchRequest(id=int(dataset[0][0]), k=51), "work limit of 50"),
                (pb.SearchRequest(image=b"BM" + bytes(60), k=1), "accepted formats: PNG, GIF"),
            ]:
                with pytest.raises(grpc.RpcError) as e:
                    stub.Search(req, timeout=10)
                assert want in e.value.details()
            img = pb.GetCodeRequest(images=[images[0]] * 3)  # 3 x 32 x 32 > 2048 pixels
            with pytest.raises(grpc.RpcError) as e:
                stub.GetCode(img, timeout=10)
            assert (
                e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "per-request budget of 2048" in e.value.details()
            )
        if sys.platform.startswith("linux") and os.getpriority(os.PRIO_PROCESS, 0) + 6 <= 19:
            # --bulk-nice reaches the encoder thread (the bulk threads are made on first use)
            encoder = [
                t for t in Path(f"/proc/{proc.pid}/task").iterdir() if "(cbir-encoder)" in (t / "stat").read_text()
            ]
            assert (
                encoder
                and os.getpriority(os.PRIO_PROCESS, int(encoder[0].name)) == os.getpriority(os.PRIO_PROCESS, 0) + 6
            )
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopped" in out
        assert "rpc method=Search status=OK" in err  # per-call structured log at INFO
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_cbir_serve_refuses_public_bind_without_auth(index_dir, capsys):
    assert main(["serve", "--index", str(index_dir), "--address", "0.0.0.0:0"]) == 2
    assert "--insecure" in capsys.readouterr().err
