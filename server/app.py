"""Server assembly: :class:`CbirServer`, :func:`create_server`, :func:`serve_in_process`, :func:`connect`.

The server is a ``grpc.aio`` server running on its own event-loop thread, behind a synchronous
API (start, attach, stop) so that the CLI, the demo and tests can drive it from ordinary code.
See :mod:`cbir.server.service` for what runs on the loop and what on the offload pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cbir.data.images import SAFE_FORMATS
from cbir.v1 import search_pb2 as pb
from cbir.v1 import search_pb2_grpc as pb_grpc

from .backend import IndexBackend, open_backend
from .encoder import MicroBatchEncoder
from .guard import FaultPacer
from .sched import name_thread
from .security import BearerTokenClientInterceptor, TokenAuthInterceptor, check_bind_policy, split_address
from .service import Limits, SearchServicer

log = logging.getLogger("cbir.server")

__all__ = ["ServerOptions", "CbirServer", "create_server", "serve_in_process", "connect", "SERVICE_NAME"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SearchService"].full_name  # "cbir.v1.SearchService"
DEFAULT_ADDRESS = "127.0.0.1:50051"
MiB = 1 << 20


@dataclass
class ServerOptions:
    max_message_bytes: int = 16 * MiB
    max_k: int = 10_000
    max_batch: int = 10_000
    max_image_pixels: int = 4096 * 4096  # per image, read from the header before decoding
    max_request_pixels: int = 2 * 4096 * 4096  # all the images of one call together
    max_images_per_call: int = 256  # images of one Search/BatchSearch/Add/GetCode
    image_formats: tuple[str, ...] = SAFE_FORMATS  # never EPS/PS/PDF (cbir.data.images.NEVER_FORMATS)
    max_hits_per_call: int = 200_000  # sum of k + offset over the queries of one Search/BatchSearch
    max_filter_scan: int = 50_000  # items a label-filtered search may examine
    max_call_cpu_s: float = 2.0  # CPU seconds the search work of one call may use (checked between queries)
    max_workers: int = 4  # search threads: single unfiltered HAMMING/HYBRID searches of k + offset <= bulk_min_hits
    bulk_workers: int = 2  # bulk threads: BatchSearch, filtered and large-k searches, writes, stats
    bulk_nice: int = 10  # added to the nice value of the bulk threads and the image encoder (cbir.server.sched)
    bulk_min_hits: int = 1000  # a single search ranking more (k + offset) goes to the bulk threads
    switch_interval_s: float | None = None  # sys.setswitchinterval (process-wide) when set
    inline_modes: tuple[str, ...] = ("lex", "prefix")  # search modes served on the event loop itself
    max_concurrent_rpcs: int | None = None
    fault_rate: float = 100.0  # answers per second to one host's failed calls past fault_burst (0: no pacing)
    fault_burst: int = 20
    preload: bool = True  # fault in the index's pages before SERVING (IndexReader.preload)
    encoder_max_batch: int = 64
    encoder_max_wait_s: float = 0.002  # a batch keeps filling while requests arrive this close together
    encoder_max_delay_s: float | None = None  # ... for at most this long (default 8 x encoder_max_wait_s)
    encoder_max_queue: int = 1024
    encoder_step_pixels: int = 8 << 20  # decoded pixels per encoder step (fairness between requests)
    encoder_process: bool = False  # decode + forward pass in a child process (cbir.server.encoder_proc)
    token: str | None = None
    tls_cert: bytes | None = None  # PEM certificate chain
    tls_key: bytes | None = None  # PEM private key
    insecure: bool = False
    reflection: bool = True
    allow_model_mismatch: bool = False
    extra_grpc_options: list = field(default_factory=list)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class _LoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="cbir-grpc-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        name_thread("cbir-loop")
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro, timeout: float | None = None):
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class CbirServer:
    """A started gRPC server: health NOT_SERVING until :meth:`attach` gives it index + model."""

    def __init__(self, address: str = DEFAULT_ADDRESS, options: ServerOptions | None = None) -> None:
        self.options = opts = options or ServerOptions()
        if (opts.tls_cert is None) != (opts.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if opts.max_workers < 1:
            raise ValueError(f"max_workers (offload threads) must be >= 1, got {opts.max_workers}")
        if opts.fault_rate < 0:
            raise ValueError(f"fault_rate must be >= 0 answers per second (0: no pacing), got {opts.fault_rate}")
        if opts.switch_interval_s is not None and not opts.switch_interval_s > 0:
            raise ValueError(f"switch_interval_s must be > 0, got {opts.switch_interval_s}")
        check_bind_policy(address, opts.tls, opts.token, opts.insecure)
        host, _ = split_address(address)
        self.servicer = SearchServicer(
            self._limits(opts),
            opts.max_workers,
            opts.inline_modes,
            bulk_workers=opts.bulk_workers,
            bulk_nice=opts.bulk_nice,
            bulk_min_hits=opts.bulk_min_hits,
            pacer=FaultPacer(opts.fault_rate, opts.fault_burst) if opts.fault_rate > 0 else None,
        )
        if opts.switch_interval_s is not None:
            sys.setswitchinterval(opts.switch_interval_s)
        self._loop = _LoopThread()
        try:
            self._server, port, why = self._loop.call(self._start(address), timeout=60)
            if not port:
                raise OSError(f"cannot bind {address} (address in use or not local?){why}")
        except BaseException:
            self._loop.close()
            self.servicer.close()
            raise
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.backend: IndexBackend | None = None
        self.encoder: MicroBatchEncoder | None = None
        self._owns_backend = False
        self._stopped = threading.Event()
        log.info("listening on %s (tls=%s, token=%s)", self.address, opts.tls, bool(opts.token))

    @staticmethod
    def _limits(opts: ServerOptions) -> Limits:
        from cbir.data.images import resolve_formats

        for name in (
            "max_k",
            "max_batch",
            "max_image_pixels",
            "max_request_pixels",
            "max_images_per_call",
            "max_hits_per_call",
            "max_filter_scan",
            "encoder_step_pixels",
        ):
            if getattr(opts, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(opts, name)}")
        if not opts.max_call_cpu_s > 0:
            raise ValueError(f"max_call_cpu_s must be > 0, got {opts.max_call_cpu_s}")
        formats = resolve_formats(opts.image_formats)  # ValueError for an unknown format
        if not formats:
            raise ValueError(f"no usable image format in {opts.image_formats!r} (EPS/PS/PDF are never read)")
        return Limits(
            max_k=opts.max_k,
            max_batch=opts.max_batch,
            max_image_pixels=opts.max_image_pixels,
            max_request_pixels=opts.max_request_pixels,
            max_images_per_call=opts.max_images_per_call,
            image_formats=formats,
            max_hits_per_call=opts.max_hits_per_call,
            max_filter_scan=opts.max_filter_scan,
            max_call_cpu_s=float(opts.max_call_cpu_s),
            max_response_bytes=int(opts.max_message_bytes),
        )

    async def _start(self, address: str):
        """Build, bind and start the aio server on the loop thread; returns (server, port, why)."""
        opts = self.options
        interceptors = [TokenAuthInterceptor(opts.token)] if opts.token else []
        grpc_options = list(
            {
                **{  # extra options override these (--processes sets grpc.so_reuseport=1)
                    "grpc.max_receive_message_length": int(opts.max_message_bytes),
                    "grpc.max_send_message_length": int(opts.max_message_bytes),
                    "grpc.so_reuseport": 0,  # never share a port with another server, unless asked
                },
                **dict(opts.extra_grpc_options),
            }.items()
        )
        server = grpc.aio.server(
            interceptors=interceptors, options=grpc_options, maximum_concurrent_rpcs=opts.max_concurrent_rpcs
        )
        server.add_generic_rpc_handlers((self.servicer.generic_handler(),))  # raw bytes in: see guard.py
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if opts.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        why = ""
        try:
            if opts.tls:
                creds = grpc.ssl_server_credentials([(opts.tls_key, opts.tls_cert)])
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
            port, why = 0, f": {exc}"
        if port:
            await server.start()
        return server, port, why

    async def _set_health(self, status) -> None:
        for svc in ("", SERVICE_NAME):
            await self.health.set(svc, status)

    # lifecycle ------------------------------------------------------------------------------
    def attach(self, backend: IndexBackend, hasher=None, *, owns_backend: bool = False, model_path=None) -> None:
        """Install the loaded index (and model); health turns SERVING. ``model_path``: the
        checkpoint ``hasher`` was loaded from, which an encoder process (``encoder_process``)
        loads again (without it the hasher is saved to a temporary file for the child)."""
        if hasher is not None:
            nbits = hasher.layout.nbits
            if nbits != backend.nbits:
                raise ValueError(f"model makes {nbits}-bit codes but the index holds {backend.nbits}-bit codes")
            ih, mh = backend.model_content_hash, getattr(hasher, "content_hash", "")
            if ih and mh and ih != mh:
                msg = f"index was built with model {ih[:12]} but the server loaded model {mh[:12]}"
                if not self.options.allow_model_mismatch:
                    raise ValueError(
                        msg + " (rebuild the index with this model, or pass --allow-model-mismatch to serve anyway)"
                    )
                log.warning(msg)
            o = self.options
            self.encoder = MicroBatchEncoder(
                hasher,
                o.encoder_max_batch,
                o.encoder_max_wait_s,
                o.encoder_max_queue,
                o.encoder_max_delay_s,
                o.encoder_step_pixels,
                nice=o.bulk_nice,
                process=o.encoder_process,
                model_path=model_path,
            )
            self.encoder.warmup(formats=self.servicer.limits.image_formats)  # before SERVING, not on the first query
        backend.warmup(preload=self.options.preload)
        self.backend = backend
        self._owns_backend = owns_backend
        self.servicer.attach(backend, self.encoder)
        self._loop.call(self._set_health(health_pb2.HealthCheckResponse.SERVING), timeout=30)
        log.info("serving %d items (%d-bit codes, model=%s)", backend.count(), backend.nbits, hasher is not None)

    def stop(self, grace: float | None = 5.0, drain_delay: float = 0.0) -> None:
        """Graceful stop: health NOT_SERVING, wait ``drain_delay``, finish in-flight calls
        within ``grace`` seconds (new calls are refused), then release the model and index."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._loop.call(self.health.enter_graceful_shutdown(), timeout=30)
        if drain_delay > 0:
            time.sleep(drain_delay)
        try:
            self._loop.call(self._server.stop(grace))
        finally:
            if self.encoder is not None:
                self.encoder.close()
            self.servicer.close()
            if self._owns_backend and self.backend is not None:
                self.backend.close()
            self._loop.close()
        log.info("stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout`` seconds pass (False)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "CbirServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _as_backend(index: Any, writable: bool) -> tuple[IndexBackend, bool]:
    if isinstance(index, IndexBackend):
        return index, False
    if isinstance(index, (str, os.PathLike)):
        return open_backend(index, writable=writable), True
    return IndexBackend(index, index if writable else None), False


def _as_hasher(model: Any):
    if model is None or not isinstance(model, (str, os.PathLike)):
        return model
    from cbir.models.hasher import Hasher

    return Hasher.load(Path(model))


def create_server(
    index: Any,
    hasher: Any = None,
    address: str = DEFAULT_ADDRESS,
    options: ServerOptions | None = None,
    *,
    writable: bool = True,
    **option_overrides: Any,
) -> CbirServer:
    """Start a server for ``index`` (an :class:`IndexBackend`, an ``IndexReader``/writer or an
    index directory) and ``hasher`` (a ``Hasher``, a model path, or ``None`` for code/id queries
    only) on ``address``. Returns once it is SERVING; call :meth:`CbirServer.stop`."""
    opts = replace(options or ServerOptions(), **option_overrides)
    server = CbirServer(address, opts)
    backend, owns = None, False
    try:
        backend, owns = _as_backend(index, writable)
        path = hasher if isinstance(hasher, (str, os.PathLike)) else None
        server.attach(backend, _as_hasher(hasher), owns_backend=owns, model_path=path)
    except BaseException:
        server.stop(grace=0)
        if owns and backend is not None and server.backend is None:
            backend.close()
        raise
    return server


def connect(
    address: str,
    *,
    token: str | None = None,
    tls_ca: bytes | None = None,
    tls: bool = False,
    max_message_bytes: int = 16 * MiB,
    server_name: str | None = None,
) -> tuple[grpc.Channel, pb_grpc.SearchServiceStub]:
    """A raw channel and stub (bearer token and TLS optional), for tests and tools that want
    protobuf messages; the channel is :class:`cbir.client.CbirClient`'s. Prefer the client."""
    from cbir.client import CbirClient

    client = CbirClient(
        address, token="", tls=tls, tls_ca=tls_ca, server_name=server_name, max_message_bytes=max_message_bytes
    )
    channel = client.channel
    if token:
        channel = grpc.intercept_channel(channel, BearerTokenClientInterceptor(token))
    return channel, pb_grpc.SearchServiceStub(channel)


@contextlib.contextmanager
def serve_in_process(
    index_dir: Any,
    model_path_or_hasher: Any = None,
    address: str = "127.0.0.1:0",
    *,
    writable: bool = False,
    ready_timeout: float = 10.0,
    grace: float = 2.0,
    **option_overrides: Any,
) -> Iterator[tuple[str, pb_grpc.SearchServiceStub]]:
    """Run a server in this process (free loopback port by default) and yield
    ``(address, stub)``; stops cleanly (in-flight calls finish) when the block exits."""
    server = create_server(index_dir, model_path_or_hasher, address, writable=writable, **option_overrides)
    channel = None
    try:
        channel, stub = connect(server.address, token=server.options.token)
        grpc.channel_ready_future(channel).result(timeout=ready_timeout)
        yield server.address, stub
    finally:
        if channel is not None:
            channel.close()
        server.stop(grace=grace)
