"""The server under hostile input (issue 12): a seeded fuzz suite and the checks behind it.

Every request goes to a real ``grpc.aio`` server on loopback through a *raw* channel (identity
serializers: the bytes given are the bytes on the wire), so the client never validates anything.
"""

from __future__ import annotations

import gc
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from cbir.codes import Codes
from cbir.server.fuzz import BAD_INPUT_OK, hostile_requests, png_bomb, raw_caller, rss_bytes
from cbir.server.guard import CLIENT_FAULTS
from cbir.v1 import search_pb2 as pb

NBITS = 16  # the code length of the conftest model and dataset
MiB = 1 << 20


def _code(codes: Codes, i: int = 0) -> pb.Code:
    return pb.Code(data=codes.packed[i].tobytes(), nbits=codes.nbits)


def _status(fn, req, **kw) -> tuple[str, str]:
    try:
        fn(req, timeout=60, **kw)
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""


def _reference(stub, dataset, image: bytes):
    ids, codes, _ = dataset
    return [
        stub.Search(pb.SearchRequest(code=_code(codes, 3), k=50, return_codes=True, return_metadata=True)),
        stub.Search(pb.SearchRequest(code=_code(codes, 7), k=20, mode=pb.HAMMING)),
        stub.Search(pb.SearchRequest(image=image, k=10)),
        stub.GetStats(pb.GetStatsRequest()).count,
    ]


def _fuzz(served, dataset, caplog, image: bytes, n: int, seed: int, rss_limit_mb: float) -> dict:
    """Send ``n`` hostile requests (8 in flight); check statuses, logs, RSS and a reference."""
    caplog.set_level(logging.WARNING, logger="cbir.server")
    before = _reference(served.stub, dataset, image)
    calls: dict = {}
    counts: dict = {}
    bad: list = []
    with grpc.insecure_channel(served.address, options=[("grpc.max_send_message_length", 64 * MiB)]) as ch:
        gc.collect()
        rss0 = rss_bytes()

        def send(req):
            method, body, kind = req
            fn = calls.get(method) or calls.setdefault(method, raw_caller(ch, method))
            try:
                fn(body, timeout=60)
                return kind, method, "OK", ""
            except grpc.RpcError as e:
                return kind, method, e.code().name, e.details() or ""

        reqs = hostile_requests(n, seed, NBITS, [int(i) for i in dataset[0]], image)
        with ThreadPoolExecutor(8) as pool:
            for kind, method, status, detail in pool.map(send, reqs):
                counts[status] = counts.get(status, 0) + 1
                if status not in BAD_INPUT_OK:
                    bad.append((kind, method, status, detail[:200]))
        growth = (rss_bytes() - rss0) / MiB
    assert not bad, bad[:10]
    assert sum(counts.values()) == n and counts.get("INVALID_ARGUMENT", 0) > n // 3, counts
    # one WARNING line per refused request, never a traceback, never an ERROR
    records = [r for r in caplog.records if r.name.startswith("cbir.server")]
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info], records[:3]
    faults = sum(v for k, v in counts.items() if getattr(grpc.StatusCode, k) in CLIENT_FAULTS)
    assert sum(r.levelno == logging.WARNING and r.name == "cbir.server.rpc" for r in records) == faults
    # alive, and answering exactly as before
    assert _reference(served.stub, dataset, image) == before
    assert growth <= rss_limit_mb, f"RSS grew {growth:.0f} MB over {n} hostile requests"
    return counts


@pytest.fixture
def served_ro(index_dir, hasher, server_factory, client_factory):
    """A read-only server (fuzzed Add/Delete cannot change the reference answers)."""
    from types import SimpleNamespace

    from cbir.indexer import open_index

    reader = open_index(index_dir, readonly=True)
    server = server_factory(reader, hasher)
    yield SimpleNamespace(server=server, stub=client_factory(server.address), address=server.address)
    server.stop(grace=0)
    reader.close()


def test_fuzz_2400_hostile_requests(served_ro, dataset, caplog, make_png):
    counts = _fuzz(served_ro, dataset, caplog, make_png(11), n=2400, seed=12, rss_limit_mb=150)
    assert counts.get("RESOURCE_EXHAUSTED", 0) > 0 and counts.get("OK", 0) > 0


