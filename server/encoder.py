"""Micro-batching image encoder: concurrent image requests share forward passes, fairly.

Callers submit either encoded image payloads (:meth:`MicroBatchEncoder.submit_images`, what the
server does) or already transformed float batches (:meth:`MicroBatchEncoder.submit`). One worker
thread runs *steps*. When it is idle it takes the first waiting job and gathers more while they
keep arriving less than ``max_wait_s`` apart (at most ``max_delay_s`` after the first, default
``8 * max_wait_s``); when it is busy, newly queued jobs join at the next step.

Admission: the headers of a payload job are read (no pixel decoded) and the job is refused at
once, with :class:`ImageDecodeError`, if a payload is not an image of an allowed format, an image
declares more than ``max_pixels`` pixels, or all its images together exceed ``max_total_pixels``.

Each step takes images from the active jobs *round-robin* (one per job per round, the job that
has been served the fewest pixels so far first: fair queuing) until it holds ``max_batch`` images
or ``max_step_pixels`` decoded pixels (a larger image makes a step of its own), decodes them with :func:`cbir.data.images.decode_image` (the one decoder), transforms them
in one ``hasher.preprocess`` call and runs one ``hasher.encode``. A request of many big images is
thus spread over many steps, with every other request's images in each of them: a small request
waits for at most one step, not for the big one. A job is resolved when all its rows are encoded;
a payload that does not decode fails *its own* job, the others go on. Jobs whose caller gave up
(deadline, cancellation: their future is cancelled) are dropped before the next step.

An ensemble hasher (one with ``encode_ensemble``, :class:`cbir.ensemble.EnsembleHasher`) is run
through that method: the same codes and confidences, plus each image's class answer, which a
job submitted with ``decisions=True`` receives (its rows of the step's ``ClassDecision``).

Failures are reported as fresh exceptions carrying only a message (never raised on the worker),
so no traceback keeps decoded pixels or request bytes alive after the call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from cbir.codes import Codes

from .encoder_proc import EncoderProcess, decode_reason, run_step, transform_images

log = logging.getLogger(__name__)

__all__ = ["MicroBatchEncoder", "EncoderBusy", "EncoderClosed", "ImageDecodeError"]


class EncoderBusy(RuntimeError):
    """The encoder queue is full (back-pressure: the caller should retry later)."""


class EncoderClosed(RuntimeError):
    """The encoder was shut down."""


class ImageDecodeError(ValueError):
    """An image payload could not be decoded or was refused by a limit (the message says why)."""


@dataclass(eq=False)
class _Job:
    batch: object  # float tensor (n, 3, H, W), or None for a payload job
    n: int
    future: Future = field(default_factory=Future)
    deadline: float | None = None  # time.monotonic() value
    payloads: list | None = None  # encoded images (bytes), decoded on the worker step by step
    names: list | None = None  # how to name payload i in an error message
    max_pixels: int | None = None
    max_total_pixels: int | None = None
    formats: tuple | None = None
    pixels: list | None = None  # declared pixels of each payload (read from the headers)
    next: int = 0  # first row not yet scheduled
    done: int = 0  # rows encoded
    served: int = 0  # pixels (1 per tensor row) scheduled so far: the least served job goes first
    parts: list = field(default_factory=list)  # (start, packed rows, conf rows, ClassDecision rows or None)
    decisions: bool = False  # resolve to (Codes, conf, ClassDecision | None)

    def where(self, i: int) -> str:
        if self.names:
            return f"{self.names[i]}: "
        return f"image {i}: " if self.n > 1 else ""

    def fail(self, exc: BaseException) -> None:
        self.payloads = self.batch = None
        self.parts = []
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(exc)

    @property
    def gone(self) -> bool:
        return self.future.done()


class MicroBatchEncoder:
    """Runs ``hasher.encode`` on one worker thread over fair micro-batches of queued images."""

    def __init__(
        self,
        hasher,
        max_batch: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 1024,
        max_delay_s: float | None = None,
        max_step_pixels: int = 8 << 20,
        nice: int = 0,
        process: bool = False,
        model_path=None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_step_pixels < 1:
            raise ValueError("max_batch, max_queue and max_step_pixels must be >= 1")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be in 0..19 (added to the worker thread's nice value), got {nice}")
        self.nice = int(nice)
        if max_wait_s < 0 or (max_delay_s is not None and max_delay_s < 0):
            raise ValueError("max_wait_s and max_delay_s must be >= 0")
        self.hasher = hasher
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        # the batch keeps filling while requests arrive less than max_wait_s apart, for at most
        # max_delay_s after the first one (default 8 x max_wait_s)
        self.max_delay_s = float(8 * max_wait_s if max_delay_s is None else max_delay_s)
        self.max_step_pixels = int(max_step_pixels)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=int(max_queue))
        self._closed = False
        self._lock = threading.Lock()
        self._reset_counters()
        # process=True: decode + forward pass in a child process (cbir.server.encoder_proc)
        self._runner = EncoderProcess(hasher, model_path=model_path, nice=self.nice) if process else None
        self._thread = threading.Thread(target=self._run, name="cbir-encoder", daemon=True)
        self._thread.start()

    def _reset_counters(self) -> None:
        # counters (read by tests / benchmarks)
        self.forward_passes = 0
        self.images_encoded = 0
        self.max_batch_seen = 0

    # request side ---------------------------------------------------------------------------
    def transform(self, images) -> object:
        """Turn decoded PIL images into one float tensor batch with the model's eval transform."""
        return transform_images(self.hasher, images)

    def submit(self, batch, deadline: float | None = None) -> Future:
        """Queue a transformed batch; the future resolves to ``(Codes, conf)``."""
        n = int(batch.shape[0])
        if n == 0:
            raise ValueError("empty batch")
        return self._put(_Job(batch=batch, n=n, deadline=deadline))

    def submit_images(
        self,
        payloads: list,
        deadline: float | None = None,
        max_pixels: int | None = None,
        names: list | None = None,
        *,
        max_total_pixels: int | None = None,
        formats=None,
        decisions: bool = False,
    ) -> Future:
        """Queue encoded images, decoded and transformed on the worker. ``max_pixels`` per image,
        ``max_total_pixels`` for all of them, ``formats`` the accepted Pillow formats (default:
        every format :func:`cbir.data.images.decode_image` accepts). The future resolves to
        ``(Codes, conf)``, or fails with :class:`ImageDecodeError` naming the first payload that
        is refused or does not decode (``names[i]``, else ``image i``). Cancel the future to
        drop the job. ``decisions=True``: it resolves to ``(Codes, conf, decision)``, the
        ensemble's class answer (:class:`cbir.uncertainty.ClassDecision`, one row per image) when
        the hasher is an ensemble (has ``encode_ensemble``), else ``None``."""
        if not payloads:
            raise ValueError("no images")
        if names is not None and len(names) != len(payloads):
            raise ValueError("names must match the payloads one to one")
        return self._put(
            _Job(
                batch=None,
                n=len(payloads),
                deadline=deadline,
                payloads=list(payloads),
                names=names,
                max_pixels=max_pixels,
                max_total_pixels=max_total_pixels,
                formats=None if formats is None else tuple(formats),
                decisions=decisions,
            )
        )

    def _put(self, job: _Job) -> Future:
        with self._lock:
            if self._closed:
                raise EncoderClosed("encoder is shut down")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise EncoderBusy("encoder queue is full") from None
        return job.future

    def warmup(self, timeout: float = 120.0, formats=None) -> None:
        """One image through the whole path (decode, transform, forward pass), so that the first
        real request does not pay for lazy initialisation; the counters are reset afterwards."""
        import io

        from PIL import Image

        Image.init()
        buf = io.BytesIO()
        grad = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
        Image.fromarray(np.stack([grad, grad.T, 255 - grad], axis=-1)).save(buf, format="PNG")
        self.submit_images([buf.getvalue()], formats=formats).result(timeout)
        self._reset_counters()

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued jobs, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._runner is not None:
            self._runner.close()

    # worker: admission ----------------------------------------------------------------------
    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs = [first]
        count = first.n
        stop = False
        start = time.monotonic()
        end = start + self.max_wait_s
        hard_end = start + self.max_delay_s
        while count < self.max_batch:
            remaining = min(end, hard_end) - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
            count += job.n
            end = time.monotonic() + self.max_wait_s  # requests still arriving: keep filling the batch
        return jobs, stop

    def _drain(self) -> tuple[list[_Job], bool]:
        """Whatever is queued now (the worker is busy: new jobs join the next step)."""
        jobs: list[_Job] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs, False
            if job is None:
                return jobs, True
            jobs.append(job)

    def _admit(self, job: _Job) -> bool:
        """Read the headers of a payload job and check its limits; False if it was refused."""
        if job.batch is not None or job.gone:
            return not job.gone
        from cbir.data.images import probe_image

        pixels, reason = [], None
        for i, data in enumerate(job.payloads or ()):
            try:
                if not data:
                    raise ValueError("empty image payload")
                w, h, _ = probe_image(data, formats=job.formats)
            except (ValueError, TypeError) as e:
                reason = f"{job.where(i)}{decode_reason(e)}"
                break
            if job.max_pixels is not None and w * h > job.max_pixels:
                reason = (
                    f"{job.where(i)}image too large: {w}x{h} = {w * h} pixels exceeds the limit of "
                    f"{job.max_pixels} (possible decompression bomb); send a smaller image"
                )
                break
            pixels.append(w * h)
        total = sum(pixels)
        if reason is None and job.max_total_pixels is not None and total > job.max_total_pixels:
            reason = (
                f"the {job.n} images of this request declare {total} pixels in all, over the "
                f"per-request budget of {job.max_total_pixels}; send fewer or smaller images per call"
            )
        if reason is not None:
            job.fail(ImageDecodeError(reason))
            return False
        job.pixels = pixels
        return True

    # worker: steps --------------------------------------------------------------------------
    def _plan(self, active: list[_Job]) -> list[tuple[_Job, int, int]]:
        """Rows of the next step: ``(job, start, count)``, round-robin over the active jobs."""
        now = time.monotonic()
        for j in active:
            if j.deadline is not None and now > j.deadline:
                j.future.cancel()  # the caller's deadline passed: drop the rest of its work
        active[:] = [j for j in active if not j.gone]
        if not active:
            return []
        order = sorted(active, key=lambda j: j.served)  # stable: ties keep the arrival order
        take = {id(j): 0 for j in order}
        count = pixels = 0
        blocked: set[int] = set()
        progressed = True
        while progressed and count < self.max_batch:
            progressed = False
            for j in order:
                i = j.next + take[id(j)]
                if i >= j.n or id(j) in blocked or count >= self.max_batch:
                    continue
                cost = j.pixels[i] if j.pixels is not None else 0
                if count and cost and pixels + cost > self.max_step_pixels:
                    blocked.add(id(j))  # does not fit: it leads a later step
                    continue
                take[id(j)] += 1
                count += 1
                pixels += cost
                j.served += max(1, cost)
                progressed = True
        plan = []
        for j in order:
            m = take[id(j)]
            if m:
                plan.append((j, j.next, m))
                j.next += m
        return plan

    def _step(self, plan) -> None:
        plan = [p for p in plan if not p[0].gone]  # a caller gave up since the plan was made
        inputs = []
        for j, start, m in plan:
            if j.batch is not None:
                inputs.append(j.batch[start : start + m])
            else:
                inputs.append((j.payloads[start : start + m], j.max_pixels, j.formats))
                j.payloads[start : start + m] = [None] * m  # free the bytes early (the step holds them)
        if not plan:
            return
        try:
            res = self._runner.run(inputs) if self._runner is not None else run_step(self.hasher, inputs)
            fault = res.fault
        except BaseException as exc:  # a real fault: report it to every caller, keep the worker
            log.exception("encoder step failed")
            fault = f"{type(exc).__name__}: {exc}"
        if fault is not None:
            log.error("encoder forward pass failed: %s", fault)
            err = RuntimeError(f"encoder failed: {fault}")
            for j, _, _ in plan:
                if not j.gone:
                    j.fail(err)
            return
        for (j, start, _), fail in zip(plan, res.failures):
            if fail is not None and not j.gone:
                at, reason = fail
                j.fail(ImageDecodeError(reason if at < 0 else f"{j.where(start + at)}{reason}"))
        if res.packed is None:
            return
        self.forward_passes += 1
        self.images_encoded += len(res.packed)
        self.max_batch_seen = max(self.max_batch_seen, len(res.packed))
        row = 0
        for (j, start, m), fail in zip(plan, res.failures):
            if fail is not None:
                continue
            sl = slice(row, row + m)
            row += m
            if j.gone:
                continue
            rows = None if res.decision is None or not j.decisions else res.decision.take(sl)
            j.parts.append((start, res.packed[sl], None if res.conf is None else res.conf[sl], rows))
            j.done += m
            if j.done == j.n:
                self._finish(j, res.nbits)

    @staticmethod
    def _finish(j: _Job, nbits: int) -> None:
        j.parts.sort(key=lambda p: p[0])
        packed = np.concatenate([p[1] for p in j.parts]) if len(j.parts) > 1 else j.parts[0][1]
        conf = None
        if j.parts[0][2] is not None:
            conf = np.concatenate([p[2] for p in j.parts]) if len(j.parts) > 1 else j.parts[0][2]
        decision = None
        if j.parts[0][3] is not None:
            from cbir.uncertainty import ClassDecision

            decision = ClassDecision.concat([p[3] for p in j.parts])
        j.parts, j.payloads, j.batch = [], None, None
        result = (Codes(packed, nbits), conf, decision) if j.decisions else (Codes(packed, nbits), conf)
        if j.future.set_running_or_notify_cancel():
            j.future.set_result(result)

    def _run(self) -> None:
        from .sched import lower_priority, name_thread

        name_thread("cbir-encoder")
        lower_priority(self.nice)  # decoding untrusted bytes + the forward pass: after cheap requests
        active: list[_Job] = []
        stop = False
        while True:
            if not active:
                if stop:
                    break
                first = self._queue.get()
                if first is None:
                    break
                new, stop = self._gather(first)
            else:
                new, got_stop = self._drain() if not stop else ([], True)
                stop = stop or got_stop
            for j in new:
                try:
                    if self._admit(j):
                        active.append(j)
                except Exception as exc:  # noqa: BLE001 - a bug: fail this job, keep the worker
                    log.exception("encoder admission failed")
                    j.fail(RuntimeError(f"encoder failed: {type(exc).__name__}: {exc}"))
            plan = self._plan(active)
            if plan:
                self._step(plan)
            active = [j for j in active if not j.gone]
        # fail whatever is still queued after close
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.fail(EncoderClosed("encoder is shut down"))
