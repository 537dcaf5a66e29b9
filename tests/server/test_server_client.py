"""``cbir.client`` against a real grpc.aio server on loopback (fixtures in conftest.py).

Answers are compared with the ``IndexReader`` the server serves, used directly."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest

from cbir import client as cc
from cbir.codes import Codes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def client_of():
    made = []

    def make(address, **kw):
        c = cc.CbirClient(address, **kw).wait_ready()
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_search_by_code_id_and_batch_equal_the_reader(served, client_of, dataset):
    ids, codes, _ = dataset
    c = client_of(served.address)
    for mode in ("lex", "hamming", "hybrid"):
        res = c.search(code=codes[3:4], k=25, mode=mode, return_codes=True, return_metadata=True)
        direct = getattr(served.index, f"search_{'lex' if mode == 'lex' else mode}")(codes[3:4], 25)
        assert isinstance(res.ids, np.ndarray) and res.ids.dtype == np.int64
        assert res.ids.tolist() == np.asarray(direct.ids).tolist()
        assert isinstance(res.codes, Codes) and res.codes.nbits == codes.nbits and len(res.codes) == len(res.ids) > 0
        assert res.query_code == codes[3:4]
        assert res.metadata[0]["source"].startswith("item")
        assert (
            res.hamming == [bin(int(a) ^ int(codes[3:4].as_uint64()[0])).count("1") for a in res.codes.as_uint64()]
        ).all()
    by_id = c.search(id=int(ids[3]), k=25)
    assert by_id.ids.tolist() == c.search(codes[3:4], k=25).ids.tolist()  # a Codes positional query
    by_hex = c.search(code=codes[3:4].to_hex()[0], nbits=codes.nbits, k=25)
    assert by_hex.ids.tolist() == by_id.ids.tolist()
    batch = c.batch_search(codes[:7], k=5, mode="hamming")
    assert len(batch) == 7
    mat = cc.ids_matrix(batch, 6)
    assert mat.shape == (7, 6) and (mat[:, 5] == -1).all()
    for j in range(7):
        assert mat[j, :5].tolist() == c.search(code=codes[j : j + 1], k=5, mode="hamming").ids.tolist()


def test_image_queries_get_code_stats_ping(served, client_of, images):
    c = client_of(served.address)
    codes, conf = c.get_code(images[:3], return_confidence=True)
    assert isinstance(codes, Codes) and len(codes) == 3 and conf.shape == (3, codes.nbits)
    assert ((conf >= 0) & (conf <= 1)).all()
    res = c.search(images[0], k=10)
    assert res.query_code == codes[0:1]
    assert res.ids.tolist() == c.search(code=codes[0:1], k=10).ids.tolist()
    st = c.stats()
    assert st.count == 300
    assert st.layout.nbits == served.hasher.layout.nbits and st.model_content_hash == served.hasher.content_hash
    assert c.ping() is None


def test_add_delete_round_trip(served, client_of, dataset):
    c = client_of(served.address)
    new = Codes.from_bits(np.array([[1, 0] * 8, [0, 1] * 8], dtype=np.uint8))
    assert c.add([5, 6], new, metadata=[{"labels": ["x"]}, None]) == 2
    with pytest.raises(cc.AlreadyExists):
        c.add([5], new[:1])
    assert c.add([5], new[:1], upsert=True, metadata=[{"labels": ["x"]}]) == 1  # upsert replaces metadata
    res = c.search(code=new[:1], k=1, labels=["x"])
    assert res.ids.tolist() == [5]
    assert c.delete([5, 6, 5]) == 2
    with pytest.raises(cc.NotFound) as e:
        c.delete([5], must_exist=True)
    assert e.value.code == "NOT_FOUND" and "5" in e.value.details
    assert isinstance(e.value, cc.CbirError)


def test_typed_errors(index, hasher, server_factory, client_of, dataset):
    _, codes, _ = dataset
    server = server_factory(index, None, token="s3cret", max_hits_per_call=50)
    with pytest.raises(cc.Unauthenticated):
        cc.CbirClient(server.address, token="").search(code=codes[:1], k=5)
    c = client_of(server.address, token="s3cret")
    assert len(c.search(code=codes[:1], k=5)) == 5
    with pytest.raises(cc.InvalidArgument):
        c.search(code=Codes.from_bits(np.ones((1, 8), np.uint8)), k=5)  # 8 bits for a 16-bit index
    with pytest.raises(cc.ResourceExhausted):
        c.search(code=codes[:1], k=51)
    with pytest.raises(cc.FailedPrecondition):  # no model: no image queries
        c.search(b"\x89PNG not really", k=5)
    with pytest.raises(cc.NotFound):
        c.search(id=123456789, k=5)
    with pytest.raises(ValueError):  # k is required: refused before any call
        c.search(code=codes[:1], k=0)
    assert c.retries == 0  # none of these is retried


def test_unavailable_is_retried_with_bounded_backoff():
    policy = cc.RetryPolicy(attempts=3, initial_s=0.1, multiplier=2.0, jitter=0.0)
    c = cc.CbirClient(f"127.0.0.1:{_free_port()}", retry=policy, timeout=10)
    t0 = time.monotonic()
    with pytest.raises(cc.Unavailable):
        c.ping()
    took = time.monotonic() - t0
    assert c.retries == 2 and 0.3 <= took < 5  # waits 0.1 + 0.2 s, then gives up
    c.close()


def test_retry_reaches_a_server_that_starts_late(index):
    import threading

    from cbir.server import create_server

    port = _free_port()
    c = cc.CbirClient(f"127.0.0.1:{port}", retry=cc.RetryPolicy(attempts=30, initial_s=0.05, max_s=0.2), timeout=15)
    started = {}

    def start():
        time.sleep(0.4)
        started["s"] = create_server(index, None, f"127.0.0.1:{port}")

    th = threading.Thread(target=start)
    th.start()
    try:
        assert c.ping() is None and c.retries >= 1
    finally:
        th.join()
        if "s" in started:
            started["s"].stop(grace=0)
        c.close()


def test_deadline_is_not_retried(index, slow_hasher_factory, server_factory, client_of, images):
    slow = server_factory(index, slow_hasher_factory(1.5))
    c = client_of(slow.address)
    t0 = time.monotonic()
    with pytest.raises(cc.DeadlineExceeded):
        c.get_code(images[:1], timeout=0.3)
    assert c.retries == 0 and time.monotonic() - t0 < 1.2


def test_async_client(served, dataset, images):
    ids, codes, _ = dataset

    async def main():
        async with cc.AsyncCbirClient(served.address) as c:
            await c.wait_ready()
            res = await c.search(code=codes[2:3], k=9, mode="hamming")
            batch = await c.batch_search([int(ids[2]), codes[2:3], images[0]], k=9, mode="hamming")
            st = await c.stats()
            await c.ping()
            with pytest.raises(cc.NotFound):
                await c.search(id=987654321, k=3)
            many = await asyncio.gather(*(c.search(code=codes[j : j + 1], k=4) for j in range(20)))
            return res, batch, st, many

    res, batch, st, many = asyncio.run(main())
    assert res.ids.tolist() == np.asarray(served.index.search_hamming(codes[2:3], 9).ids).tolist()
    assert batch[0].ids.tolist() == res.ids.tolist() == batch[1].ids.tolist() and len(batch[2]) == 9
    assert st.count == 300
    assert [m.ids.tolist() for m in many] == [
        np.asarray(served.index.search_lex(codes[j : j + 1], 4).ids).tolist() for j in range(20)
    ]


def test_client_imports_no_torch():
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, cbir.client; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_bench_searcher_halves_chunks_on_resource_exhausted(index, server_factory, dataset):
    from cbir.bench import GrpcSearcher

    _, codes, _ = dataset
    server = server_factory(index, None, max_hits_per_call=50)
    s = GrpcSearcher(server.address, order="hamming")
    try:
        got = s.search(codes[:20], 10)  # 20 x 10 hits > 50: 20 -> 10 -> 5 queries per call
        want = np.stack([np.asarray(index.search_hamming(codes[j : j + 1], 10).ids) for j in range(20)])
        assert (got == want).all()
        assert s.halvings == 2 and s.calls == 4
        assert s.stats().count == 300
        with pytest.raises(ValueError, match="RESOURCE_EXHAUSTED"):  # one query over the limit
            s.search(codes[:2], 51)
    finally:
        s.close()


def test_async_unavailable_is_retried_then_raised():
    async def main():
        c = cc.AsyncCbirClient(
            f"127.0.0.1:{_free_port()}", timeout=10, retry=cc.RetryPolicy(attempts=3, initial_s=0.1, jitter=0.0)
        )
        t0 = time.monotonic()
        try:
            with pytest.raises(cc.Unavailable) as e:
                await c.ping()
            return c.retries, time.monotonic() - t0, e.value
        finally:
            await c.close()

    retries, took, err = asyncio.run(main())
    assert retries == 2 and 0.3 <= took < 5 and err.code == "UNAVAILABLE" and isinstance(err, cc.CbirError)