def test_fuzz_writable_server(served, dataset, make_png):
    """Hostile writes too: Add/Delete reach the index (so no reference answer is compared)."""
    from cbir.server.fuzz import raw_caller as caller

    bad = []
    with grpc.insecure_channel(served.address, options=[("grpc.max_send_message_length", 64 * MiB)]) as ch:
        for method, body, kind in hostile_requests(800, 77, NBITS, [int(i) for i in dataset[0]], make_png(2)):
            status, detail = _status(caller(ch, method), body)
            if status not in BAD_INPUT_OK:
                bad.append((kind, method, status, detail[:200]))
    assert not bad, bad[:10]
    n = served.stub.GetStats(pb.GetStatsRequest()).count
    assert n == served.index.count()  # server and index agree after the hostile writes


def test_delete_repeated_id_must_exist(served, dataset):
    i = int(dataset[0][5])
    assert served.stub.Delete(pb.DeleteRequest(ids=[i, i], must_exist=True), timeout=10).deleted == 1
    status, _ = _status(served.stub.Delete, pb.DeleteRequest(ids=[i, i], must_exist=True))
    assert status == "NOT_FOUND"


@pytest.mark.slow
def test_fuzz_20000_hostile_requests(served_ro, dataset, caplog, make_png):
    _fuzz(served_ro, dataset, caplog, make_png(11), n=20_000, seed=1212, rss_limit_mb=200)


def test_unparsable_bodies_are_invalid_argument_with_one_warning(served, caplog):
    caplog.set_level(logging.WARNING, logger="cbir.server")
    bad_utf8 = b"\x4a\x02\xc3\x28"  # SearchRequest.label_filter with invalid UTF-8
    deep = pb.AddRequest(items=[pb.Item(id=1)])  # metadata nested beyond protobuf's depth limit
    value = deep.items[0].metadata.fields["x"]
    for _ in range(150):
        value = value.list_value.values.add()
    with grpc.insecure_channel(served.address) as ch:
        for method in ("Search", "BatchSearch", "Add", "Delete", "GetCode", "GetStats", "Ping"):
            for body in (b"\xff\xff\xff", b"\x0a\x05abc"):  # corrupt wire format, truncated field
                caplog.clear()
                status, detail = _status(raw_caller(ch, method), body)
                assert status == "INVALID_ARGUMENT", (method, body[:8], status, detail)
                assert "is not a valid cbir.v1." in detail
                recs = [r for r in caplog.records if r.name.startswith("cbir.server")]
                assert len(recs) == 1 and recs[0].levelno == logging.WARNING and not recs[0].exc_info
        status, detail = _status(raw_caller(ch, "Search"), bad_utf8)
        assert status == "INVALID_ARGUMENT" and "UTF-8" in detail
        status, detail = _status(raw_caller(ch, "Add"), deep.SerializeToString())
        assert status == "INVALID_ARGUMENT" and "is not a valid cbir.v1.AddRequest" in detail


def test_auth_is_decided_before_the_body_is_parsed(index, hasher, server_factory, caplog):
    caplog.set_level(logging.INFO, logger="cbir.server")
    server = server_factory(index, hasher, token="s3cret")
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 32 * MiB)]) as ch:
        search = raw_caller(ch, "Search")
        assert _status(search, b"\xff\xff\xff")[0] == "UNAUTHENTICATED"
        big = np.random.default_rng(0).bytes(15 * MiB)  # would be INVALID_ARGUMENT if it were parsed
        assert _status(search, big)[0] == "UNAUTHENTICATED"
        assert _status(raw_caller(ch, "Add"), big, metadata=[("authorization", "Bearer wrong")])[0] == "UNAUTHENTICATED"
        assert not [r for r in caplog.records if "is not a valid" in r.getMessage()]
        status, detail = _status(search, b"\xff\xff\xff", metadata=[("authorization", "Bearer s3cret")])
        assert status == "INVALID_ARGUMENT" and "is not a valid cbir.v1.SearchRequest" in detail


