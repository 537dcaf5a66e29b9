"""The ``cbir.v1.SearchService`` servicer (asyncio, for ``grpc.aio``).

Every RPC validates its request, maps failures to gRPC status codes (never crashing or
poisoning the server) and writes one structured log line (method, status, latency) at INFO.
Image bytes are never logged and no request field is ever used as a filesystem path.

Where work runs. The RPCs are coroutines on the server's one event loop:

* cheap index lookups (by default LEXICOGRAPHIC and PREFIX search without a label filter, id
  queries: one LMDB cursor walk, tens of microseconds; ``inline_modes`` to change) run inline on
  the loop: no thread hop, no GIL hand-off between request threads;
* scans and writes (HAMMING / HYBRID search, label-filtered paging, BatchSearch, Add, Delete,
  GetStats) run on a small thread pool (``offload_workers``) so they never stall the loop;
* image queries are awaited on the micro-batching encoder (:mod:`cbir.server.encoder`): no thread
  waits on them, so every in-flight image request can join the same forward pass.

Hostile input (:mod:`cbir.server.guard`): handlers get the raw request bytes and parse them
themselves (a body that does not parse is INVALID_ARGUMENT, after authentication); every
client-side failure is one WARNING line without traceback; the work of a call is bounded up front
(``max_hits_per_call`` ranked hits, the response's size bound against the message limit, the
image pixel budgets) and long loops on the offload threads stop at the call's deadline or
cancellation. INTERNAL is only ever a fault of the server.

Where the rest lives: request validation and the per-call limits in :mod:`cbir.server.validate`,
running one search request (plain, label-filtered) and building its response in
:mod:`cbir.server.search`, an ensemble model's class answer and the prediction-set search in
:mod:`cbir.server.answer`, protobuf conversions in :mod:`cbir.server.convert`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import time

import grpc
import numpy as np

from cbir.codes import Codes
from cbir.v1 import search_pb2 as pb
from cbir.v1 import search_pb2_grpc as pb_grpc

from .answer import (
    check_prediction_set_request,
    check_prediction_set_work,
    probes_prediction_set,
    search_prediction_set_one,
    uncertainty_pb,
)
from .backend import AlreadyExists, IndexBackend, NotFound
from .convert import code_to_pb, codes_to_pb, from_struct, json_safe, layout_to_pb, pb_to_codes, to_struct
from .encoder import EncoderBusy, EncoderClosed, ImageDecodeError, MicroBatchEncoder
from .guard import PACED, Budget, FaultPacer, RpcError, log_level, parse_request
from .guard import invalid as _invalid
from .sched import thread_setup
from .search import search_one
from .validate import INLINE_MODES, MODE_NAMES, Limits, check_count, check_size, check_work, validate_search

log = logging.getLogger("cbir.server.rpc")

__all__ = ["Limits", "SearchServicer", "RpcError", "MODE_NAMES"]


def _rpc(request_cls):
    """Parse the raw request (``request_cls``), run the RPC, map failures to a status, log one line."""

    def deco(fn):
        name = fn.__name__

        @functools.wraps(fn)
        async def wrapper(self, request, context):
            t0 = time.perf_counter()
            status = grpc.StatusCode.OK
            detail = ""
            try:
                if isinstance(request, (bytes, bytearray, memoryview)):
                    request = parse_request(request_cls, request)
                return await fn(self, request, context)
            except RpcError as e:
                status, detail = e.code, e.message
            except asyncio.CancelledError:
                status = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:  # a bug or an index failure: report, keep serving
                log.exception("rpc %s failed", name)
                status, detail = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
            finally:
                level = log_level(status)
                if log.isEnabledFor(level):
                    ms = (time.perf_counter() - t0) * 1e3
                    log.log(
                        level,
                        "rpc method=%s status=%s latency_ms=%.3f%s",
                        name,
                        status.name,
                        ms,
                        f" detail={detail[:300]!r}" if detail else "",
                        extra={"rpc_method": name, "rpc_status": status.name, "rpc_latency_ms": ms},
                    )
            request = None
            pacer = self.pacer
            if pacer is not None and status in PACED:
                wait = pacer.delay(context.peer())
                if wait > 0:
                    await asyncio.sleep(wait)
            await context.abort(status, detail)

        wrapper.request_cls = request_cls
        return wrapper

    return deco


class SearchServicer(pb_grpc.SearchServiceServicer):
    """Serves one :class:`IndexBackend` and (optionally) one hasher through a micro-batching encoder."""

    def __init__(
        self,
        limits: Limits | None = None,
        offload_workers: int = 2,
        inline_modes: frozenset[str] | set[str] | tuple[str, ...] = INLINE_MODES,
        bulk_workers: int = 2,
        bulk_nice: int = 10,
        bulk_min_hits: int = 1000,
        pacer: FaultPacer | None = None,
    ) -> None:
        self.pacer = pacer  # paces the answers to a peer's failed calls (None: never)
        if offload_workers < 0:
            raise ValueError(
                f"offload_workers must be >= 0 (0 runs everything on the event loop), got {offload_workers}"
            )
        if bulk_workers < 0:
            raise ValueError(
                f"bulk_workers must be >= 0 (0 = the bulk work shares the search threads), got {bulk_workers}"
            )
        if not 0 <= bulk_nice <= 19:
            raise ValueError(f"bulk_nice must be in 0..19 (added to the bulk threads' nice value), got {bulk_nice}")
        if bulk_min_hits < 1:
            raise ValueError(f"bulk_min_hits must be >= 1, got {bulk_min_hits}")
        unknown = set(inline_modes) - set(MODE_NAMES.values())
        if unknown:
            raise ValueError(
                f"unknown inline search mode(s) {sorted(unknown)}; choose from {sorted(MODE_NAMES.values())}"
            )
        self.inline_modes = frozenset(inline_modes)
        self.limits = limits or Limits()
        self.bulk_nice = int(bulk_nice)
        self.bulk_min_hits = int(bulk_min_hits)
        self.backend: IndexBackend | None = None
        self.encoder: MicroBatchEncoder | None = None
        self.ensemble = False  # the model is an ensemble: image queries get its class answer
        self.class_names: tuple[str, ...] = ()
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(
                offload_workers, thread_name_prefix="cbir-search", initializer=thread_setup("cbir-search")
            )
            if offload_workers
            else None
        )
        # the expensive work a client can ask for, at a lower OS priority (cbir.server.sched)
        self._bulk = (
            concurrent.futures.ThreadPoolExecutor(
                bulk_workers, thread_name_prefix="cbir-bulk", initializer=thread_setup("cbir-bulk", self.bulk_nice)
            )
            if bulk_workers and self._pool is not None
            else self._pool
        )

    def attach(self, backend: IndexBackend, encoder: MicroBatchEncoder | None) -> None:
        self.encoder = encoder
        hasher = encoder.hasher if encoder is not None else None
        self.ensemble = callable(getattr(hasher, "encode_ensemble", None))
        layout = getattr(hasher, "layout", None)
        self.class_names = tuple(layout.class_names) if layout is not None else ()
        self.backend = backend

    def close(self) -> None:
        if self._bulk is not None and self._bulk is not self._pool:
            self._bulk.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, taking the *raw* request bytes (no deserializer): the
        RPCs parse them after authentication, and report what does not parse as INVALID_ARGUMENT."""
        svc = pb.DESCRIPTOR.services_by_name["SearchService"]
        handlers = {
            m.name: grpc.unary_unary_rpc_method_handler(
                getattr(self, m.name),
                request_deserializer=None,
                response_serializer=getattr(pb, m.output_type.name).SerializeToString,
            )
            for m in svc.methods
        }
        return grpc.method_handlers_generic_handler(svc.full_name, handlers)

    # helpers --------------------------------------------------------------------------------
    def _ready(self) -> IndexBackend:
        b = self.backend
        if b is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "index and model are still loading")
        return b

    def _is_bulk(self, r: pb.SearchRequest, k: int, answer) -> bool:
        """A single search that goes to the bulk threads: label-filtered, a prediction-set probe,
        or one that ranks more than ``bulk_min_hits`` items (k + offset)."""
        return bool(r.label_filter) or probes_prediction_set(r, answer) or int(r.offset) + k > self.bulk_min_hits

    async def _offload(self, fn, *args, budget: Budget | None = None, bulk: bool = False):
        """Run ``fn(*args)`` on the search threads, or with ``bulk`` on the low-priority bulk
        threads (inline when there are none); if the call is cancelled meanwhile, ``budget``
        tells the thread to stop at its next check."""

        def work():
            if budget is not None:
                budget.start_work()
            try:
                return fn(*args)
            except StopIteration as e:  # would hang the call: asyncio cannot put it into a Future
                raise RuntimeError(f"StopIteration escaped from {getattr(fn, '__name__', fn)}: {e}") from None

        if self._pool is None:
            return work()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._bulk if bulk else self._pool, work)
        except asyncio.CancelledError:
            if budget is not None:
                budget.cancelled = True
            raise

    async def _encode_images(
        self, images: list[bytes], budget: Budget, names: list[str] | None = None, decisions: bool = False
    ):
        """Decode + transform + encode on the micro-batching encoder. Returns (Codes, conf), or
        (Codes, conf, ClassDecision | None) with ``decisions`` (the ensemble's class answer).

        The outcome is read with ``Future.exception()``, never re-raised here: an exception
        raised through the awaits would tie this frame (request bytes, futures) into reference
        cycles that only the cyclic GC frees."""
        enc = self.encoder
        if enc is None:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, "this server has no model: query by code or id")
        lim = self.limits
        if len(images) > lim.max_images_per_call:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(images)} images in one call, over the per-call limit of {lim.max_images_per_call}; "
                "split it into smaller calls",
            )
        try:
            fut = enc.submit_images(
                images,
                budget.deadline,
                lim.max_image_pixels,
                names,
                max_total_pixels=lim.max_request_pixels,
                formats=lim.image_formats,
                decisions=decisions,
            )
        except EncoderBusy as e:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}: retry later") from None
        except EncoderClosed as e:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        del images  # the request's bytes are the encoder's now
        waiter = asyncio.wrap_future(fut)
        try:
            done, _ = await asyncio.wait({waiter}, timeout=budget.remaining())
        except asyncio.CancelledError:
            waiter.cancel()  # cancels `fut`: the encoder drops the rest of the job
            raise
        if not done:
            waiter.cancel()
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while encoding")
        if waiter.cancelled():  # dropped by the encoder at the deadline
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while encoding")
        err = waiter.exception()
        if err is not None:
            kind, msg = type(err), str(err)
            del err, waiter, fut
            if issubclass(kind, ImageDecodeError):
                raise _invalid(msg)
            if issubclass(kind, EncoderClosed):
                raise RpcError(grpc.StatusCode.UNAVAILABLE, msg)
            raise RpcError(grpc.StatusCode.INTERNAL, f"internal error: {msg}")
        out = waiter.result()
        if out[0].nbits != self._ready().nbits:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, "model and index bit counts differ")
        return out

    def _resolve(self, requests) -> tuple[list[Codes | None], list[int], list[bytes]]:
        """The code and id queries of ``requests`` resolved to 1-row Codes (None for an image
        query), and the image queries: ``(codes, image indices, image bytes)``."""
        backend = self._ready()
        out: list[Codes | None] = [None] * len(requests)
        img_idx, img_data = [], []
        for i, r in enumerate(requests):
            kind = r.WhichOneof("query")
            where = f"request {i}: " if len(requests) > 1 else ""
            if kind == "image":
                img_idx.append(i)
                img_data.append(r.image)
            elif kind == "code":
                try:
                    out[i] = pb_to_codes(r.code, backend.nbits)
                except ValueError as e:
                    raise _invalid(f"{where}{e}") from None
            elif kind == "id":
                if r.id >= 2**63:
                    raise RpcError(grpc.StatusCode.NOT_FOUND, f"{where}no item with id {r.id}")
                try:
                    out[i] = backend.get_codes([r.id])
                except NotFound:
                    raise RpcError(grpc.StatusCode.NOT_FOUND, f"{where}no item with id {r.id}") from None
            else:
                raise _invalid(f"{where}a query (image, code or id) is required")
        return out, img_idx, img_data

    async def _query_codes(self, requests, budget: Budget, resolved=None) -> tuple[list[Codes], list]:
        """Resolve the query of each request to a 1-row Codes (images encoded as one batch), and
        its class answer (a 1-row ``ClassDecision`` for an image query to an ensemble, else None);
        ``resolved``: what :meth:`_resolve` already returned for them."""
        out, img_idx, img_data = resolved if resolved is not None else self._resolve(requests)
        answers: list = [None] * len(requests)
        if img_data:
            names = [f"request {i}" for i in img_idx] if len(requests) > 1 else None
            codes, _, decision = await self._encode_images(img_data, budget, names, decisions=True)
            for j, i in enumerate(img_idx):
                out[i] = codes[j]
                if decision is not None:
                    answers[i] = decision.take(slice(j, j + 1))
        return out, answers  # type: ignore[return-value]

    def _search(self, r: pb.SearchRequest, query: Codes, mode: str, k: int, answer, budget: Budget):
        """One validated request: a plain search, or the prediction-set search of an IDK image
        query that asked for it; with the query's class answer when the model is an ensemble."""
        backend = self._ready()
        probe = probes_prediction_set(r, answer)
        if probe:
            (classes,) = answer.sets()
            resp = search_prediction_set_one(backend, r, query, k, classes, budget)
        else:
            resp = search_one(backend, self.limits, r, query, mode, k, budget)
        if answer is not None:
            resp.uncertainty.CopyFrom(uncertainty_pb(answer, self.class_names, probe))
        return resp

    # RPCs -----------------------------------------------------------------------------------
    @_rpc(pb.SearchRequest)
    async def Search(self, request, context):
        backend = self._ready()
        budget = Budget.of(context, self.limits.max_call_cpu_s)
        params = validate_search(self.limits, request, backend.nbits)
        check_prediction_set_request(request, "", self.ensemble)
        check_work(self.limits, [request], [params], backend.nbits)
        mode, k = params
        (query,), (answer,) = await self._query_codes([request], budget)
        budget.check()
        if request.search_prediction_set:
            check_prediction_set_work(self.limits, [request], [k], [answer])
        bulk = self._is_bulk(request, k, answer)
        if mode in self.inline_modes and not bulk:
            resp = self._search(request, query, mode, k, answer, budget)
        else:
            resp = await self._offload(self._search, request, query, mode, k, answer, budget, budget=budget, bulk=bulk)
        if request.return_metadata or answer is not None:
            check_size(self.limits, resp)
        return resp

    @_rpc(pb.BatchSearchRequest)
    async def BatchSearch(self, request, context):
        backend = self._ready()
        budget = Budget.of(context, self.limits.max_call_cpu_s)
        reqs = request.requests
        check_count(self.limits, len(reqs), "queries")

        def prepare():  # up to max_batch queries: validated and resolved off the event loop
            params = [validate_search(self.limits, r, backend.nbits, f"request {i}: ") for i, r in enumerate(reqs)]
            for i, r in enumerate(reqs):
                check_prediction_set_request(r, f"request {i}: ", self.ensemble)
            check_work(self.limits, reqs, params, backend.nbits)
            return params, self._resolve(reqs)

        params, resolved = await self._offload(prepare, bulk=True)
        queries, answers = await self._query_codes(reqs, budget, resolved)
        if any(r.search_prediction_set for r in reqs):
            check_prediction_set_work(self.limits, reqs, [k for _, k in params], answers)

        def run() -> pb.BatchSearchResponse:
            resp = pb.BatchSearchResponse()
            for r, q, (mode, k), a in zip(reqs, queries, params, answers):
                budget.check()
                resp.responses.append(self._search(r, q, mode, k, a, budget))
            if any(r.return_metadata for r in reqs) or any(a is not None for a in answers):
                check_size(self.limits, resp)
            return resp

        return await self._offload(run, budget=budget, bulk=True)

    @staticmethod
    def _check_writable(backend) -> None:
        if not backend.writable:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, backend.read_only_reason)

    @_rpc(pb.AddRequest)
    async def Add(self, request, context):
        backend = self._ready()
        budget = Budget.of(context, self.limits.max_call_cpu_s)
        items = request.items
        check_count(self.limits, len(items), "items")
        if not items:
            return pb.AddResponse(added=0)
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise _invalid("duplicate ids in one Add request")
        if any(i >= 2**63 for i in ids):
            raise _invalid("ids must be < 2**63")
        rows: list[bytes | None] = [None] * len(items)
        img_idx, img_data = [], []
        for i, it in enumerate(items):
            kind = it.WhichOneof("content")
            if kind == "code":
                try:
                    rows[i] = pb_to_codes(it.code, backend.nbits).packed[0].tobytes()
                except ValueError as e:
                    raise _invalid(f"item {i} (id {it.id}): {e}") from None
            elif kind == "image":
                img_idx.append(i)
                img_data.append(it.image)
            else:
                raise _invalid(f"item {i} (id {it.id}): an image or a code is required")
        metas = []
        for i, it in enumerate(items):
            try:
                metas.append(from_struct(it.metadata) if it.HasField("metadata") else {})
            except ValueError as e:
                raise _invalid(f"item {i} (id {it.id}): {e}") from None
        self._check_writable(backend)  # before any image is encoded
        conf = None
        if img_data:
            names = [f"item {i} (id {items[i].id})" for i in img_idx]
            codes, img_conf = await self._encode_images(img_data, budget, names)
            for j, i in enumerate(img_idx):
                rows[i] = codes.packed[j].tobytes()
            if len(img_idx) == len(items) and img_conf is not None:
                conf = img_conf  # every item is an image: store the per-bit confidence too
        codes = Codes.from_bytes(rows, backend.nbits)
        budget.check()
        try:
            n = await self._offload(
                functools.partial(backend.add, ids, codes, metas, upsert=request.upsert, conf=conf), bulk=True
            )
        except AlreadyExists as e:
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"id {e.args[0]} is already indexed (use upsert)") from None
        except PermissionError as e:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        resp = pb.AddResponse(added=n)
        if request.return_codes:
            resp.codes.extend(codes_to_pb(codes))
        return resp

    @_rpc(pb.DeleteRequest)
    async def Delete(self, request, context):
        backend = self._ready()
        check_count(self.limits, len(request.ids), "ids")
        if any(i >= 2**63 for i in request.ids):
            raise _invalid("ids must be < 2**63")
        self._check_writable(backend)
        ids = list(dict.fromkeys(request.ids))  # a repeated id is deleted once
        try:
            n = await self._offload(functools.partial(backend.delete, ids, must_exist=request.must_exist), bulk=True)
        except NotFound as e:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no item with id {e.args[0]}") from None
        except PermissionError as e:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
        return pb.DeleteResponse(deleted=n)

    @_rpc(pb.GetStatsRequest)
    async def GetStats(self, request, context):
        backend = self._ready()
        st = json_safe(await self._offload(backend.stats, bulk=True))
        cov = st.get("coverage") if isinstance(st.get("coverage"), dict) else st

        def num(*names):
            for n in names:
                v = cov.get(n, st.get(n))
                if isinstance(v, (int, float)):
                    return float(v)
            return 0.0

        prefix = cov.get("prefix_entropy", st.get("prefix_entropy")) or []
        if isinstance(prefix, dict):  # {depth: entropy}
            prefix = [v for _, v in sorted(prefix.items(), key=lambda kv: int(kv[0]))]
        return pb.GetStatsResponse(
            count=backend.count(),
            layout=layout_to_pb(backend.layout, backend.nbits),
            model_content_hash=backend.model_content_hash,
            entropy=num("entropy", "entropy_bits"),
            unique_percent=num("unique_percent", "unique_pct", "unique"),
            average_collisions=num("average_collisions", "avg_collisions", "average_collision_count"),
            prefix_entropy=[float(v) for v in prefix if isinstance(v, (int, float))],
            details=to_struct({**st, "server": {"pid": os.getpid(), "writable": backend.writable}}),
        )

    @_rpc(pb.GetCodeRequest)
    async def GetCode(self, request, context):
        self._ready()
        budget = Budget.of(context, self.limits.max_call_cpu_s)
        check_count(self.limits, len(request.images), "images")
        resp = pb.GetCodeResponse()
        if not request.images:
            return resp
        codes, conf = await self._encode_images(list(request.images), budget)
        for j in range(len(codes)):
            e = resp.codes.add(code=code_to_pb(codes, j))
            if request.return_confidence and conf is not None:
                e.confidence.extend(np.asarray(conf[j], dtype=np.float32).tolist())
        return resp

    @_rpc(pb.PingRequest)
    async def Ping(self, request, context):
        return pb.PingResponse()
