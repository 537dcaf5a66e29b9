"""Health transitions, graceful shutdown, auth/TLS, micro-batching, concurrent writes."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbir.codes import Codes
from cbir.server import CbirServer, IndexBackend, ServerOptions, serve_in_process
from cbir.server.security import check_bind_policy
from cbir.v1 import search_pb2 as pb

NBITS = 16  # the code length of the conftest model and dataset

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_transitions(index, hasher, client_factory, dataset):
    server = CbirServer("127.0.0.1:0")
    try:
        stub = client_factory(server.address)
        assert health_status(server.address) == NOT_SERVING
        assert health_status(server.address, "cbir.v1.SearchService") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Search(pb.SearchRequest(k=10, id=int(dataset[0][0])))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        stub.Ping(pb.PingRequest())  # the process answers while loading
        server.attach(IndexBackend(index, index), hasher)
        assert health_status(server.address) == SERVING
        assert health_status(server.address, "cbir.v1.SearchService") == SERVING
        assert len(stub.Search(pb.SearchRequest(id=int(dataset[0][0]), k=3)).hits) == 3
        seen = []
        t = threading.Thread(target=server.stop, kwargs=dict(grace=2.0, drain_delay=0.6))
        t.start()
        time.sleep(0.2)
        seen.append(health_status(server.address))
        seen.append(health_status(server.address, "cbir.v1.SearchService"))
        t.join(10)
        assert seen == [NOT_SERVING, NOT_SERVING]
    finally:
        server.stop(grace=0)


def test_graceful_shutdown_finishes_in_flight_calls(index, slow_hasher_factory, server_factory, client_factory, images):
    server = server_factory(index, slow_hasher_factory(0.8))
    stub = client_factory(server.address)
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(stub.Search, pb.SearchRequest(image=images[i], k=2), timeout=20) for i in range(3)]
        time.sleep(0.3)  # the calls are in flight (the encoder is sleeping)
        t0 = time.monotonic()
        server.stop(grace=10.0)
        assert time.monotonic() - t0 < 9.0
        for f in futs:
            assert len(f.result().hits) == 2  # finished, not cut off
    with pytest.raises(grpc.RpcError) as e:
        stub.Ping(pb.PingRequest(), timeout=2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_token_auth(index, hasher, server_factory, client_factory, dataset, monkeypatch):
    server = server_factory(index, hasher, token="s3cret")
    req = pb.SearchRequest(id=int(dataset[0][0]), k=2)
    for kw in ({}, {"token": "wrong"}):
        stub = client_factory(server.address, **kw)
        with pytest.raises(grpc.RpcError) as e:
            stub.Search(req)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.Ping(pb.PingRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert health_status(server.address) == SERVING  # health checks need no token
    stub = client_factory(server.address, token="s3cret")
    assert len(stub.Search(req).hits) == 2
    # auth off: no token needed
    open_server = server_factory(index, hasher)
    assert len(client_factory(open_server.address).Search(req).hits) == 2


def test_bind_policy():
    check_bind_policy("127.0.0.1:0", tls=False, token=None, insecure=False)
    check_bind_policy("[::1]:50051", tls=False, token=None, insecure=False)
    check_bind_policy("localhost:1", tls=False, token=None, insecure=False)
    for addr in ("0.0.0.0:50051", "[::]:50051", "192.168.1.5:1", "example.com:443"):
        with pytest.raises(ValueError, match="--insecure"):
            check_bind_policy(addr, tls=False, token=None, insecure=False)
        check_bind_policy(addr, tls=False, token="t", insecure=False)
        check_bind_policy(addr, tls=True, token=None, insecure=False)
        check_bind_policy(addr, tls=False, token=None, insecure=True)
    with pytest.raises(ValueError, match="--insecure"):
        CbirServer("0.0.0.0:0")  # refused before anything is bound
    with pytest.raises(ValueError, match="both"):
        CbirServer("127.0.0.1:0", ServerOptions(tls_cert=b"x"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not available")
def test_tls(index, hasher, server_factory, client_factory, dataset, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server = server_factory(index, hasher, tls_cert=cert.read_bytes(), tls_key=key.read_bytes(), token="tok")
    stub = client_factory(server.address, tls_ca=cert.read_bytes(), token="tok", server_name="localhost")
    assert len(stub.Search(pb.SearchRequest(id=int(dataset[0][0]), k=2)).hits) == 2
    with grpc.insecure_channel(server.address) as ch:  # plaintext client cannot talk to it
        from cbir.v1 import search_pb2_grpc

        with pytest.raises(grpc.RpcError):
            search_pb2_grpc.SearchServiceStub(ch).Ping(pb.PingRequest(), timeout=2)


def test_micro_batching_shares_forward_passes(index, hasher, server_factory, client_factory, images):
    server = server_factory(index, hasher, encoder_max_wait_s=0.05, encoder_max_batch=64)
    stub = client_factory(server.address)
    n = 16
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: stub.Search(pb.SearchRequest(image=images[i % len(images)], k=1)), range(n)))
    enc = server.encoder
    assert enc.images_encoded == n
    assert enc.forward_passes < n and enc.max_batch_seen > 1
    # batching does not change the codes
    expect, _ = hasher.encode(
        [__import__("cbir.data", fromlist=["x"]).decode_image(images[i % len(images)]) for i in range(n)]
    )
    assert [r.query_code.data for r in results] == expect.to_bytes_list()


def test_concurrent_add_and_search_consistent(index, hasher, server_factory, client_factory):
    """Adds of 10 identical codes at a time are seen all-or-nothing, never half."""
    server = server_factory(index, hasher)
    stub = client_factory(server.address)
    marker = Codes.from_bits(np.ones((1, NBITS), np.uint8))
    base = len(
        stub.Search(
            pb.SearchRequest(
                code=pb.Code(data=marker.packed[0].tobytes(), nbits=NBITS), k=10_000, mode=pb.HAMMING, radius=0
            )
        ).hits
    )
    batches, per = 15, 10
    stop = threading.Event()
    errors, counts = [], []

    def writer():
        try:
            for b in range(batches):
                items = [
                    pb.Item(id=10_000_000 + b * per + j, code=pb.Code(data=marker.packed[0].tobytes(), nbits=NBITS))
                    for j in range(per)
                ]
                assert stub.Add(pb.AddRequest(items=items)).added == per
        except Exception as e:  # pragma: no cover
            errors.append(e)
        finally:
            stop.set()

    def reader():
        last = -1
        req = pb.SearchRequest(
            code=pb.Code(data=marker.packed[0].tobytes(), nbits=NBITS), k=10_000, mode=pb.HAMMING, radius=0
        )
        while not stop.is_set():
            n = len(stub.Search(req).hits) - base
            lex = stub.Search(pb.SearchRequest(code=req.code, k=10_000))
            n_lex = sum(h.hamming_distance == 0 for h in lex.hits) - base
            counts.append((n, n_lex))
            if n % per or n_lex % per or n < last:
                errors.append(AssertionError(f"inconsistent snapshot: {n}, {n_lex} after {last}"))
                return
            last = n

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    final = len(
        stub.Search(
            pb.SearchRequest(
                code=pb.Code(data=marker.packed[0].tobytes(), nbits=NBITS), k=10_000, mode=pb.HAMMING, radius=0
            )
        ).hits
    )
    assert final == base + batches * per
    assert counts


def test_serve_in_process(index, hasher, dataset):
    with serve_in_process(index, hasher) as (address, stub):
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        assert len(stub.Search(pb.SearchRequest(id=int(dataset[0][0]), k=4)).hits) == 4
        assert health_status(address) == SERVING
    with grpc.insecure_channel(address) as ch:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(ch).result(timeout=0.5)


def test_serve_in_process_from_paths(index_dir, hasher, tmp_path, dataset, images):
    """The demo's call: an index directory and a model checkpoint path."""
    model = hasher.save(tmp_path / "m.pt")
    with serve_in_process(index_dir, model) as (address, stub):
        resp = stub.Search(pb.SearchRequest(image=images[0], k=5, mode=pb.HAMMING))
        assert len(resp.hits) == 5
        with pytest.raises(grpc.RpcError) as e:  # opened read-only by default
            stub.Delete(pb.DeleteRequest(ids=[int(dataset[0][0])]))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_reflection_lists_services(served):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(served.address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"cbir.v1.SearchService", "grpc.health.v1.Health"} <= services
        fd = db.FindFileContainingSymbol("cbir.v1.SearchService")
        assert fd.name == "cbir/v1/search.proto"


