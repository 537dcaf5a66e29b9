"""An ensemble model served over gRPC (issue 11): image queries carry the ensemble's class answer
(hardness, IDK flag, prediction set) and, when asked, an IDK query searches every class of its
prediction set. A real tiny ensemble checkpoint (three untrained convnet DDTL members, as in
tests/test_ensemble.py), a real on-disk index, a real server on loopback, the real client."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest

from cbir.codes import Codes
from cbir.v1 import search_pb2 as pb

CLASSES = ("ant", "bee", "cat", "dog")


def _member(seed: int):
    import torch

    from cbir.models.hasher import Hasher
    from cbir.models.registry import MethodSpec, create_method, resolve_params

    torch.manual_seed(seed)
    spec = MethodSpec(
        backbone="convnet",
        num_classes=len(CLASSES),
        nbits=None,
        depth=6,
        class_names=CLASSES,
        backbone_kwargs=(("width", 8),),
    )
    params = resolve_params("ddtl", None)
    return Hasher(create_method("ddtl", spec, params), "ddtl", spec, params, image_size=32, device="cpu")


def _png(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if isinstance(rgb, np.ndarray):
        Image.fromarray(rgb).save(buf, format="PNG")
    else:
        Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
    return buf.getvalue()


QUERIES = [_png((0, 0, 0)), _png((255, 0, 0)), _png(np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8))]


@pytest.fixture(scope="module")
def ensemble_paths(tmp_path_factory):
    """Two checkpoints of the same three members: margin 1.5 (these untrained members dispute
    the classes: IDK answers) and margin 0.5 (one class: sure answers)."""
    from cbir.ensemble import EnsembleHasher

    members = [_member(s) for s in (0, 1, 2)]
    d = tmp_path_factory.mktemp("ensemble")
    return {
        "idk": EnsembleHasher(members, "seed", margin=1.5).save(d / "idk.pt"),
        "sure": EnsembleHasher(members, "seed", margin=0.5).save(d / "sure.pt"),
    }


@pytest.fixture(scope="module")
def ens_index_dir(ensemble_paths, tmp_path_factory):
    """400 items with random codes of the ensemble's layout (every class subtree populated)."""
    from cbir.indexer import build_index
    from cbir.models.hasher import Hasher

    layout = Hasher.load(ensemble_paths["idk"], device="cpu").layout
    rng = np.random.default_rng(5)
    codes = Codes.from_bits(rng.integers(0, 2, size=(400, layout.nbits)).astype(np.uint8))
    ids = np.arange(400, dtype=np.int64) * 3
    metas = [{"labels": [i % 4]} for i in range(400)]
    return build_index(tmp_path_factory.mktemp("ens_index") / "ix", ids, codes, meta=metas, layout=layout)


@pytest.fixture(scope="module")
def ens_index(ens_index_dir):
    from cbir.indexer import open_index

    reader = open_index(ens_index_dir, readonly=True)
    yield reader
    reader.close()


@pytest.fixture
def ens_server(ens_index, ensemble_paths, server_factory):
    from cbir.client import CbirClient

    clients = []

    def make(which: str = "idk", **kw):
        server = server_factory(ens_index, ensemble_paths[which], writable=False, **kw)
        client = CbirClient(server.address, timeout=60).wait_ready()
        clients.append(client)
        return server, client

    yield make
    for c in clients:
        c.close()


def _offline(path, images: list[bytes]):
    """What the checkpoint answers offline: ``EnsembleHasher.encode_ensemble`` on the decoded
    images, and ``cbir.uncertainty.class_decision`` on the members' own class logits."""
    import torch

    from cbir.data.images import decode_image
    from cbir.ensemble import EnsembleHasher
    from cbir.models.hasher import Hasher
    from cbir.uncertainty import class_decision

    ens = Hasher.load(path, device="cpu")
    assert isinstance(ens, EnsembleHasher)
    x = ens.preprocess([decode_image(b) for b in images])
    enc = ens.encode_ensemble(x)
    with torch.no_grad():
        logits = np.stack([m.method.class_head(m.method.backbone(x)).numpy() for m in ens.members])
    dec = class_decision(logits, ens.tau, ens.margin)
    np.testing.assert_allclose(enc.decision.confidence, dec.confidence, rtol=1e-9)
    assert np.array_equal(enc.decision.prediction_set, dec.prediction_set)
    return enc, dec


