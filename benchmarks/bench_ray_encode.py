"""Encode throughput of ``cbir index build --engine ray`` against raw batched inference (issue 14).

One run, in this order, on the same machine and cores:

1. raw batched inference: ``Hasher.encode_tensor`` on float batches already in the evaluation
   transform (no file reading, no decoding) -- the ceiling, measured again just before each
   engine (a shared machine drifts) and each engine's ratio taken to that figure;
2. the local engine: ``Hasher.encode_imageset`` over the image files (read, decode, transform,
   encode in this process);
3. the Ray engine: :func:`cbir.distributed.ray_encode.encode_with_ray` on a local Ray with all
   the machine's CPUs (``ray.init`` timed apart), a first run (actor start and model load
   included) and a warm second run.

The images are PNG files written to a temporary folder (random pixels, ``--size`` px; the
model's cost does not depend on the content); the model is ``--model`` or an untrained DDTL of
``--backbone`` (random weights: same cost as a trained one). Prints images/s and the ratio of
each engine to raw inference, and checks the Ray codes equal the local ones.

    python benchmarks/bench_ray_encode.py --n 2048
    python benchmarks/bench_ray_encode.py --n 512 --backbone convnet
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_model(args, out: Path) -> Path:
    import torch

    from cbir.models.hasher import Hasher
    from cbir.models.registry import MethodSpec, create_method, resolve_params

    if args.model:
        return Path(args.model)
    torch.manual_seed(0)
    spec = MethodSpec(
        backbone=args.backbone, num_classes=10, nbits=None, depth=12, class_names=tuple(str(i) for i in range(10))
    )
    params = resolve_params("ddtl", None)
    h = Hasher(create_method("ddtl", spec, params), "ddtl", spec, params, image_size=32, device="cpu")
    return h.save(out / "model.pt")


def write_images(root: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i:06d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="images (default: %(default)s)")
    ap.add_argument("--size", type=int, default=48, help="image side in px (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--backbone", default="resnet20")
    ap.add_argument("--model", help="checkpoint to use instead of an untrained DDTL")
    ap.add_argument("--actors", type=int, default=0, help="encoder actors (0: half the CPUs)")
    args = ap.parse_args()

    import ray
    import torch

    from cbir.cli.index_cmd import _image_folder
    from cbir.data import SkipLog
    from cbir.distributed.ray_encode import encode_with_ray
    from cbir.models.hasher import Hasher

    cpus = os.cpu_count() or 1
    print(
        f"machine: {cpus} CPU cores (os.cpu_count), torch threads {torch.get_num_threads()}, "
        f"CUDA {'yes' if torch.cuda.is_available() else 'no'}; n={args.n} images of "
        f"{args.size}x{args.size} px, batch {args.batch_size}, backbone {args.backbone}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mp = make_model(args, tmp)
        write_images(tmp / "imgs", args.n, args.size)
        iset = _image_folder(tmp / "imgs")
        h = Hasher.load(mp, device="auto", batch_size=args.batch_size)

        # 1. raw batched inference on pre-transformed float batches (the machine may be
        # shared: measured before and after the engines, the faster figure is the ceiling)
        x = h.preprocess([iset.get_pil(i) for i in range(min(args.n, 4 * args.batch_size))])
        h.encode_tensor(x)  # warm-up
        reps = max(1, args.n // len(x))

        def raw_rate() -> float:
            t = time.perf_counter()
            for _ in range(reps):
                h.encode_tensor(x)
            return reps * len(x) / (time.perf_counter() - t)

        raw = raw_rate()
        print(f"raw batched inference   {raw:8.1f} images/s")

        # 2. local engine
        raw = raw_rate()  # each engine is compared with raw inference measured just before it
        print(f"raw batched inference   {raw:8.1f} images/s")
        t = time.perf_counter()
        c_local, _, i_local = h.encode_imageset(iset, batch_size=args.batch_size, skip_log=SkipLog())
        local = len(i_local) / (time.perf_counter() - t)
        print(f"local engine            {local:8.1f} images/s  ({local / raw:.2f} x raw)")

        # 3. Ray engine
        t = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        print(f"ray.init                {time.perf_counter() - t:8.1f} s (not counted below)")
        try:
            for run in ("run 1", "run 2"):
                raw = raw_rate()
                print(f"raw batched inference   {raw:8.1f} images/s")
                t = time.perf_counter()
                c_ray, _, i_ray = encode_with_ray(mp, iset, args.batch_size, actors=args.actors, skip_log=SkipLog())
                rate = len(i_ray) / (time.perf_counter() - t)
                same = c_ray.packed.tobytes() == c_local.packed.tobytes() and np.array_equal(i_ray, i_local)
                print(
                    f"ray engine, {run:5s} {rate:8.1f} images/s  ({rate / raw:.2f} x raw), codes equal to local: {same}"
                )
        finally:
            ray.shutdown()
        print(f"raw batched inference   {raw_rate():8.1f} images/s (after the engines)")


if __name__ == "__main__":
    main()