def test_k_zero_and_non_finite_metadata_are_invalid(served, dataset):
    ids, codes, _ = dataset
    status, detail = _status(served.stub.Search, pb.SearchRequest(code=_code(codes), k=0))
    assert status == "INVALID_ARGUMENT" and "k must be >= 1" in detail
    batch = pb.BatchSearchRequest(
        requests=[pb.SearchRequest(code=_code(codes), k=3), pb.SearchRequest(code=_code(codes))]
    )
    status, detail = _status(served.stub.BatchSearch, batch)
    assert status == "INVALID_ARGUMENT" and detail.startswith("request 1: k must be >= 1")
    count = served.stub.GetStats(pb.GetStatsRequest()).count
    for value in (float("nan"), float("inf"), float("-inf")):
        req = pb.AddRequest(items=[pb.Item(id=9_000_001, code=_code(codes), metadata={"ok": 1})])
        req.items[0].metadata.fields["deep"].struct_value.fields["x"].list_value.values.add().number_value = value
        status, detail = _status(served.stub.Add, req)
        assert status == "INVALID_ARGUMENT", (value, status, detail)
        assert "item 0 (id 9000001): metadata deep.x[0]" in detail and "finite" in detail
    assert served.stub.GetStats(pb.GetStatsRequest()).count == count  # nothing was added
    ok = pb.AddRequest(items=[pb.Item(id=9_000_001, code=_code(codes), metadata={"x": 1.5, "labels": [3]})])
    assert served.stub.Add(ok).added == 1


def test_oversized_work_is_refused_before_any_search(index, hasher, server_factory, client_factory, dataset):
    server = server_factory(index, hasher)
    stub = client_factory(server.address)
    searches = []
    real = server.backend.search
    server.backend.search = lambda *a, **kw: (searches.append(a), real(*a, **kw))[1]
    q = _code(dataset[1])
    status, detail = _status(
        stub.BatchSearch, pb.BatchSearchRequest(requests=[pb.SearchRequest(code=q, k=10_000)] * 200)
    )
    assert status == "RESOURCE_EXHAUSTED" and "2000000 ranked hits" in detail and "work limit of 200000" in detail
    status, detail = _status(stub.Search, pb.SearchRequest(code=q, k=10_000, offset=1_000_000))
    assert status == "RESOURCE_EXHAUSTED" and "split it into smaller calls" in detail
    assert searches == []  # refused up front: no search ran
    big = server_factory(index, hasher, max_hits_per_call=10**7, max_message_bytes=1 * MiB)
    stub2 = client_factory(big.address, max_message_bytes=64 * MiB)
    reqs = [pb.SearchRequest(code=q, k=10_000, return_codes=True)] * 20
    status, detail = _status(stub2.BatchSearch, pb.BatchSearchRequest(requests=reqs))
    assert status == "RESOURCE_EXHAUSTED" and "the response could reach" in detail and "1048576 bytes" in detail
    # under the limits the same queries are served
    assert len(stub.BatchSearch(pb.BatchSearchRequest(requests=[pb.SearchRequest(code=q, k=300)] * 3)).responses) == 3


class _NoPostingList:
    """The real index, seen as one without a label posting list (an index of an older format):
    the server then filters by scanning the ranking and reading metadata."""

    has_label_index = False

    def __init__(self, reader) -> None:
        self._reader = reader

    def __getattr__(self, name):
        if name == "ids_with_labels":
            raise AttributeError(name)
        return getattr(self._reader, name)


def _scanning_backend(index):
    from cbir.server.backend import IndexBackend

    return IndexBackend(_NoPostingList(index))


def test_per_call_cpu_limit(index, server_factory, client_factory, dataset):
    """Many cheap queries add up: the offload thread's CPU time is checked between queries."""
    q = _code(dataset[1])
    batch = pb.BatchSearchRequest(requests=[pb.SearchRequest(code=q, k=5, mode=pb.HYBRID)] * 3000)
    stub = client_factory(server_factory(index, None, max_call_cpu_s=0.01).address)
    status, detail = _status(stub.BatchSearch, batch)
    assert status == "RESOURCE_EXHAUSTED" and "more than 0.01 s of CPU" in detail
    stub = client_factory(server_factory(index, None).address)
    assert len(stub.BatchSearch(batch).responses) == 3000


