"""One encoder step (decode, transform, forward pass), in this process or in a child process.

:func:`run_step` is the work of one step of :class:`cbir.server.encoder.MicroBatchEncoder`: the
payload parts are decoded with :func:`cbir.data.images.decode_image` (the one decoder), all the
decoded images are transformed in one ``hasher.preprocess`` call and encoded in one forward pass
(``encode_ensemble`` for an ensemble). A part whose payload does not decode fails alone.

:class:`EncoderProcess` runs the same function in a child process (``cbir serve
--encoder-process``, the default of the CLI). Why: in one process the encoder thread and the RPC
event loop share the GIL. A forward pass releases it inside every kernel but holds it between them
(module calls, Pillow's Python-level decoding), so while untrusted image requests keep the encoder
busy, the loop -- which parses, validates and answers every call -- waits for the GIL in small
slices many times per call, and a cheap code search's tail latency grows with the image traffic
even though the encoder thread runs at a lower OS priority. In a child process the two no longer
share a lock: the kernel schedules them, and the child runs at the lower priority (``nice``) as a
whole. Decoding untrusted bytes in the child also keeps a decoder crash out of the server: the
step's callers get an error, the child is started again and the server goes on.

The child is started with the ``spawn`` method (no fork of a threaded server), loads the model
from a checkpoint (the server's ``--model`` file, or one written to a private temporary folder and
removed when the encoder closes; a restarted child reads it again), uses the same number of torch threads as the server and
answers one step at a time over a pipe; payload bytes go in, packed codes come back.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["StepResult", "run_step", "transform_images", "EncoderProcess", "EncoderProcessError"]


class EncoderProcessError(RuntimeError):
    """The encoder's child process could not be started or died during a step."""


def decode_reason(exc: Exception) -> str:
    msg = str(exc) or type(exc).__name__
    return msg if msg.startswith("cannot decode image") else f"cannot decode image: {msg}"


def transform_images(hasher, images) -> Any:
    """Decoded PIL images -> one float tensor batch with the model's eval transform."""
    pre = getattr(hasher, "preprocess", None)
    if pre is not None:
        return pre(images)
    import torch

    tf = hasher.eval_transform
    return torch.stack([tf(im) for im in images])


@dataclass
class StepResult:
    """What one step made. ``failures[i]`` is None when part ``i`` was encoded, else ``(at,
    reason)``: the row of the part that failed (-1: the whole part) and why. The encoded parts'
    rows are ``packed``/``conf``/``decision`` in part order; ``fault`` is set (and nothing else
    is) when the forward pass itself failed."""

    failures: list = field(default_factory=list)
    packed: np.ndarray | None = None
    nbits: int = 0
    conf: np.ndarray | None = None
    decision: Any = None
    fault: str | None = None


def run_step(hasher, inputs: list) -> StepResult:
    """Decode, transform and encode ``inputs``: per part either a float tensor of rows already in
    the eval transform, or ``(payloads, max_pixels, formats)``."""
    import torch

    from cbir.data.images import decode_image

    res = StepResult(failures=[None] * len(inputs))
    decoded: list = []
    spans = []  # (part, offset into decoded, rows)
    tensors: list[Any] = [None] * len(inputs)
    for p, part in enumerate(inputs):
        if not isinstance(part, tuple):
            tensors[p] = part
            continue
        payloads, max_pixels, formats = part
        imgs = []
        for i, data in enumerate(payloads):
            try:
                imgs.append(decode_image(data, max_pixels=max_pixels, formats=formats))
            except ValueError as e:
                res.failures[p] = (i, decode_reason(e))
                break
        if res.failures[p] is None:
            spans.append((p, len(decoded), len(imgs)))
            decoded.extend(imgs)
    if spans:
        try:
            x = transform_images(hasher, decoded)
        except Exception:  # noqa: BLE001 - isolate the part(s) the transform cannot handle
            x = None
        for p, at, m in spans:
            try:
                tensors[p] = x[at : at + m] if x is not None else transform_images(hasher, decoded[at : at + m])
            except Exception as e:  # noqa: BLE001
                res.failures[p] = (-1, f"cannot transform image: {e}")
    decoded.clear()
    rows = [t for p, t in enumerate(tensors) if t is not None and res.failures[p] is None]
    if not rows:
        return res
    try:
        x = rows[0] if len(rows) == 1 else torch.cat(rows)
        encode_ensemble = getattr(hasher, "encode_ensemble", None)
        with torch.inference_mode():
            if encode_ensemble is not None:  # an ensemble: the same codes, plus the class answer
                enc = encode_ensemble(x)
                codes, conf, res.decision = enc.codes, enc.conf, enc.decision
            else:
                codes, conf = hasher.encode(x)
    except Exception as exc:  # noqa: BLE001 - reported to the step's callers
        log.exception("encoder forward pass failed")
        return StepResult(failures=res.failures, fault=f"{type(exc).__name__}: {exc}")
    res.packed, res.nbits = np.ascontiguousarray(codes.packed), int(codes.nbits)
    res.conf = np.asarray(conf, dtype=np.float32) if conf is not None else None
    return res