def _assert_answer(res, dec, row: int):
    (want_set,) = dec.take(slice(row, row + 1)).sets()
    assert res.hardness == pytest.approx(float(dec.hardness[row]), rel=1e-5)
    assert res.idk is bool(dec.idk[row])
    assert [c.index for c in res.prediction_set] == want_set
    assert [c.name for c in res.prediction_set] == [CLASSES[c] for c in want_set]
    for c in res.prediction_set:
        assert c.confidence == pytest.approx(float(dec.confidence[row, c.index]), rel=1e-5, abs=1e-6)


def test_image_search_carries_the_ensemble_class_answer(ens_server, ensemble_paths, ens_index):
    server, client = ens_server("idk")
    enc, dec = _offline(ensemble_paths["idk"], QUERIES)
    assert dec.idk.all()  # these members dispute every query (set of several classes)
    for row, image in enumerate(QUERIES):
        res = client.search(image=image, k=7)
        _assert_answer(res, dec, row)
        assert res.searched_prediction_set is False  # not asked: a plain search
        assert res.query_code == enc.codes[row : row + 1]
        want = ens_index.search_lex(enc.codes[row : row + 1], 7)
        assert res.ids.tolist() == want.ids.tolist()
    # BatchSearch: one encoder batch, every image query answered, code queries not
    batch = client.batch_search([QUERIES[0], enc.codes[1:2], QUERIES[2]], k=3)
    _assert_answer(batch[0], dec, 0)
    _assert_answer(batch[2], dec, 2)
    assert batch[1].prediction_set is None and batch[1].hardness is None and batch[1].idk is None
    # id and code queries have no class answer
    by_code = client.search(code=enc.codes[0:1], k=3)
    assert by_code.prediction_set is None and by_code.hardness is None
    raw = client.stub.Search(pb.SearchRequest(id=int(want.ids[0]), k=3))
    assert not raw.HasField("uncertainty")


def test_idk_query_searches_its_prediction_set(ens_server, ensemble_paths, ens_index):
    from cbir.ensemble import search_prediction_set

    _, client = ens_server("idk")
    enc, dec = _offline(ensemble_paths["idk"], QUERIES)
    cb = ens_index.layout.class_bits
    for row, image in enumerate(QUERIES):
        (classes,) = dec.take(slice(row, row + 1)).sets()
        assert len(classes) >= 2
        q = enc.codes[row : row + 1]
        res = client.search(image=image, k=25, search_prediction_set=True, return_codes=True)
        assert res.searched_prediction_set is True and res.idk is True
        want_ids, want_codes = search_prediction_set(ens_index, q, classes, 25)
        assert res.ids.tolist() == want_ids.tolist() and res.codes == want_codes
        assert res.rank.tolist() == list(range(len(want_ids)))
        hit_classes = {int("".join(map(str, b[:cb])), 2) for b in res.codes.to_bits()}
        assert hit_classes == set(classes)  # every class of the set contributes, no other
        assert res.hamming.tolist() == [int(np.bitwise_count(q.packed[0] ^ c).sum()) for c in res.codes.packed]
        plain = client.search(image=image, k=25)
        assert plain.ids.tolist() != res.ids.tolist()  # the plain search stays in one subtree first
    # the same in BatchSearch, mixed with a plain request
    out = client.batch_search([QUERIES[1]], k=10, search_prediction_set=True)
    (classes,) = dec.take(slice(1, 2)).sets()
    assert out[0].ids.tolist() == search_prediction_set(ens_index, enc.codes[1:2], classes, 10)[0].tolist()


def test_sure_query_is_searched_as_usual(ens_server, ensemble_paths, ens_index):
    _, client = ens_server("sure")
    enc, dec = _offline(ensemble_paths["sure"], QUERIES)
    assert not dec.idk.any()  # a margin of 0.5: one class each
    for row, image in enumerate(QUERIES):
        res = client.search(image=image, k=9, search_prediction_set=True)
        _assert_answer(res, dec, row)
        assert res.searched_prediction_set is False and len(res.prediction_set) == 1
        assert res.ids.tolist() == ens_index.search_lex(enc.codes[row : row + 1], 9).ids.tolist()


