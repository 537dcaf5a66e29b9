"""Micro-batching image encoder: concurrent image requests share one forward pass.

Request threads decode and transform their images (in parallel, outside the worker), then
:meth:`MicroBatchEncoder.encode` puts them on a bounded queue and waits. One worker thread takes
the first waiting job, gathers more for at most ``max_wait_s`` (or until ``max_batch`` images),
stacks them into one tensor batch and calls ``hasher.encode`` once; each caller gets back its
own rows. Jobs whose caller gave up (deadline, cancellation) are dropped before the forward pass.
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
    """Decode image bytes to an RGB PIL image, or raise :class:`ImageDecodeError` with a reason.

    Uses ``cbir.data.decode_image`` when available (the one decoder of the project); falls back
    to Pillow directly. Never touches the filesystem.
    """
    if not data:
        raise ImageDecodeError("empty image payload")
    try:
        from cbir.data import decode_image as _decode
    except ImportError:  # pragma: no cover - cbir.data always ships it
        _decode = None
    try:
        if _decode is not None:
            return _decode(bytes(data), max_pixels=max_pixels)
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                raise ValueError(f"image too large: {im.size[0]}x{im.size[1]} pixels exceeds {max_pixels}")
            im.load()
            return im.convert("RGB")
    except Exception as exc:  # CorruptImageError, PIL errors, decompression bombs...
        reason = str(exc) or type(exc).__name__
        raise ImageDecodeError(f"cannot decode image: {reason}") from exc


@dataclass
class _Job:
    batch: object  # float tensor (n, 3, H, W)
    n: int
    future: Future = field(default_factory=Future)
    deadline: float | None = None  # time.monotonic() value


class MicroBatchEncoder:
    """Runs ``hasher.encode`` on one worker thread over micro-batches of queued images."""

    def __init__(
        self,
        hasher,
        max_batch: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 1024,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.hasher = hasher
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
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
        job = _Job(batch=batch, n=n, deadline=deadline)
        with self._lock:
            if self._closed:
                raise EncoderClosed("encoder is shut down")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise EncoderBusy("encoder queue is full") from None
        return job.future

    def encode(self, batch, timeout: float | None = None):
        """Encode a transformed batch, waiting at most ``timeout`` seconds (TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fut = self.submit(batch, deadline)
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            fut.cancel()
            raise

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
        end = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            remaining = end - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
            count += job.n
        return jobs, stop

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
            if not live:
                continue
            try:
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
