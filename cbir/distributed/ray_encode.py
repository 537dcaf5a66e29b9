"""Encoding an image collection with Ray Data: ``cbir index build --engine ray``.

The collection is cut into chunks of ``batch_size`` consecutive items (the batches of the
single-process path: ``make_loader(..., shuffle=False)``). A Ray dataset of chunk numbers runs
two ``map_batches`` stages, streamed:

1. **read** (Ray tasks, in parallel): each chunk's files are read and decoded and the model's
   evaluation transform applied, by the same :class:`~cbir.data.ImageSet` code as the
   single-process path; unreadable images are left out and reported back as (path, reason);
2. **encode** (an actor pool; one GPU per actor when ``torch.cuda.is_available()``, else one
   CPU): each actor loads the checkpoint once and encodes a chunk as one batch
   (:meth:`Hasher.encode_tensor`).

The driver collects the chunks, orders them by chunk number and returns ``(codes, conf,
indices)`` exactly like :meth:`Hasher.encode_imageset`: the same images in the same batches
through the same model, so the codes are the single-process codes byte for byte (tested).
The index is then written by :func:`cbir.indexer.build_index`'s one sorted append pass.

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


#: ImageSets already fetched from the object store by this worker process (by object id)
_SETS: dict = {}


def _read_chunks(batch: dict, ref, batch_size: int) -> dict:
    """Ray task: decode the items of each chunk in ``batch["id"]`` and apply the evaluation
    transform to the chunk at once (as :func:`cbir.models.hasher.eval_loader` does)."""
    import ray
    import torch

    from cbir.data import collate

    key = ref.hex()
    if key not in _SETS:
        _SETS.clear()
        _SETS[key] = ray.get(ref)
    imageset, transform = _SETS[key]

    out = {"chunk": [], "n": [], "indices": [], "images": [], "shape": [], "skipped": []}
    n = len(imageset)
    for c in np.asarray(batch["id"]).tolist():
        lo = c * batch_size
        b = collate([imageset[i] for i in range(lo, min(n, lo + batch_size))], batch_transform=transform)
        imgs = b.images if len(b) else torch.zeros(0)
        arr = np.ascontiguousarray(imgs.numpy(), dtype=np.float32)
        out["chunk"].append(c)
        out["n"].append(len(b))
        out["indices"].append(np.asarray(b.indices.numpy(), dtype=np.int64).tobytes())
        out["images"].append(arr.tobytes())
        out["shape"].append(json.dumps(list(arr.shape)))
        out["skipped"].append(json.dumps(list(b.skipped)))
    return {
        k: np.asarray(v, dtype=object if k in ("indices", "images", "shape", "skipped") else np.int64)
        for k, v in out.items()
    }


class _Encoder:
    """Ray actor: the checkpoint loaded once; each chunk encoded as one batch."""

    def __init__(self, model_path: str, device: str, batch_size: int, threads: int) -> None:
        import torch

        from cbir.models.hasher import Hasher

        if threads > 0:  # Ray pins an actor's OMP threads to its CPU request (1)
            torch.set_num_threads(threads)
        self.hasher = Hasher.load(model_path, device=device, batch_size=batch_size)

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
):
    """Encode every readable image of ``imageset`` with the checkpoint ``model_path`` on Ray.

    Returns ``(Codes, conf float32 (N, B), indices int64)`` in index order, as
    :meth:`Hasher.encode_imageset`. ``actors``: encoder actors (0: one per GPU when CUDA is
    available, else half the cluster's CPUs, at least 1; the other CPUs read). ``threads``:
    torch threads per CPU actor (0: the cluster's CPUs / actors, since the read tasks mostly
    wait on files). Unreadable images go to ``skip_log`` (reported once each, path and reason).
    """
    import torch

    from cbir.codes import Codes
    from cbir.models.hasher import Hasher

    ray = require_ray()
    if batch_size <= 0:
        raise ValueError("batch_size must be > 0")
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
        gpu = torch.cuda.is_available() and device in ("auto", "cuda") and ray.cluster_resources().get("GPU", 0) >= 1
        ncpu = int(ray.cluster_resources().get("CPU", 2))
        if actors <= 0:
            actors = int(ray.cluster_resources().get("GPU", 1)) if gpu else max(1, ncpu // 2)
        if threads <= 0:
            threads = 0 if gpu else max(1, ncpu // actors)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = bool(progress)
        nchunks = len(chunk_bounds(len(raw_set), batch_size))
        ref = [ray.put((raw_set, hasher.eval_transform))]  # in a list: passed as the reference, fetched once per worker
        ds = ray.data.range(nchunks)
        # half a CPU per read task: reads keep going beside CPU actors (and the two stages,
        # asking for different resources, are not fused into one)
        ds = ds.map_batches(
            _read_chunks, fn_args=(ref[0], int(batch_size)), batch_size=1, batch_format="numpy", num_cpus=0.5
        )
        ds = ds.map_batches(
            _Encoder,
            fn_constructor_args=(str(model_path), "cuda" if gpu else "cpu", int(batch_size), int(threads)),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpu else 0,
            num_cpus=0 if gpu else 1,
        )
        rows = []
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
