"""Encoding an image collection with Ray Data: ``cbir index build --engine ray``.

The collection is cut into chunks of ``batch_size`` consecutive items (the batches of the
single-process path: ``make_loader(..., shuffle=False)``); a Ray dataset of chunk numbers, one
block per chunk, is mapped, streamed, through the same :class:`~cbir.data.ImageSet` code and
the same model as the single-process path:

* **on CPUs** one fused stage of Ray tasks, one CPU and one torch thread each, as many at
  once as the cluster has CPUs: a task reads and decodes its chunks' files, applies the
  model's evaluation transform to each chunk at once and encodes it as one batch
  (:meth:`Hasher.encode_tensor`). The dataset is built in the driver (``from_items``: no read
  tasks competing with the encoders for CPUs), nothing but chunk numbers and codes crosses the
  object store, and N single-threaded encoders on N cores beat one N-threaded one (data
  parallelism instead of intra-op threads). The chunks are dealt out in as few equal tasks as
  possible (:func:`work_units`: one per worker up to :data:`MAX_TASK_IMAGES` images each), as
  Ray Data takes ~0.1-0.2 s between one task's end and the next one's start on a CPU. The
  tasks run in Ray's pooled worker processes, which load the checkpoint once (cached by path,
  size and mtime) and keep it for later builds on the same Ray;
* **with CUDA** two stages: read tasks (half a CPU each) decode and transform chunks beside an
  actor pool of one GPU per actor that encodes them.

Unreadable images are left out and reported back as (path, reason). The driver collects the
chunks, orders them by chunk number and returns ``(codes, conf, indices)`` exactly like
:meth:`Hasher.encode_imageset`: the same images in the same batches through the same model, so
the codes are the single-process codes byte for byte (tested). The index is then written by
:func:`cbir.indexer.build_index`'s one sorted append pass.

``ray`` is imported lazily; without it :func:`require_ray` raises a ``ValueError`` that says
how to install it. A running Ray (``ray.init`` already called, or ``RAY_ADDRESS``) is used as
it is; otherwise a local one is started and shut down afterwards.
"""

from __future__ import annotations

import json
import os

import numpy as np

INSTALL_HINT = '--engine ray needs Ray Data: pip install -e ".[distributed]" (or pip install "ray[data]>=2.9")'