def _child_main(conn, model_path: str, device: str, batch_size: int, threads: int, nice: int) -> None:
    """The child: load the model, then answer steps until ``None`` (or the pipe closes)."""
    from .sched import name_thread

    name_thread("cbir-encoder-p")
    if nice > 0 and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        from cbir.models.hasher import Hasher

        hasher = Hasher.load(model_path, device=device, batch_size=batch_size)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", int(hasher.layout.nbits)))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        conn.send(run_step(hasher, msg))


def _hasher_device(hasher) -> str:
    dev = getattr(hasher, "device", None)
    if dev is None:
        members = getattr(hasher, "members", None) or []
        dev = getattr(members[0], "device", None) if members else None
    return str(dev) if dev is not None else "cpu"


class EncoderProcess:
    """A child process that runs :func:`run_step` for the encoder thread (one step at a time).

    ``model_path``: the checkpoint the hasher was loaded from (else the hasher is saved to a
    private temporary folder for the child, removed by :meth:`close`).
    ``nice`` is added to the child's nice value; ``threads`` torch threads (default: this
    process's). If the child dies, the step in flight fails with :class:`EncoderProcessError`
    and the next step starts a new child."""

    def __init__(
        self,
        hasher,
        model_path: str | os.PathLike | None = None,
        nice: int = 0,
        threads: int | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        import torch

        self.nice = int(nice)
        self.threads = int(threads if threads is not None else torch.get_num_threads())
        self.device = _hasher_device(hasher)
        self.batch_size = int(getattr(hasher, "batch_size", 256) or 256)
        self.nbits = int(hasher.layout.nbits)
        self.start_timeout = float(start_timeout)
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self.starts = 0
        self._tmp: str | None = None
        if model_path is not None:
            self.model_path = str(model_path)
        else:
            self._tmp = tempfile.mkdtemp(prefix="cbir-encoder-")
            self.model_path = str(hasher.save(Path(self._tmp) / "model.pt"))
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main,
            args=(child, self.model_path, self.device, self.batch_size, self.threads, self.nice),
            name="cbir-encoder-proc",
            daemon=True,
        )
        proc.start()
        child.close()
        if not parent.poll(self.start_timeout):
            proc.kill()
            raise EncoderProcessError(f"the encoder process did not load the model within {self.start_timeout:.0f} s")
        try:
            kind, what = parent.recv()
        except (EOFError, OSError):
            proc.join(5)
            kind, what = "error", f"it exited with code {proc.exitcode}"
        if kind != "ready":
            proc.join(5)
            raise EncoderProcessError(f"the encoder process could not load the model {self.model_path}: {what}")
        if what != self.nbits:
            proc.kill()
            raise EncoderProcessError(f"the encoder process loaded a {what}-bit model, expected {self.nbits} bits")
        self._proc, self._conn = proc, parent
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def run(self, inputs: list) -> StepResult:
        """One step in the child; raises :class:`EncoderProcessError` if the child dies."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            try:
                self._conn.send(inputs)
                return self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                proc = self._proc
                proc.join(5)
                code = proc.exitcode
                self._proc = self._conn = None
                log.error("the encoder process died during a step (exit code %s); it is started again", code)
                raise EncoderProcessError(
                    f"the encoder process died while encoding this request (exit code {code})"
                ) from None

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
            if proc is not None:
                try:
                    conn.send(None)
                except (OSError, BrokenPipeError):
                    pass
                proc.join(timeout)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout)
                conn.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)  # the folder this object created
                self._tmp = None