def test_single_model_has_no_class_answer(served, images):
    """A plain single model: the new fields stay unset, the answer is the plain search's."""
    from cbir.client import CbirClient, FailedPrecondition

    raw = served.stub.Search(pb.SearchRequest(image=images[0], k=5))
    assert not raw.HasField("uncertainty")
    with CbirClient(served.address, timeout=60) as client:
        res = client.search(image=images[0], k=5)
        assert res.prediction_set is None and res.hardness is None and res.idk is None
        assert res.ids.tolist() == [h.id for h in raw.hits]
        with pytest.raises(FailedPrecondition, match="needs an ensemble model"):
            client.search(image=images[0], k=5, search_prediction_set=True)


def _status(fn, req) -> tuple[str, str]:
    try:
        fn(req, timeout=60)
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""


def test_malformed_prediction_set_requests_are_invalid(ens_server, ensemble_paths):
    server, client = ens_server("idk")
    enc, _ = _offline(ensemble_paths["idk"], QUERIES[:1])
    code = pb.Code(data=enc.codes.packed[0].tobytes(), nbits=enc.codes.nbits)
    img = QUERIES[0]
    cases = [
        (pb.SearchRequest(code=code, k=5, search_prediction_set=True), "needs an image query"),
        (pb.SearchRequest(id=3, k=5, search_prediction_set=True), "this request has an id"),
        (pb.SearchRequest(image=img, k=5, mode=pb.HAMMING, search_prediction_set=True), "use mode LEXICOGRAPHIC"),
        (pb.SearchRequest(image=img, k=5, offset=2, search_prediction_set=True), "takes no offset"),
        (pb.SearchRequest(image=img, k=5, label_filter=["1"], search_prediction_set=True), "takes no label_filter"),
        (pb.SearchRequest(image=img, k=0, search_prediction_set=True), "k must be >= 1"),
    ]
    for req, msg in cases:
        status, detail = _status(client.stub.Search, req)
        assert status == "INVALID_ARGUMENT" and msg in detail, (req, status, detail)
    batch = pb.BatchSearchRequest(requests=[pb.SearchRequest(image=img, k=2), cases[2][0]])
    status, detail = _status(client.stub.BatchSearch, batch)
    assert status == "INVALID_ARGUMENT" and detail.startswith("request 1: search_prediction_set"), detail


def test_prediction_set_search_is_bounded(ens_server, ensemble_paths):
    """(Set size + 1) x k (k per class of the set and k for the filling plain search) counts
    against the per-call hit limit, before any search runs."""
    _, dec = _offline(ensemble_paths["idk"], QUERIES[:1])
    n = int(dec.prediction_set[0].sum()) + 1
    k = 40
    server, client = ens_server("idk", max_hits_per_call=n * k - 1)
    from cbir.client import ResourceExhausted

    assert len(client.search(image=QUERIES[0], k=k)) == k  # k alone fits
    searches: list = []
    server.backend.reader = _Spy(server.backend.reader, searches)
    with pytest.raises(ResourceExhausted, match=f"{n * k} ranked hits"):
        client.search(image=QUERIES[0], k=k, search_prediction_set=True)
    assert searches == []  # refused up front
    assert len(client.search(image=QUERIES[0], k=k)) == k and searches == ["search_lex"]  # the spy sees searches
    _, client2 = ens_server("idk", max_hits_per_call=n * k)
    assert len(client2.search(image=QUERIES[0], k=k, search_prediction_set=True)) == k


class _Spy:
    """The real reader, recording the searches made through it."""

    def __init__(self, reader, calls: list) -> None:
        self._reader, self._calls = reader, calls

    def __getattr__(self, name):
        attr = getattr(self._reader, name)
        if name.startswith("search"):

            def spy(*a, **kw):
                self._calls.append(name)
                return attr(*a, **kw)

            return spy
        return attr


