"""Encode throughput of ``cbir index build --engine ray`` against raw batched inference (issue 14).

One run, in this order, on the same machine and cores:

1. raw batched inference: ``Hasher.encode_tensor`` on float batches already in the evaluation
   transform (no file reading, no decoding) -- the ceiling, measured again just before each
   engine (a shared machine drifts) and each engine's ratio taken to that figure;
2. the local engine: ``Hasher.encode_imageset`` over the image files (read, decode, transform,
   encode in this process);
3. the Ray engine: :func:`cbir.distributed.ray_encode.encode_with_ray` on a local Ray with all
   the machine's CPUs (``ray.init`` timed apart; its workers at nice ``--ray-niceness``), ``--runs`` runs end to end (building the
   dataset, the Ray Data pipeline, collecting and ordering the codes). Run 1 starts cold: each
   of Ray's worker processes imports torch and cbir and loads the model inside the timed run;
   the later runs find the pooled workers warm (model cached), as later builds on a running
   Ray do.

The images are PNG files written to a temporary folder (random pixels, ``--size`` px; the
model's cost does not depend on the content); the model is ``--model`` or an untrained DDTL of
``--backbone`` (random weights: same cost as a trained one). Prints images/s and the ratio of
each engine to raw inference (the mean of raw inference just before and just after that
engine: a shared machine drifts), and checks the Ray codes equal the local ones.

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
    ap.add_argument("--actors", type=int, default=0, help="Ray encoders at once (0: one per CPU)")
    ap.add_argument("--chunks-per-task", type=int, default=0, help="Ray: batches per task (0: auto)")
    ap.add_argument("--runs", type=int, default=2, help="Ray engine runs (default: %(default)s)")
    ap.add_argument(
        "--ray-niceness",
        type=int,
        default=0,
        help="nice value of Ray's worker processes (Ray's own default is 15, which on a shared machine "
        "leaves them behind every other process while raw inference runs at 0; default: %(default)s)",
    )
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

        # 1. raw batched inference on pre-transformed float batches, in this process with all
        # its torch threads; measured just before and just after each engine run (the machine
        # may be shared) and each run compared with the mean of the two
        x = h.preprocess([iset.get_pil(i) for i in range(min(args.n, 4 * args.batch_size))])
        h.encode_tensor(x)  # warm-up
        reps = max(1, min(args.n, 4096) // len(x))

        def raw_rate() -> float:
            t = time.perf_counter()
            for _ in range(reps):
                h.encode_tensor(x)
            return reps * len(x) / (time.perf_counter() - t)

        def report(name: str, rate: float, before: float, extra: str = "") -> None:
            after = raw_rate()
            raw = (before + after) / 2
            print(f"raw batched inference   {after:8.1f} images/s")
            print(f"{name:23s} {rate:8.1f} images/s  ({rate / raw:.2f} x raw, mean of before/after {raw:.1f}){extra}")

        print(f"raw batched inference   {raw_rate():8.1f} images/s (warm-up)")

        # 2. local engine
        before = raw_rate()
        print(f"raw batched inference   {before:8.1f} images/s")
        t = time.perf_counter()
        c_local, _, i_local = h.encode_imageset(iset, batch_size=args.batch_size, skip_log=SkipLog())
        report("local engine", len(i_local) / (time.perf_counter() - t), before)

        # 3. Ray engine, end to end
        os.environ["RAY_worker_niceness"] = str(args.ray_niceness)  # read by Ray's worker processes
        t = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        print(f"ray.init                {time.perf_counter() - t:8.1f} s (not counted below)")
        try:
            for run in range(1, args.runs + 1):
                before = raw_rate()
                print(f"raw batched inference   {before:8.1f} images/s")
                t = time.perf_counter()
                c_ray, _, i_ray = encode_with_ray(
                    mp,
                    iset,
                    args.batch_size,
                    actors=args.actors,
                    skip_log=SkipLog(),
                    chunks_per_task=args.chunks_per_task,
                )
                rate = len(i_ray) / (time.perf_counter() - t)
                same = c_ray.packed.tobytes() == c_local.packed.tobytes() and np.array_equal(i_ray, i_local)
                label = f"ray run {run} ({'cold' if run == 1 else 'warm'})"
                report(label, rate, before, f", codes equal to local: {same}")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
