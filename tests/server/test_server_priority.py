"""Where the server's work runs: search threads, low-priority bulk threads, the encoder thread.

The thread names and nice values are read from ``/proc/self/task`` (Linux): what the kernel
actually schedules, not what the server says it did.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from cbir.codes import Codes
from cbir.v1 import search_pb2 as pb

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux only")


def code_pb(c: Codes) -> pb.Code:
    return pb.Code(data=c.packed[0].tobytes(), nbits=c.nbits)


def threads(pid: int | str = "self") -> dict[str, list[int]]:
    """Thread name -> nice values of the threads of process ``pid``."""
    out: dict[str, list[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread exited meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        nice = int(stat[stat.rindex(")") + 2 :].split()[16])
        out.setdefault(name, []).append(nice)
    return out


@linux
def test_bulk_work_and_the_encoder_run_at_a_lower_priority(
    index, hasher, server_factory, client_factory, dataset, images
):
    ids, codes, _ = dataset
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base + 7 > 19:
        pytest.skip("the test process already runs at the lowest priority")
    server = server_factory(index, hasher, max_workers=2, bulk_workers=2, bulk_nice=7)
    stub = client_factory(server.address)
    q = code_pb(codes[3])
    stub.Search(pb.SearchRequest(code=q, k=5, mode=pb.HAMMING))  # a search thread
    stub.BatchSearch(pb.BatchSearchRequest(requests=[pb.SearchRequest(code=q, k=5)] * 3))  # a bulk thread
    stub.Search(pb.SearchRequest(image=images[0], k=5))  # the encoder
    got = threads()
    assert got.get("cbir-search") and all(n == base for n in got["cbir-search"]), got
    assert got.get("cbir-bulk") and all(n == base + 7 for n in got["cbir-bulk"]), got
    assert got.get("cbir-encoder") and base + 7 in got["cbir-encoder"], got
    assert got.get("cbir-loop") and all(n == base for n in got["cbir-loop"]), got
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller's own priority is untouched


@pytest.mark.parametrize("bulk_min_hits", [1, 10_000])
def test_where_a_search_runs_never_changes_its_answer(index, server_factory, client_factory, dataset, bulk_min_hits):
    """Bulk threads (every search with bulk_min_hits=1) or search threads / the event loop: the
    same hits, also for label filters and BatchSearch."""
    ids, codes, _ = dataset
    stub = client_factory(server_factory(index, None, bulk_min_hits=bulk_min_hits).address)
    ref = client_factory(server_factory(index, None, bulk_workers=0, bulk_min_hits=10_000).address)
    reqs = []
    for i in (0, 17, 150):
        for mode in (pb.LEXICOGRAPHIC, pb.HAMMING, pb.HYBRID):
            reqs.append(pb.SearchRequest(code=code_pb(codes[i]), k=40, mode=mode))
            reqs.append(pb.SearchRequest(id=int(ids[i]), k=7, offset=3, mode=mode, label_filter=["2", "4"]))
    for r in reqs:
        assert stub.Search(r) == ref.Search(r)
    assert stub.BatchSearch(pb.BatchSearchRequest(requests=reqs)) == ref.BatchSearch(
        pb.BatchSearchRequest(requests=reqs)
    )


def test_bad_batch_queries_are_still_invalid_argument_from_the_bulk_threads(served):
    """BatchSearch validation moved off the event loop: the same statuses and messages."""
    bad = pb.BatchSearchRequest(requests=[pb.SearchRequest(code=pb.Code(data=b"\x00\x00", nbits=16), k=1)] * 2)
    bad.requests[1].k = 0
    with pytest.raises(grpc.RpcError) as e:
        served.stub.BatchSearch(bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request 1: k must be >= 1" in e.value.details()
    missing = pb.BatchSearchRequest(requests=[pb.SearchRequest(id=2**62, k=1)])
    with pytest.raises(grpc.RpcError) as e:
        served.stub.BatchSearch(missing)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"bulk_nice": 20}, "bulk_nice must be in 0..19"),
        ({"bulk_nice": -1}, "bulk_nice must be in 0..19"),
        ({"bulk_workers": -1}, "bulk_workers must be >= 0"),
        ({"bulk_min_hits": 0}, "bulk_min_hits must be >= 1"),
        ({"switch_interval_s": 0.0}, "switch_interval_s must be > 0"),
    ],
)
def test_bad_scheduling_options_are_clear_errors(index, kw, match):
    from cbir.server import create_server

    with pytest.raises(ValueError, match=match):
        create_server(index, None, "127.0.0.1:0", **kw)


@linux
def test_sched_names_and_lowers_only_the_calling_thread():
    from cbir.server.sched import lower_priority, name_thread

    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base + 3 > 19:
        pytest.skip("the test process already runs at the lowest priority")
    seen = {}

    def body():
        seen["named"] = name_thread("cbir-test-thr")
        seen["nice"] = lower_priority(3)
        seen["tid"] = threading.get_native_id()
        seen["comm"] = Path(f"/proc/self/task/{seen['tid']}/comm").read_text().strip()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"named": True, "nice": base + 3, "tid": seen["tid"], "comm": "cbir-test-thr"}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
    with pytest.raises(ValueError, match="only lowering"):
        lower_priority(-1)
    assert np.isfinite(base)