def test_label_filter_scan_is_bounded(index, server_factory, client_factory, dataset):
    q = _code(dataset[1])
    stub = client_factory(server_factory(_scanning_backend(index), None, max_filter_scan=100).address)
    for mode in (pb.LEXICOGRAPHIC, pb.HAMMING):
        status, detail = _status(stub.Search, pb.SearchRequest(code=q, k=5, mode=mode, label_filter=["nomatch"]))
        assert status == "RESOURCE_EXHAUSTED" and "label filter examined 100 items" in detail
    for backend in (_scanning_backend(index), index):  # scan under the limit; the index's posting list
        stub = client_factory(server_factory(backend, None).address)
        assert len(stub.Search(pb.SearchRequest(code=q, k=5, label_filter=["nomatch"])).hits) == 0
        assert len(stub.Search(pb.SearchRequest(code=q, k=5, label_filter=["1"])).hits) == 5


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_offloaded_scan_stops_at_deadline_or_cancellation(index, server_factory, client_factory, dataset, how):
    """A label-filtered scan reads metadata page by page on an offload thread (here 0.3 s per
    page, 3 pages); when the call ends after 0.45 s the thread stops before the third page."""
    server = server_factory(_scanning_backend(index), None)
    stub = client_factory(server.address)
    pages = []
    real = server.backend.get_metadata

    def slow_pages(ids):
        pages.append(len(ids))
        time.sleep(0.3)
        return real(ids)

    server.backend.get_metadata = slow_pages
    req = pb.SearchRequest(code=_code(dataset[1]), k=5, label_filter=["nomatch"])
    if how == "deadline":
        assert _status(lambda r, timeout: stub.Search(r, timeout=0.45), req)[0] == "DEADLINE_EXCEEDED"
    else:
        fut = stub.Search.future(req, timeout=30)
        time.sleep(0.45)
        assert fut.cancel()
    time.sleep(1.2)  # the scan would have read its third page by now
    assert len(pages) == 2, pages
    pages.clear()
    assert len(stub.Search(req, timeout=30).hits) == 0 and len(pages) == 3  # uninterrupted: every page