def test_cbir_search_prints_the_class_answer(ens_server, ensemble_paths, tmp_path, capsys):
    from cbir.cli import main

    server, _ = ens_server("idk")
    _, dec = _offline(ensemble_paths["idk"], QUERIES[:1])
    (classes,) = dec.take(slice(0, 1)).sets()
    img = tmp_path / "q.png"
    img.write_bytes(QUERIES[0])
    assert main(["search", "--address", server.address, "--image", str(img), "-k", "4", "--prediction-set"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("query code: ")
    assert lines[1].startswith("class answer: IDK, hardness ") and "hits from every class of the set" in lines[1]
    assert lines[1].index(CLASSES[classes[0]]) < lines[1].index(CLASSES[classes[1]])  # best first
    assert lines[2].split()[:2] == ["rank", "id"]
    assert main(["search", "--address", server.address, "--image", str(img), "-k", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    u = data["uncertainty"]
    assert u["idk"] is True and u["searched_prediction_set"] is False
    assert [c["index"] for c in u["prediction_set"]] == classes
    assert all(type(c["index"]) is int for c in u["prediction_set"])
    assert u["hardness"] == pytest.approx(float(dec.hardness[0]), rel=1e-5)
    assert len(data["hits"]) == 4


def test_hostile_requests_to_an_ensemble_server(ens_server, ens_index):
    """The seeded hostile-request generator against the ensemble server: bad input gets a
    client-fault status (never INTERNAL/UNKNOWN), and the server keeps answering the same."""
    from cbir.server.fuzz import BAD_INPUT_OK, hostile_requests, raw_caller

    server, client = ens_server("idk")
    before = client.search(image=QUERIES[0], k=5, search_prediction_set=True)
    ids = [int(i) for i in np.arange(400) * 3]
    bad, seen = [], set()
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        callers: dict = {}
        for method, body, kind in hostile_requests(300, 21, ens_index.nbits, ids, QUERIES[2]):
            fn = callers.get(method) or callers.setdefault(method, raw_caller(ch, method))
            status, detail = _status(fn, body)
            seen.add(status)
            if status not in BAD_INPUT_OK:
                bad.append((kind, method, status, detail[:200]))
    assert not bad, bad[:5]
    assert "INVALID_ARGUMENT" in seen and "OK" in seen
    after = client.search(image=QUERIES[0], k=5, search_prediction_set=True)
    assert after.ids.tolist() == before.ids.tolist() and after.prediction_set == before.prediction_set


def test_cbir_serve_an_ensemble_checkpoint(ensemble_paths, ens_index_dir, ens_index):
    """``cbir serve --model <ensemble checkpoint>`` in its own process: it says it serves an
    ensemble, and image queries get the class answer and the prediction-set search."""
    import signal
    import subprocess
    import sys

    from cbir.client import CbirClient
    from cbir.ensemble import search_prediction_set

    from .test_server_cli import _read_line_with

    enc, dec = _offline(ensemble_paths["idk"], QUERIES[:1])
    cmd = [sys.executable, "-m", "cbir.cli", "serve", "--index", str(ens_index_dir), "--model"]
    cmd += [str(ensemble_paths["idk"]), "--address", "127.0.0.1:0", "--grace", "5", "--no-access-log"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line_with(proc, "SERVING", timeout=90)
        assert "[ensemble of 3 members: image queries get hardness, IDK and prediction set]" in line
        address = line.split(" on ", 1)[1].split()[0]
        with CbirClient(address, timeout=60) as client:
            res = client.search(image=QUERIES[0], k=6, search_prediction_set=True)
        _assert_answer(res, dec, 0)
        (classes,) = dec.take(slice(0, 1)).sets()
        assert res.ids.tolist() == search_prediction_set(ens_index, enc.codes[0:1], classes, 6)[0].tolist()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_async_client_exposes_the_class_answer(ens_server, ensemble_paths, ens_index):
    import asyncio

    from cbir.client import AsyncCbirClient
    from cbir.ensemble import search_prediction_set

    server, _ = ens_server("idk")
    enc, dec = _offline(ensemble_paths["idk"], QUERIES[1:2])

    async def go():
        async with AsyncCbirClient(server.address, timeout=60) as c:
            return await c.search(image=QUERIES[1], k=5, search_prediction_set=True), await c.search(
                code=enc.codes[0:1], k=5
            )

    res, by_code = asyncio.run(go())
    _assert_answer(res, dec, 0)
    (classes,) = dec.take(slice(0, 1)).sets()
    assert res.searched_prediction_set and res.ids.tolist() == (
        search_prediction_set(ens_index, enc.codes[0:1], classes, 5)[0].tolist()
    )
    assert by_code.prediction_set is None and by_code.idk is None
