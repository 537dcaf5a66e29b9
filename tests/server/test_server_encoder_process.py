"""The image encoder in a child process (``cbir serve --encoder-process``): same codes as the
thread, per-job failures, a child that dies is replaced, its priority, and a real server."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from cbir.v1 import search_pb2 as pb


@pytest.fixture
def proc_encoder(hasher):
    from cbir.server.encoder import MicroBatchEncoder

    enc = MicroBatchEncoder(hasher, max_batch=64, max_wait_s=0.3, process=True, nice=3)
    yield enc
    enc.close()


def test_child_gives_the_thread_codes_and_fails_only_the_bad_job(proc_encoder, hasher, images):
    """A corrupt payload fails its own job with the reason; the jobs batched with it get the
    codes and confidences the in-process encoder gives (bit for bit), tensor jobs included."""
    import torch

    from cbir.data import decode_image as decode
    from cbir.server.encoder import ImageDecodeError, MicroBatchEncoder

    enc = proc_encoder
    x = hasher.preprocess([decode(images[4]), decode(images[5])])
    good1 = enc.submit_images([images[0], images[1]])
    bad = enc.submit_images([images[2], b"\x89PNG not really"], names=["first", "second"])
    good2 = enc.submit_images([images[3]])
    tens = enc.submit(x)
    c1, f1 = good1.result(timeout=60)
    c2, f2 = good2.result(timeout=60)
    c3, _ = tens.result(timeout=60)
    with pytest.raises(ImageDecodeError, match="^second: cannot decode image"):
        bad.result(timeout=60)

    ref = MicroBatchEncoder(hasher, max_batch=64, max_wait_s=0.3)
    try:
        r1, g1 = ref.submit_images([images[0], images[1]]).result(timeout=60)
        r2, g2 = ref.submit_images([images[3]]).result(timeout=60)
        r3, _ = ref.submit(torch.as_tensor(x)).result(timeout=60)
    finally:
        ref.close()
    assert c1.to_bytes_list() == r1.to_bytes_list() and c2.to_bytes_list() == r2.to_bytes_list()
    assert c3.to_bytes_list() == r3.to_bytes_list()
    assert np.array_equal(f1, g1) and np.array_equal(f2, g2)
    assert enc.images_encoded == 5


def test_a_dead_child_fails_nothing_queued_later_and_is_replaced(proc_encoder, images):
    """Kill -9 the child: the next request starts a new one and is answered."""
    runner = proc_encoder._runner
    pid = runner.pid
    before, _ = proc_encoder.submit_images([images[0]]).result(timeout=60)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while runner._proc is not None and runner._proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    after, _ = proc_encoder.submit_images([images[0]]).result(timeout=120)
    assert runner.starts == 2 and runner.pid != pid
    assert after.to_bytes_list() == before.to_bytes_list()


def test_child_runs_at_the_lower_priority_and_its_model_copy_is_removed(hasher):
    """The child's nice value is the parent's + ``nice``; the model copy written for it (the
    hasher came as an object) lives in a folder the encoder made and removes at close."""
    from cbir.server.encoder import MicroBatchEncoder

    enc = MicroBatchEncoder(hasher, process=True, nice=4)
    runner = enc._runner
    try:
        folder = os.path.dirname(runner.model_path)
        assert os.path.exists(runner.model_path)
        if hasattr(os, "getpriority"):
            assert os.getpriority(os.PRIO_PROCESS, runner.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 4)
    finally:
        enc.close()
    assert not os.path.exists(folder)


def test_server_answers_image_queries_through_the_child(index, hasher, server_factory, client_factory, images):
    """A server with ``encoder_process``: image Search, GetCode and a corrupt image (INVALID_ARGUMENT)
    answer as the thread encoder's server does."""
    import grpc

    server = server_factory(index, hasher, encoder_process=True)
    ref = server_factory(index, hasher)
    stub, ref_stub = client_factory(server.address), client_factory(ref.address)
    assert server.encoder._runner is not None and ref.encoder._runner is None
    req = pb.SearchRequest(image=images[1], k=5)
    assert [h.id for h in stub.Search(req).hits] == [h.id for h in ref_stub.Search(req).hits]
    got = stub.GetCode(pb.GetCodeRequest(images=images[:3]))
    want = ref_stub.GetCode(pb.GetCodeRequest(images=images[:3]))
    assert list(got.codes) == list(want.codes) and len(got.codes) == 3
    with pytest.raises(grpc.RpcError) as err:
        stub.Search(pb.SearchRequest(image=b"\x89PNG\r\n\x1a\n broken", k=3))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