def _truncated_big_png(size: int = 2000) -> bytes:
    """Passes every header check, then fails half-way through the decode (after allocation)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 20, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: int(len(data) * 0.9)]


def test_failed_decodes_release_their_memory(served, dataset, make_png):
    """With the cyclic GC off, only reference counting frees memory: a failed decode that left a
    traceback cycle holding its 16 MB image would grow RSS by ~16 MB per call."""
    trunc = _truncated_big_png()
    status, detail = _status(served.stub.Search, pb.SearchRequest(image=trunc, k=1))
    assert status == "INVALID_ARGUMENT" and "truncated" in detail
    bomb = png_bomb()
    assert len(bomb) < 70
    status, detail = _status(served.stub.GetCode, pb.GetCodeRequest(images=[make_png(0), bomb]))
    assert status == "INVALID_ARGUMENT" and "image 1: " in detail and "decompression bomb" in detail
    gc.collect()
    gc.disable()
    try:
        rss0 = rss_bytes()
        for _ in range(30):
            assert _status(served.stub.Search, pb.SearchRequest(image=trunc, k=1))[0] == "INVALID_ARGUMENT"
        for _ in range(200):
            assert _status(served.stub.GetCode, pb.GetCodeRequest(images=[make_png(0), bomb]))[0] == "INVALID_ARGUMENT"
        growth = (rss_bytes() - rss0) / MiB
    finally:
        gc.enable()
    assert growth < 100, f"RSS grew {growth:.0f} MB"
    assert len(served.stub.Search(pb.SearchRequest(image=make_png(0), k=3)).hits) == 3


def test_format_allowlist_and_pixel_budgets(index, hasher, server_factory, client_factory, make_png):
    from PIL import Image

    from cbir.data import CorruptImageError, decode_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(CorruptImageError, match="not a recognised image format"):
        decode_image(eps)  # EPS is never opened, not even for a dataset
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    server = server_factory(
        index, hasher, image_formats=("PNG",), max_request_pixels=3 * 32 * 32 - 1, max_images_per_call=4
    )
    stub = client_factory(server.address)
    status, detail = _status(stub.Search, pb.SearchRequest(image=eps, k=1))
    assert status == "INVALID_ARGUMENT" and "accepted formats: PNG" in detail
    status, detail = _status(stub.Search, pb.SearchRequest(image=jpeg, k=1))
    assert status == "INVALID_ARGUMENT" and "not a recognised image format" in detail
    assert len(stub.GetCode(pb.GetCodeRequest(images=[make_png(1), make_png(2)])).codes) == 2
    status, detail = _status(stub.GetCode, pb.GetCodeRequest(images=[make_png(i) for i in range(3)]))
    assert status == "INVALID_ARGUMENT" and "3072 pixels in all, over the per-request budget of 3071" in detail
    tiny = pb.SearchRequest(image=make_png(1, size=4), k=1)
    assert len(stub.BatchSearch(pb.BatchSearchRequest(requests=[tiny] * 4)).responses) == 4
    status, detail = _status(stub.BatchSearch, pb.BatchSearchRequest(requests=[tiny] * 5))
    assert status == "RESOURCE_EXHAUSTED" and "5 images in one call, over the per-call limit of 4" in detail
    status, detail = _status(stub.Search, pb.SearchRequest(image=png_bomb(60000, 60000), k=1))
    assert status == "INVALID_ARGUMENT" and "3600000000 pixels" in detail and "too large" in detail
    from cbir.server import create_server

    with pytest.raises(ValueError, match="unknown image format"):
        create_server(index, None, "127.0.0.1:0", image_formats=("JPG",))


def test_big_image_request_does_not_hold_up_small_ones(
    index, hasher, slow_hasher_factory, server_factory, client_factory, make_png
):
    """Each forward pass takes >= 50 ms and each 64x64 image is a step of its own: a 16-image
    GetCode needs 16 steps, yet a 1-image Search sent after it started is answered first."""
    from PIL import Image

    from cbir.data import decode_image

    slow = slow_hasher_factory(0.05)
    server = server_factory(index, slow, encoder_step_pixels=64 * 64, encoder_max_wait_s=0.0)
    stub = client_factory(server.address)
    rng = np.random.default_rng(3)
    big_imgs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        big_imgs.append(buf.getvalue())
    big = stub.GetCode.future(pb.GetCodeRequest(images=big_imgs))
    deadline = time.monotonic() + 30
    while server.encoder.forward_passes < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    small = stub.Search(pb.SearchRequest(image=make_png(5), k=2), timeout=30)
    assert not big.done(), "the small request waited for the whole big one"
    assert len(small.hits) == 2
    codes = big.result(timeout=60).codes
    expect, _ = hasher.encode([decode_image(b) for b in big_imgs])  # chunked rows come back in order
    assert [c.code.data for c in codes] == expect.to_bytes_list()
    assert server.encoder.forward_passes >= 16


def test_model_is_warm_before_serving(index, slow_hasher_factory, server_factory, client_factory, make_png):
    counting = slow_hasher_factory(0.0)
    server = server_factory(index, counting)
    assert counting.calls == 1  # the warm-up pass ran before health turned SERVING
    assert server.encoder.images_encoded == 0  # ... and is not counted as traffic
    stub = client_factory(server.address)
    t0 = time.perf_counter()
    assert len(stub.Search(pb.SearchRequest(image=make_png(4), k=3), timeout=30).hits) == 3
    assert time.perf_counter() - t0 < 1.0


def test_fault_pacer_schedule_by_hand():
    """The generic cell rate algorithm of :class:`FaultPacer`, hand-computed: rate 10/s, burst 3:
    three faults at one instant go at once, then one every 0.1 s; waits are capped at
    max_delay_s; hosts are paced apart, ports of one host together."""
    from cbir.server.guard import FaultPacer, peer_host

    p = FaultPacer(rate=10, burst=3, max_delay_s=0.25)
    waits = [p.delay("ipv4:10.0.0.1:5000", now=0.0) for _ in range(7)]
    assert waits == pytest.approx([0, 0, 0, 0.1, 0.2, 0.25, 0.25])
    assert p.delay("ipv4:10.0.0.2:1", now=0.0) == 0  # another host: its own budget
    assert p.delay("ipv4:10.0.0.1:6000", now=0.0) == pytest.approx(0.25)  # same host, other port
    assert p.delay("ipv4:10.0.0.1:5000", now=10.0) == 0  # long after: the budget is back
    assert p.paced == 5
    assert peer_host("ipv4:127.0.0.1:54321") == "ipv4:127.0.0.1"
    assert peer_host("ipv6:[::1]:80") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"
    with pytest.raises(ValueError, match="burst"):
        FaultPacer(rate=1, burst=0)


def test_failed_calls_are_paced(index, hasher, server_factory, client_factory, dataset):
    """Past the burst, a host's failed calls are answered at the pacing rate (still
    INVALID_ARGUMENT, one WARNING each), while its well-formed calls are answered at once."""
    server = server_factory(index, hasher, fault_rate=20.0, fault_burst=5)
    stub = client_factory(server.address)
    ok = pb.SearchRequest(code=_code(dataset[1]), k=5)
    with grpc.insecure_channel(server.address) as ch:
        bad = raw_caller(ch, "Search")
        t0 = time.perf_counter()
        for _ in range(5 + 10):
            assert _status(bad, b"\xff\xff\xff")[0] == "INVALID_ARGUMENT"
        paced_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        assert len(stub.Search(ok, timeout=10).hits) == 5
        ok_s = time.perf_counter() - t1
    assert paced_s >= 0.45, paced_s  # 10 answers past the burst at 20/s: >= 0.5 s
    assert ok_s < 0.2, ok_s
    assert server.servicer.pacer.paced >= 9
