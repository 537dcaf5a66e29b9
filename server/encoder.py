"""Micro-batching image encoder: concurrent image requests share one forward pass.

Callers submit either encoded image payloads (:meth:`MicroBatchEncoder.submit_images`, what the
server does) or already transformed float batches (:meth:`MicroBatchEncoder.submit`). One worker
thread takes the first waiting job and gathers more while they keep arriving less than
``max_wait_s`` apart (at most ``max_delay_s`` after the first, default ``8 * max_wait_s``, or
until ``max_batch`` images), then, for the whole micro-batch at once: decodes the payloads (a payload
that does not decode fails *its own* job with :class:`ImageDecodeError`, the others go on),
transforms all decoded images in one ``hasher.preprocess`` call (same-size images are transformed
as one tensor), and calls ``hasher.encode`` once; each caller's future gets its own rows. Jobs
whose caller gave up (deadline, cancellation) are dropped before any work is done on them.
Decoding on the worker keeps request threads / the server's event loop free, and the forward
pass releases the GIL, so RPCs are served while a batch is encoded.
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

log = logging.getLogger(__name__)

__all__ = ["MicroBatchEncoder", "EncoderBusy", "EncoderClosed", "decode_image", "ImageDecodeError"]


class EncoderBusy(RuntimeError):
    """The encoder queue is full (back-pressure: the caller should retry later)."""


class EncoderClosed(RuntimeError):
    """The encoder was shut down."""


class ImageDecodeError(ValueError):
    """An image payload could not be decoded (the message says why)."""


def decode_image(data: bytes, max_pixels: int | None = None):
    """Decode image bytes to an RGB PIL image with ``cbir.data.decode_image`` (the one decoder of
    the project), or raise :class:`ImageDecodeError` with a reason. Never touches the filesystem.
    """
    from cbir.data import decode_image as _decode

    if not data:
        raise ImageDecodeError("empty image payload")
    try:
        return _decode(bytes(data), max_pixels=max_pixels)
    except Exception as exc:  # CorruptImageError, PIL errors, decompression bombs...
        reason = str(exc) or type(exc).__name__
        raise ImageDecodeError(f"cannot decode image: {reason}") from exc


@dataclass
class _Job:
    batch: object  # float tensor (n, 3, H, W), or None for a payload job
    n: int
    future: Future = field(default_factory=Future)
    deadline: float | None = None  # time.monotonic() value
    payloads: list | None = None  # encoded images (bytes) to decode on the worker
    names: list | None = None  # how to name payload i in an error message
    max_pixels: int | None = None

    def where(self, i: int) -> str:
        if self.names:
            return f"{self.names[i]}: "
        return f"image {i}: " if self.n > 1 else ""


def _decode_named(job: _Job, i: int, data: bytes):
    try:
        return decode_image(data, max_pixels=job.max_pixels)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{job.where(i)}{e}") from None


class MicroBatchEncoder:
    """Runs ``hasher.encode`` on one worker thread over micro-batches of queued images."""

    def __init__(
        self,
        hasher,
        max_batch: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 1024,
        max_delay_s: float | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if max_wait_s < 0 or (max_delay_s is not None and max_delay_s < 0):
            raise ValueError("max_wait_s and max_delay_s must be >= 0")
        self.hasher = hasher
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        # the batch keeps filling while requests arrive less than max_wait_s apart, for at most
        # max_delay_s after the first one (default 8 x max_wait_s)
        self.max_delay_s = float(8 * max_wait_s if max_delay_s is None else max_delay_s)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=int(max_queue))
        self._closed = False
        self._lock = threading.Lock()
        # counters (read by tests / benchmarks)
        self.forward_passes = 0
        self.images_encoded = 0
        self.max_batch_seen = 0
        self._thread = threading.Thread(target=self._run, name="cbir-encoder", daemon=True)
        self._thread.start()

    # request side ---------------------------------------------------------------------------
    def transform(self, images) -> object:
        """Turn decoded PIL images into one float tensor batch with the model's eval transform."""
        pre = getattr(self.hasher, "preprocess", None)
        if pre is not None:
            return pre(images)
        import torch

        tf = self.hasher.eval_transform
        return torch.stack([tf(im) for im in images])

    def submit(self, batch, deadline: float | None = None) -> Future:
        """Queue a transformed batch; the future resolves to ``(Codes, conf)``."""
        n = int(batch.shape[0])
        if n == 0:
            raise ValueError("empty batch")
        return self._put(_Job(batch=batch, n=n, deadline=deadline))

    def submit_images(self, payloads: list, deadline: float | None = None, max_pixels: int | None = None,
                      names: list | None = None) -> Future:
        """Queue encoded images (bytes in any format Pillow reads), decoded and transformed on the
        worker. The future resolves to ``(Codes, conf)``, or fails with :class:`ImageDecodeError`
        naming the first payload that does not decode (``names[i]``, else ``image i``)."""
        if not payloads:
            raise ValueError("no images")
        if names is not None and len(names) != len(payloads):
            raise ValueError("names must match the payloads one to one")
        return self._put(_Job(batch=None, n=len(payloads), deadline=deadline, payloads=list(payloads),
                              names=names, max_pixels=max_pixels))

    def _put(self, job: _Job) -> Future:
        with self._lock:
            if self._closed:
                raise EncoderClosed("encoder is shut down")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise EncoderBusy("encoder queue is full") from None
        return job.future

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued jobs, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # worker ---------------------------------------------------------------------------------
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

    def _prepare(self, live: list[_Job]) -> list[_Job]:
        """Decode the payload jobs and transform all their images in one call; fail (only) the
        jobs whose payloads do not decode. Returns the jobs that still go to the forward pass."""
        pending = [j for j in live if j.batch is None]
        if not pending:
            return live
        decoded: list = []
        ok: list[tuple[_Job, int]] = []  # (job, first row in `decoded`)
        for j in pending:
            try:
                imgs = [_decode_named(j, i, data) for i, data in enumerate(j.payloads)]
            except ImageDecodeError as e:
                j.future.set_exception(e)
                continue
            ok.append((j, len(decoded)))
            decoded.extend(imgs)
        if ok:
            try:
                x = self.transform(decoded)
            except Exception:  # noqa: BLE001 - isolate the job(s) the transform cannot handle
                x = None
            for j, start in ok:
                try:
                    j.batch = x[start : start + j.n] if x is not None else self.transform(decoded[start : start + j.n])
                except Exception as e:  # noqa: BLE001
                    j.future.set_exception(ImageDecodeError(f"cannot transform image: {e}"))
                j.payloads = None  # free the bytes early
        return [j for j in live if j.batch is not None]

    def _run(self) -> None:
        import torch

        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._gather(first)
            now = time.monotonic()
            live = []
            for j in jobs:
                if j.deadline is not None and now > j.deadline:
                    j.future.cancel()
                if j.future.set_running_or_notify_cancel():
                    live.append(j)
            try:
                live = self._prepare(live)
                if not live:
                    continue
                x = live[0].batch if len(live) == 1 else torch.cat([j.batch for j in live])
                with torch.inference_mode():
                    codes, conf = self.hasher.encode(x)
                conf = np.asarray(conf, dtype=np.float32) if conf is not None else None
                self.forward_passes += 1
                self.images_encoded += len(x)
                self.max_batch_seen = max(self.max_batch_seen, len(x))
                start = 0
                for j in live:
                    sl = slice(start, start + j.n)
                    start += j.n
                    j.future.set_result(
                        (Codes(codes.packed[sl], codes.nbits), None if conf is None else conf[sl])
                    )
            except BaseException as exc:  # never kill the worker: report to every caller
                log.exception("encoder forward pass failed")
                for j in live:
                    if not j.future.done():
                        j.future.set_exception(exc)
        # fail whatever is still queued after close
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(EncoderClosed("encoder is shut down"))
