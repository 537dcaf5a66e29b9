"""Every RPC through a real server and client equals the index / model used directly."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest

from cbir.codes import Codes, common_prefix_length, hamming_distance
from cbir.data import decode_image
from cbir.server.backend import IndexBackend
from cbir.v1 import search_pb2 as pb

NBITS = 16  # the code length of the conftest model and dataset

MODES = {"lex": pb.LEXICOGRAPHIC, "hamming": pb.HAMMING, "hybrid": pb.HYBRID, "prefix": pb.PREFIX}


def code_pb(codes: Codes, i: int = 0) -> pb.Code:
    return pb.Code(data=codes.packed[i].tobytes(), nbits=codes.nbits)


def direct(index, q: Codes, mode: str, k: int, offset: int = 0, radius=None, prefix_bits=0):
    """The ranking straight from the index (through the same adapter normalisation)."""
    be = IndexBackend(index)
    return be.search(q, mode, k, offset, radius, prefix_bits).ids.tolist()


def ids_of(resp) -> list[int]:
    return [h.id for h in resp.hits]


def queries(dataset, n=6):
    ids, codes, _ = dataset
    rng = np.random.default_rng(1)
    rand = Codes.from_bits(rng.integers(0, 2, size=(n, NBITS)).astype(np.uint8))
    return [codes[i] for i in (0, len(ids) // 2, 17)] + [rand[i] for i in range(n)]


@pytest.mark.parametrize("mode", ["lex", "hamming", "hybrid"])
def test_search_by_code_equals_index(served, dataset, mode):
    for q in queries(dataset):
        for k, offset in [(1, 0), (10, 0), (25, 5), (400, 0)]:
            resp = served.stub.Search(
                pb.SearchRequest(code=code_pb(q), k=k, offset=offset, mode=MODES[mode], return_codes=True)
            )
            expect = direct(served.index, q, mode, k, offset)
            assert ids_of(resp) == expect, (mode, k, offset)
            # distances, prefixes, codes and ranks are those of the returned codes
            if resp.hits:
                got = Codes.from_bytes([h.code.data for h in resp.hits], NBITS)
                assert [h.hamming_distance for h in resp.hits] == hamming_distance(q, got)[0].tolist()
                assert [h.common_prefix_length for h in resp.hits] == common_prefix_length(q, got)[0].tolist()
                assert [h.rank for h in resp.hits] == list(range(offset, offset + len(resp.hits)))
                stored = served.index.get(resp.hits[0].id).code
                assert got[0] == stored
            assert resp.query_code.data == q.packed[0].tobytes() and resp.query_code.nbits == NBITS


@pytest.mark.parametrize("inline", [(), ("lex", "prefix", "hamming", "hybrid")])
def test_inline_or_offloaded_search_gives_the_same_hits(index, server_factory, client_factory, dataset, inline):
    """Where a search runs (event loop or offload thread) never changes its answer."""
    stub = client_factory(server_factory(index, None, inline_modes=inline, max_workers=1).address)
    for q in queries(dataset, 3):
        for mode in ("lex", "hamming", "hybrid"):
            resp = stub.Search(pb.SearchRequest(code=code_pb(q), k=20, mode=MODES[mode]))
            assert ids_of(resp) == direct(index, q, mode, 20), (inline, mode)


def test_unknown_inline_mode_is_a_clear_error(index):
    from cbir.server import create_server

    with pytest.raises(ValueError, match="unknown inline search mode"):
        create_server(index, None, "127.0.0.1:0", inline_modes=("lex", "fast"))


def test_lex_search_is_the_lexicographic_order(served, dataset):
    """Independent check against the brute-force reference of cbir.codes."""
    from cbir.codes import rank

    ids, codes, _ = dataset
    for q in queries(dataset):
        resp = served.stub.Search(pb.SearchRequest(code=code_pb(q), k=50))
        assert ids_of(resp) == ids[rank(q, codes, 50, "lex", ids)[0]].tolist()
        resp = served.stub.Search(pb.SearchRequest(code=code_pb(q), k=50, mode=pb.HAMMING))
        assert ids_of(resp) == ids[rank(q, codes, 50, "hamming", ids)[0]].tolist()


def test_hamming_radius(served, dataset):
    for q in queries(dataset):
        for radius in (0, 2, 5):
            resp = served.stub.Search(pb.SearchRequest(code=code_pb(q), k=10_000, mode=pb.HAMMING, radius=radius))
            assert ids_of(resp) == direct(served.index, q, "hamming", 10_000, radius=radius)
            assert all(h.hamming_distance <= radius for h in resp.hits)


def test_prefix_pagination(served, dataset):
    ids, codes, _ = dataset
    q = codes[0]
    for pbits in (1, 3, 8, 16):
        expect = direct(served.index, q, "prefix", 10_000, prefix_bits=pbits)
        got, cursor, pages = [], b"", 0
        while True:
            resp = served.stub.Search(
                pb.SearchRequest(code=code_pb(q), k=7, mode=pb.PREFIX, prefix_bits=pbits, cursor=cursor)
            )
            got += ids_of(resp)
            assert all(h.common_prefix_length >= pbits for h in resp.hits)
            cursor = resp.next_cursor
            pages += 1
            if not cursor:
                break
            assert pages < 1000
        assert got == expect
        assert sorted(got) == sorted(ids[(codes.prefix(pbits).packed == q.prefix(pbits).packed).all(1)].tolist())


def test_search_by_id_and_image(served, dataset, images):
    ids, codes, _ = dataset
    resp = served.stub.Search(pb.SearchRequest(id=int(ids[5]), k=20, mode=pb.HAMMING))
    assert ids_of(resp) == direct(served.index, codes[5], "hamming", 20)
    assert resp.hits[0].hamming_distance == 0
    expect_codes, _ = served.hasher.encode([decode_image(b) for b in images])
    for i, img in enumerate(images[:3]):
        resp = served.stub.Search(pb.SearchRequest(image=img, k=15))
        assert resp.query_code.data == expect_codes.packed[i].tobytes()
        assert ids_of(resp) == direct(served.index, expect_codes[i], "lex", 15)


def test_batch_search_mixed_queries(served, dataset, images):
    ids, codes, _ = dataset
    reqs = [
        pb.SearchRequest(image=images[0], k=5),
        pb.SearchRequest(code=code_pb(codes, 3), k=8, mode=pb.HAMMING),
        pb.SearchRequest(id=int(ids[9]), k=4, mode=pb.HYBRID, offset=2),
        pb.SearchRequest(image=images[1], k=6, mode=pb.PREFIX, prefix_bits=2),
    ]
    batch = served.stub.BatchSearch(pb.BatchSearchRequest(requests=reqs))
    assert len(batch.responses) == len(reqs)
    for r, got in zip(reqs, batch.responses):
        assert list(got.hits) == list(served.stub.Search(r).hits)


def test_metadata_and_label_filter(served, dataset):
    ids, codes, metas = dataset
    q = codes[1]
    resp = served.stub.Search(pb.SearchRequest(code=code_pb(q), k=5, return_metadata=True))
    by_id = dict(zip(ids.tolist(), metas))
    for h in resp.hits:
        assert h.metadata["source"] == by_id[h.id]["source"]
        assert not h.HasField("code")
    for mode in ("lex", "hamming", "hybrid"):
        full = direct(served.index, q, mode, 10_000)
        want = [i for i in full if by_id[i]["labels"][0] in (2, 4)]
        resp = served.stub.Search(
            pb.SearchRequest(code=code_pb(q), k=12, offset=3, mode=MODES[mode], label_filter=["2", "c4"])
        )
        assert ids_of(resp) == want[3:15], mode
    full = direct(served.index, q, "prefix", 10_000, prefix_bits=1)
    want = [i for i in full if by_id[i]["labels"][0] == 2]
    got, cursor = [], b""
    for _ in range(1000):
        resp = served.stub.Search(
            pb.SearchRequest(code=code_pb(q), k=5, mode=pb.PREFIX, prefix_bits=1, label_filter=["2"], cursor=cursor)
        )
        got += ids_of(resp)
        cursor = resp.next_cursor
        if not cursor:
            break
    assert got == want


def test_get_code_stats_ping(served, images, dataset):
    resp = served.stub.GetCode(pb.GetCodeRequest(images=images[:4], return_confidence=True))
    codes, conf = served.hasher.encode([decode_image(b) for b in images[:4]])
    assert [c.code.data for c in resp.codes] == codes.to_bytes_list()
    np.testing.assert_allclose([list(c.confidence) for c in resp.codes], conf, rtol=1e-6)
    st = served.stub.GetStats(pb.GetStatsRequest())
    assert st.count == len(dataset[0])
    assert st.layout.nbits == NBITS and st.layout.class_bits == served.hasher.layout.class_bits
    assert list(st.layout.class_names) == list(served.hasher.layout.class_names)
    assert 0 < st.unique_percent <= 100 and st.entropy > 0
    assert len(st.prefix_entropy) == NBITS
    served.stub.Ping(pb.PingRequest())


def test_add_and_delete(served, images):
    stub = served.stub
    n0 = stub.GetStats(pb.GetStatsRequest()).count
    new = Codes.from_bits(np.ones((1, NBITS), np.uint8))
    resp = stub.Add(
        pb.AddRequest(
            items=[
                pb.Item(id=1, code=code_pb(new), metadata={"labels": [3], "note": "x"}),
                pb.Item(id=2, image=images[2]),
            ],
            return_codes=True,
        )
    )
    assert resp.added == 2
    enc, _ = served.hasher.encode([decode_image(images[2])])
    assert resp.codes[1].data == enc.packed[0].tobytes()
    assert stub.GetStats(pb.GetStatsRequest()).count == n0 + 2
    hits = stub.Search(pb.SearchRequest(id=1, k=1, return_metadata=True, return_codes=True)).hits
    assert hits[0].id == 1 and hits[0].code.data == new.packed[0].tobytes()
    assert hits[0].metadata["labels"] == [3]
    assert served.index.get(1).meta["labels"] == [3]  # Struct doubles come back as ints
    # existing id without upsert: nothing added
    with pytest.raises(grpc.RpcError) as e:
        stub.Add(pb.AddRequest(items=[pb.Item(id=77, code=code_pb(new)), pb.Item(id=1, code=code_pb(new))]))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError):
        stub.Search(pb.SearchRequest(k=10, id=77))
    # upsert replaces
    zero = Codes.from_bits(np.zeros((1, NBITS), np.uint8))
    assert stub.Add(pb.AddRequest(items=[pb.Item(id=1, code=code_pb(zero))], upsert=True)).added == 1
    assert served.index.get(1).code == zero
    # delete
    assert stub.Delete(pb.DeleteRequest(ids=[1, 2, 123456])).deleted == 2
    with pytest.raises(grpc.RpcError) as e:
        stub.Search(pb.SearchRequest(k=10, id=2))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    first = int(served.stub.Search(pb.SearchRequest(code=code_pb(zero), k=1)).hits[0].id)
    with pytest.raises(grpc.RpcError) as e:
        stub.Delete(pb.DeleteRequest(ids=[first, 999999], must_exist=True))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "999999" in e.value.details()
    assert stub.GetStats(pb.GetStatsRequest()).count == n0  # nothing deleted by the failed call


def _status(fn, req):
    with pytest.raises(grpc.RpcError) as e:
        fn(req)
    return e.value.code(), e.value.details()


def test_bad_inputs_get_status_and_server_keeps_serving(served, dataset, images, make_png):
    stub = served.stub
    ids, codes, _ = dataset
    ok = code_pb(codes)
    n0 = stub.GetStats(pb.GetStatsRequest()).count
    INV = grpc.StatusCode.INVALID_ARGUMENT

    code, msg = _status(stub.Search, pb.SearchRequest(k=10, image=b"definitely not an image"))
    assert code == INV and "cannot decode image" in msg and "not a recognised image format" in msg
    code, msg = _status(stub.Search, pb.SearchRequest(k=10, image=make_png(0)[:60]))  # truncated PNG
    assert code == INV and "cannot decode image" in msg
    code, msg = _status(stub.Search, pb.SearchRequest(k=10, code=pb.Code(data=b"\x00" * 4, nbits=32)))
    assert code == INV and "expects 16 bits" in msg
    code, msg = _status(stub.Search, pb.SearchRequest(k=10, code=pb.Code(data=b"\x00", nbits=16)))
    assert code == INV and "need exactly 2" in msg
    assert _status(stub.Search, pb.SearchRequest(k=10, id=424242))[0] == grpc.StatusCode.NOT_FOUND
    assert _status(stub.Search, pb.SearchRequest(k=1))[0] == INV  # no query
    code, msg = _status(stub.Search, pb.SearchRequest(code=ok, k=10_001))
    assert code == INV and "10000" in msg
    assert _status(stub.Search, pb.SearchRequest(k=10, code=ok, mode=pb.PREFIX, prefix_bits=0))[0] == INV
    assert _status(stub.Search, pb.SearchRequest(k=10, code=ok, mode=pb.PREFIX, prefix_bits=17))[0] == INV
    assert _status(stub.Search, pb.SearchRequest(k=10, code=ok, radius=2))[0] == INV  # radius in LEX
    assert _status(stub.Search, pb.SearchRequest(k=10, code=ok, mode=7))[0] == INV
    assert _status(stub.Search, pb.SearchRequest(k=10, code=ok, cursor=b"\x01"))[0] == INV
    for cursor in (b"\xff\xfe", b"zz", b"abc", b"00" * 3):  # garbage PREFIX cursors
        req = pb.SearchRequest(k=10, code=ok, mode=pb.PREFIX, prefix_bits=4, cursor=cursor)
        assert _status(stub.Search, req)[0] == INV, cursor
    code, msg = _status(stub.BatchSearch, pb.BatchSearchRequest(requests=[pb.SearchRequest(k=10, code=ok)] * 10_001))
    assert code == INV and "10000" in msg
    code, msg = _status(
        stub.BatchSearch,
        pb.BatchSearchRequest(requests=[pb.SearchRequest(k=10, image=images[0]), pb.SearchRequest(k=10, image=b"xx")]),
    )
    assert code == INV and "request 1" in msg
    # a failed Add adds nothing: one bad image among good items
    bad_add = pb.AddRequest(
        items=[pb.Item(id=5, code=ok), pb.Item(id=6, image=images[0]), pb.Item(id=7, image=b"junk")]
    )
    code, msg = _status(stub.Add, bad_add)
    assert code == INV and "item 2" in msg
    code, msg = _status(stub.Add, pb.AddRequest(items=[pb.Item(id=5, code=pb.Code(data=b"\x00\x00\x00", nbits=24))]))
    assert code == INV and "16 bits" in msg
    assert _status(stub.Add, pb.AddRequest(items=[pb.Item(id=5)]))[0] == INV
    assert _status(stub.Add, pb.AddRequest(items=[pb.Item(id=5, code=ok), pb.Item(id=5, code=ok)]))[0] == INV
    # pad bits must be zero (here 12-bit codes would need them; 16-bit codes have none) -> via nbits
    assert stub.GetStats(pb.GetStatsRequest()).count == n0
    # still serving, and still right
    stub.Ping(pb.PingRequest())
    resp = stub.Search(pb.SearchRequest(code=ok, k=3))
    assert ids_of(resp) == direct(served.index, codes[0], "lex", 3)


def test_oversized_message(index, hasher, server_factory, client_factory):
    server = server_factory(index, hasher, max_message_bytes=64 * 1024)
    stub = client_factory(server.address, max_message_bytes=8 << 20)
    big = b"\x89PNG" + b"\x00" * (200 * 1024)
    with pytest.raises(grpc.RpcError) as e:
        stub.Search(pb.SearchRequest(k=10, image=big))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub.Ping(pb.PingRequest())  # still serving


def test_default_message_limit_is_16_mib(served, client_factory):
    stub = client_factory(served.address, max_message_bytes=32 << 20)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetCode(pb.GetCodeRequest(images=[b"\x00" * (17 << 20)]))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # just under the limit goes through to the decoder (which rejects it properly)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetCode(pb.GetCodeRequest(images=[b"\x00" * (15 << 20)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deadline_honoured(index, slow_hasher_factory, server_factory, client_factory, images):
    server = server_factory(index, slow_hasher_factory(0.5))
    stub = client_factory(server.address)
    with pytest.raises(grpc.RpcError) as e:
        stub.Search(pb.SearchRequest(k=10, image=images[0]), timeout=0.1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stub.Ping(pb.PingRequest(), timeout=5)
    assert len(stub.Search(pb.SearchRequest(image=images[0], k=2), timeout=10).hits) == 2


def test_per_call_logs(served, caplog, images):
    with caplog.at_level(logging.INFO, logger="cbir.server.rpc"):
        served.stub.Search(pb.SearchRequest(image=images[0], k=2))
        with pytest.raises(grpc.RpcError):
            served.stub.Search(pb.SearchRequest(k=10, id=99999999))
    recs = [r for r in caplog.records if r.name == "cbir.server.rpc"]
    assert any(r.rpc_method == "Search" and r.rpc_status == "OK" and r.rpc_latency_ms > 0 for r in recs)
    assert any(r.rpc_status == "NOT_FOUND" for r in recs)
    text = caplog.text
    assert "PNG" not in text and "\\x89" not in text


def test_no_model_server_answers_codes_not_images(index, server_factory, client_factory, dataset, images):
    server = server_factory(index, None)
    stub = client_factory(server.address)
    assert len(stub.Search(pb.SearchRequest(code=code_pb(dataset[1]), k=3)).hits) == 3
    with pytest.raises(grpc.RpcError) as e:
        stub.Search(pb.SearchRequest(k=10, image=images[0]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
