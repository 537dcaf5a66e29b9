"""A label filter on an index without a posting list keeps the bounded scan (``--max-filter-scan``).

The index is real and of the older format (its manifest has no ``labels_db``): the reader still
has ``ids_with_labels`` (a meta scan, O(N)), so the server must route on ``has_label_index``.
"""

from __future__ import annotations

import json

import grpc
import pytest

from cbir.v1 import search_pb2 as pb


@pytest.fixture
def old_format_index(index_dir):
    from cbir.indexer import open_index

    man_path = index_dir / "manifest.json"
    man = json.loads(man_path.read_text())
    del man["labels_db"]
    man_path.write_text(json.dumps(man))
    reader = open_index(index_dir)
    assert not reader.has_label_index and hasattr(reader, "ids_with_labels")
    yield reader
    reader.close()


def _code(codes) -> pb.Code:
    return pb.Code(data=codes.packed[0].tobytes(), nbits=codes.nbits)


def test_old_index_filter_is_bounded_scan(old_format_index, server_factory, client_factory, dataset):
    q = _code(dataset[1])
    stub = client_factory(server_factory(old_format_index, None, max_filter_scan=100).address)
    for mode in (pb.LEXICOGRAPHIC, pb.HAMMING):
        with pytest.raises(grpc.RpcError) as e:
            stub.Search(pb.SearchRequest(code=q, k=5, mode=mode, label_filter=["nomatch"]))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "label filter examined 100 items" in e.value.details()
    # a filter that matches within the scan limit is served by the scan
    hits = stub.Search(pb.SearchRequest(code=q, k=5, label_filter=["1"], return_metadata=True)).hits
    assert len(hits) == 5 and all(list(h.metadata["labels"]) == [1.0] for h in hits)


def test_posting_list_index_answers_empty_filter_at_once(index_dir, server_factory, client_factory, dataset):
    from cbir.indexer import open_index

    with open_index(index_dir) as reader:
        assert reader.has_label_index
        stub = client_factory(server_factory(reader, None, max_filter_scan=1).address)
        q = _code(dataset[1])
        assert len(stub.Search(pb.SearchRequest(code=q, k=5, label_filter=["nomatch"])).hits) == 0
        assert len(stub.Search(pb.SearchRequest(code=q, k=5, label_filter=["1"])).hits) == 5
