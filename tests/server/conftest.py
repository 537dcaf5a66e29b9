"""Fixtures for the gRPC server tests: a real server on an ephemeral loopback port, a real client.

The index is a real on-disk ``cbir.indexer`` index (``build_index`` + ``open_index``); results
are compared with that ``IndexReader`` used directly and with ``cbir.codes.rank``.
The model is a real ``Hasher`` around an untrained DDTL (random weights give valid codes).
"""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

import numpy as np
import pytest

from cbir.codes import Codes

NBITS = 16
N_ITEMS = 300


# --- a tiny real model ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def hasher():
    import torch

    from cbir.models.hasher import Hasher
    from cbir.models.registry import MethodSpec, create_method, resolve_params

    torch.manual_seed(0)
    spec = MethodSpec(
        backbone="convnet",
        num_classes=10,
        nbits=NBITS,
        depth=12,
        class_names=tuple(f"c{i}" for i in range(10)),
        backbone_kwargs=(("width", 8),),
    )
    params = resolve_params("ddtl", None)
    method = create_method("ddtl", spec, params)
    return Hasher(method, "ddtl", spec, params, image_size=32, device="cpu", batch_size=256)


class SlowHasher:
    """Wraps a hasher; every forward pass sleeps ``delay`` seconds (deadlines, shutdown)."""

    def __init__(self, inner, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.layout = inner.layout
        self.content_hash = inner.content_hash
        self.calls = 0

    def preprocess(self, images):
        return self.inner.preprocess(images)

    def encode(self, x):
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.encode(x)


@pytest.fixture
def slow_hasher_factory(hasher):
    return lambda delay: SlowHasher(hasher, delay)


def png_bytes(seed: int, size: int = 32) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def make_png():
    return png_bytes


@pytest.fixture(scope="session")
def images():
    return [png_bytes(i) for i in range(8)]


# --- index ---------------------------------------------------------------------------------
def make_dataset(seed: int = 0, n: int = N_ITEMS):
    """Clustered 16-bit codes with duplicates, non-contiguous ids, labels in metadata."""
    rng = np.random.default_rng(seed)
    centers = rng.integers(0, 2, size=(6, NBITS))
    which = rng.integers(0, 6, size=n)
    bits = centers[which] ^ (rng.random((n, NBITS)) < 0.15)
    bits[n // 2 : n // 2 + 20] = bits[n // 2]  # a block of duplicates
    codes = Codes.from_bits(bits.astype(np.uint8))
    ids = (1000 + 7 * np.arange(n)).astype(np.int64)
    metas = [{"labels": [int(which[i])], "source": f"item{i}"} for i in range(n)]
    return ids, codes, metas


@pytest.fixture
def dataset():
    return make_dataset()


@pytest.fixture
def index_dir(hasher, dataset, tmp_path):
    """An on-disk cbir.indexer index holding ``dataset``, built for ``hasher``."""
    from cbir.indexer import build_index

    ids, codes, metas = dataset
    return build_index(tmp_path / "index", ids, codes, meta=metas, layout=hasher.layout, model_hash=hasher.content_hash)


@pytest.fixture
def index(index_dir):
    """The writable ``IndexReader`` of ``index_dir`` (what the server serves)."""
    from cbir.indexer import open_index

    reader = open_index(index_dir, readonly=False)
    yield reader
    reader.close()


# --- server ---------------------------------------------------------------------------------
@pytest.fixture
def server_factory():
    from cbir.server import create_server

    started = []

    def make(index, hasher=None, **kw):
        kw.setdefault("max_workers", 8)
        # no pacing of failed calls: the fuzz and contract tests send thousands from one host
        # (the pacing has its own test, test_server_fuzz.py::test_failed_calls_are_paced)
        kw.setdefault("fault_rate", 0.0)
        s = create_server(index, hasher, "127.0.0.1:0", **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop(grace=0)


@pytest.fixture
def client_factory():
    import grpc

    from cbir.server import connect

    channels = []

    def make(address, **kw):
        ch, stub = connect(address, **kw)
        channels.append(ch)
        grpc.channel_ready_future(ch).result(timeout=10)
        return stub

    yield make
    for ch in channels:
        ch.close()


@pytest.fixture
def served(index, hasher, server_factory, client_factory):
    server = server_factory(index, hasher)
    stub = client_factory(server.address)
    return SimpleNamespace(server=server, stub=stub, index=index, hasher=hasher, address=server.address)