def require_ray():
    """The ``ray`` module, or a ValueError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ValueError(f"{INSTALL_HINT} ({exc})") from None
    return ray


def chunk_bounds(n: int, batch_size: int) -> np.ndarray:
    """Start offsets of the chunks of ``batch_size`` consecutive items (n items)."""
    return np.arange(0, n, int(batch_size), dtype=np.int64)


#: at most this many images per CPU task by default (results stream back a task at a time)
MAX_TASK_IMAGES = 8192


def work_units(nchunks: int, workers: int, chunks_per_task: int = 0, max_chunks: int = 0) -> list[tuple[int, int]]:
    """``(first chunk, chunk count)`` of each Ray task, in order, covering ``nchunks`` chunks.

    ``chunks_per_task`` > 0: units of that many chunks. 0: as few tasks as possible, a
    multiple of ``workers`` of them (each at most ``max_chunks`` chunks when > 0), of equal
    size: Ray Data's driver takes ~0.1-0.2 s to see that a task ended and start the next, paid
    per task (measured on 2 CPUs: one task per worker 10-25 % faster than a few shorter ones
    each), and equal shares end together.
    """
    workers = max(1, int(workers))
    if chunks_per_task > 0:
        k = int(chunks_per_task)
    else:
        tasks = workers
        if max_chunks > 0:
            tasks *= max(1, -(-nchunks // (int(max_chunks) * workers)))
        k = max(1, -(-nchunks // tasks))
    return [(lo, min(k, nchunks - lo)) for lo in range(0, nchunks, k)]


#: per worker process: the (ImageSet, transform) last fetched from the object store (by object
#: id) and the Hasher last loaded (by checkpoint path, size, mtime, device, batch size)
_SETS: dict = {}
_MODELS: dict = {}


def _imageset(ref):
    import ray

    key = ref.hex()
    if key not in _SETS:
        _SETS.clear()
        _SETS[key] = ray.get(ref)
    return _SETS[key]


def _hasher(model_path: str, device: str, batch_size: int):
    from cbir.models.hasher import Hasher

    st = os.stat(model_path)
    key = (os.path.abspath(model_path), st.st_size, st.st_mtime_ns, device, int(batch_size))
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = Hasher.load(model_path, device=device, batch_size=batch_size)
    return _MODELS[key]


def _read_chunk(imageset, transform, c: int, batch_size: int):
    """Chunk ``c``: its items decoded and the evaluation transform applied to the chunk at once
    (as :func:`cbir.models.hasher.eval_loader` does); a :class:`cbir.data.Batch`."""
    from cbir.data import collate

    lo, n = c * batch_size, len(imageset)
    return collate([imageset[i] for i in range(lo, min(n, lo + batch_size))], batch_transform=transform)


def _rows(out: dict) -> dict:
    obj = ("indices", "images", "shape", "skipped", "codes", "conf")
    return {k: np.asarray(v, dtype=object if k in obj else np.int64) for k, v in out.items()}


def _encode_chunks(batch: dict, ref, model_path: str, batch_size: int, threads: int) -> dict:
    """Ray task (CPU): read, decode, transform and encode the chunks of each unit
    ``(batch["lo"][j], batch["k"][j])``."""
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    imageset, transform = _imageset(ref)
    hasher = _hasher(model_path, "cpu", batch_size)
    out = {"chunk": [], "n": [], "indices": [], "skipped": [], "codes": [], "conf": []}
    units = zip(np.asarray(batch["lo"]).tolist(), np.asarray(batch["k"]).tolist())
    for c in [lo + j for lo, k in units for j in range(k)]:
        b = _read_chunk(imageset, transform, c, batch_size)
        codes, conf = b"", b""
        if len(b):
            code, f = hasher.encode_tensor(b.images)
            codes, conf = code.packed.tobytes(), np.ascontiguousarray(f, np.float32).tobytes()
        out["chunk"].append(c)
        out["n"].append(len(b))
        out["indices"].append(np.asarray(b.indices.numpy(), dtype=np.int64).tobytes())
        out["skipped"].append(json.dumps(list(b.skipped)))
        out["codes"].append(codes)
        out["conf"].append(conf)
    return _rows(out)


def _read_chunks(batch: dict, ref, batch_size: int) -> dict:
    """Ray task (beside GPU encoders): decode and transform the chunks of each unit."""
    import torch

    imageset, transform = _imageset(ref)
    out = {"chunk": [], "n": [], "indices": [], "images": [], "shape": [], "skipped": []}
    units = zip(np.asarray(batch["lo"]).tolist(), np.asarray(batch["k"]).tolist())
    for c in [lo + j for lo, k in units for j in range(k)]:
        b = _read_chunk(imageset, transform, c, batch_size)
        imgs = b.images if len(b) else torch.zeros(0)
        arr = np.ascontiguousarray(imgs.numpy(), dtype=np.float32)
        out["chunk"].append(c)
        out["n"].append(len(b))
        out["indices"].append(np.asarray(b.indices.numpy(), dtype=np.int64).tobytes())
        out["images"].append(arr.tobytes())
        out["shape"].append(json.dumps(list(arr.shape)))
        out["skipped"].append(json.dumps(list(b.skipped)))
    return _rows(out)


class _Encoder:
    """Ray actor (GPU): the checkpoint loaded once; each chunk encoded as one batch."""

    def __init__(self, model_path: str, device: str, batch_size: int, threads: int) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.hasher = _hasher(model_path, device, batch_size)

    def __call__(self, batch: dict) -> dict:
        import torch

        codes, confs = [], []
        for i in range(len(batch["chunk"])):
            shape = json.loads(batch["shape"][i])
            if batch["n"][i] == 0:
                codes.append(b"")
                confs.append(b"")
                continue
            x = torch.from_numpy(np.frombuffer(batch["images"][i], np.float32).reshape(shape).copy())
            c, f = self.hasher.encode_tensor(x)
            codes.append(c.packed.tobytes())
            confs.append(np.ascontiguousarray(f, np.float32).tobytes())
        return {
            "chunk": batch["chunk"],
            "n": batch["n"],
            "indices": batch["indices"],
            "skipped": batch["skipped"],
            "codes": np.asarray(codes, dtype=object),
            "conf": np.asarray(confs, dtype=object),
        }


def encode_with_ray(
    model_path,
    imageset,
    batch_size: int = 128,
    actors: int = 0,
    device: str = "auto",
    skip_log=None,
    progress: bool = False,
    threads: int = 0,
    chunks_per_task: int = 0,
):
    """Encode every readable image of ``imageset`` with the checkpoint ``model_path`` on Ray.

    Returns ``(Codes, conf float32 (N, B), indices int64)`` in index order, as
    :meth:`Hasher.encode_imageset`. ``actors``: encoders at once (0: one per GPU when CUDA is
    available, else one per cluster CPU). ``threads``: torch threads per CPU encoder (0: the
    cluster's CPUs / encoders, so 1 by default). ``chunks_per_task``: batches per CPU task
    (0: :func:`work_units`' equal shares). Unreadable images go to ``skip_log`` (reported once
    each, path and reason).
    """
    import torch

    from cbir.codes import Codes
    from cbir.models.hasher import Hasher

    ray = require_ray()
    if batch_size <= 0:
        raise ValueError("batch_size must be > 0")
    model_path = os.path.abspath(str(model_path))
    hasher = Hasher.load(model_path, device="cpu")  # the transform and the bit count
    raw_set = imageset.with_transform(None)
    nbits, nb = hasher.nbits, (hasher.nbits + 7) // 8
    started = False
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, logging_level="WARNING", log_to_driver=False
        )
        started = True
    try:
        resources = ray.cluster_resources()
        gpu = torch.cuda.is_available() and device in ("auto", "cuda") and resources.get("GPU", 0) >= 1
        ncpu = max(1, int(resources.get("CPU", 1)))
        if actors <= 0:
            actors = int(resources.get("GPU", 1)) if gpu else ncpu
        if threads <= 0:
            threads = 0 if gpu else max(1, ncpu // actors)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = bool(progress)
        nchunks = len(chunk_bounds(len(raw_set), batch_size))
        ref = [ray.put((raw_set, hasher.eval_transform))]  # in a list: passed as the reference, fetched once per worker
        # one block per work unit, built here (no read tasks to schedule beside the encoders)
        max_chunks = max(1, MAX_TASK_IMAGES // int(batch_size))
        units = work_units(nchunks, actors, 1 if gpu else chunks_per_task, max_chunks)
        rows = []
        if units:
            ds = ray.data.from_items([{"lo": lo, "k": k} for lo, k in units], override_num_blocks=len(units))
            if gpu:
                # half a CPU per read task: reads keep going beside the GPU actors (and the two
                # stages, asking for different resources, are not fused into one)
                ds = ds.map_batches(
                    _read_chunks, fn_args=(ref[0], int(batch_size)), batch_size=1, batch_format="numpy", num_cpus=0.5
                )
                ds = ds.map_batches(
                    _Encoder,
                    fn_constructor_args=(model_path, "cuda", int(batch_size), 0),
                    batch_size=1,
                    batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=actors),
                    num_gpus=1,
                    num_cpus=0,
                )
            else:
                # one stage: each task reads, decodes and encodes its unit; `actors` at once
                ds = ds.map_batches(
                    _encode_chunks,
                    fn_args=(ref[0], model_path, int(batch_size), int(threads)),
                    batch_size=1,
                    batch_format="numpy",
                    num_cpus=max(1, ncpu // actors) if ncpu >= actors else ncpu / actors,
                    concurrency=actors,
                )
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows += [
                    (int(b["chunk"][i]), b["n"][i], b["indices"][i], b["codes"][i], b["conf"][i], b["skipped"][i])
                    for i in range(len(b["chunk"]))
                ]
    finally:
        if started:
            ray.shutdown()
    rows.sort(key=lambda r: r[0])
    for r in rows:
        if skip_log is not None:
            skip_log.extend(tuple(s) for s in json.loads(r[5]))
    ids = [np.frombuffer(r[2], np.int64) for r in rows if r[1]]
    if not ids:
        return Codes.empty(nbits), np.zeros((0, nbits), np.float32), np.zeros(0, np.int64)
    codes = np.concatenate([np.frombuffer(r[3], np.uint8).reshape(-1, nb) for r in rows if r[1]])
    conf = np.concatenate([np.frombuffer(r[4], np.float32).reshape(-1, nbits) for r in rows if r[1]])
    return Codes(codes.copy(), nbits), conf.copy(), np.concatenate(ids).astype(np.int64)