def test_image_pixel_limit(index, hasher, server_factory, client_factory, make_png):
    server = server_factory(index, hasher, max_image_pixels=32 * 32 - 1)
    stub = client_factory(server.address)
    with pytest.raises(grpc.RpcError) as e:
        stub.Search(pb.SearchRequest(k=10, image=make_png(0)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "too large" in e.value.details()


def test_port_in_use_is_a_clear_error():
    first = CbirServer("127.0.0.1:0")
    try:
        with pytest.raises(OSError, match="cannot bind"):
            CbirServer(first.address)  # no SO_REUSEPORT sharing
    finally:
        first.stop(grace=0)


def test_encoder_queue_full_is_resource_exhausted(index, slow_hasher_factory, server_factory, client_factory, images):
    server = server_factory(index, slow_hasher_factory(0.4), encoder_max_queue=1, encoder_max_wait_s=0.0)
    stub = client_factory(server.address)

    def call(i):
        try:
            stub.Search(pb.SearchRequest(image=images[i % len(images)], k=1), timeout=20)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(call, range(6)))
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
    assert len(stub.Search(pb.SearchRequest(image=images[0], k=1), timeout=20).hits) == 1  # recovers


def test_model_must_match_the_index(index, hasher):
    from types import SimpleNamespace

    from cbir.codes import CodeLayout
    from cbir.server import create_server

    other = SimpleNamespace(layout=hasher.layout, content_hash="0" * 64)
    with pytest.raises(ValueError, match="index was built with model"):
        create_server(index, other, "127.0.0.1:0")
    wrong_bits = SimpleNamespace(layout=CodeLayout(nbits=24), content_hash=hasher.content_hash)
    with pytest.raises(ValueError, match="24-bit codes"):
        create_server(index, wrong_bits, "127.0.0.1:0")


def test_image_requests_batch_beyond_the_offload_threads(index, hasher, server_factory, client_factory, images):
    """Image requests wait on the encoder without holding a thread: with one offload thread,
    48 concurrent image Searches still share forward passes of many images each."""
    server = server_factory(index, hasher, max_workers=1, encoder_max_wait_s=0.3, encoder_max_batch=64)
    stub = client_factory(server.address)
    n = 48
    futs = [stub.Search.future(pb.SearchRequest(image=images[i % len(images)], k=3)) for i in range(n)]
    results = [f.result(timeout=60) for f in futs]
    enc = server.encoder
    assert enc.images_encoded == n and all(len(r.hits) == 3 for r in results)
    assert enc.max_batch_seen >= 24 > 1  # the old thread-per-request server capped batches at its thread count


def test_one_bad_image_fails_only_its_own_request(hasher, images, make_png):
    """Payloads are decoded on the encoder worker, per job: a corrupt payload fails its job
    with the reason, the jobs batched with it are encoded normally."""
    from cbir.data import decode_image as decode
    from cbir.server.encoder import ImageDecodeError, MicroBatchEncoder

    enc = MicroBatchEncoder(hasher, max_batch=64, max_wait_s=0.3)
    try:
        good1 = enc.submit_images([images[0], images[1]])
        bad = enc.submit_images([images[2], b"\x89PNG not really"], names=["first", "second"])
        good2 = enc.submit_images([images[3]])
        c1, f1 = good1.result(timeout=30)
        c2, _ = good2.result(timeout=30)
        with pytest.raises(ImageDecodeError, match="^second: cannot decode image"):
            bad.result(timeout=30)
    finally:
        enc.close()
    assert enc.forward_passes == 1 and enc.images_encoded == 3
    expect, conf = hasher.encode([decode(images[i]) for i in (0, 1, 3)])
    assert c1.to_bytes_list() + c2.to_bytes_list() == expect.to_bytes_list()
    assert np.allclose(f1, conf[:2], atol=1e-6)


def test_batch_keeps_filling_while_requests_arrive_and_respects_max_delay(hasher):
    """Jobs arriving 10 ms apart join one batch with a 60 ms gap window, although the stream
    (150 ms) lasts longer than the window; with a 30 ms max delay the same stream is split."""
    import torch

    from cbir.server.encoder import MicroBatchEncoder

    x = torch.zeros(1, 3, 32, 32)

    def stream(enc, n, gap_s):
        futs = []
        for _ in range(n):
            futs.append(enc.submit(x))
            time.sleep(gap_s)
        for f in futs:
            f.result(timeout=30)
        enc.close()
        return enc.forward_passes

    assert stream(MicroBatchEncoder(hasher, max_batch=64, max_wait_s=0.06, max_delay_s=10.0), 15, 0.01) == 1
    assert stream(MicroBatchEncoder(hasher, max_batch=64, max_wait_s=0.06, max_delay_s=0.03), 15, 0.01) >= 2
    with pytest.raises(ValueError, match="max_delay_s"):
        MicroBatchEncoder(hasher, max_delay_s=-1)
