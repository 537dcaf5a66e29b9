#!/usr/bin/env python
"""Method benchmark (issues 3, 10): every hasher on the shared CIFAR-10 subset protocol, fairly.

Protocol: ``load_dataset("cifar10-subset")`` — 4,660 training images, which are also the
database, and 846 queries (relevance = same class); see ``../shared/datasets/README.md``.

Fairness (issue 10): every (method, bits, seed) run starts from **one shared warm start** — a CE
classifier (backbone + class head) trained once on the training set (``--warm-epochs``, or
``--init-from`` an existing ``model.pt``), as the papers start from pretrained backbones — and
gets **the same number of optimiser steps** (``--steps``, batch ``--batch-size``: the same images
seen; ``TrainConfig.max_steps``, the cosine schedule follows it), not the same wall time. Each
configuration runs for every ``--seeds`` value; the table reports mean ± std (population std over
seeds) of tie-aware mAP@k (lex, Hamming), id-order mAP@k, unique % and average collisions. A claim
"A > B" is printed as holding only when the mean difference exceeds one std (the larger of the two).

A method is given as ``name`` or ``name:key=value,key=value`` (hyper-parameters, as
``cbir train --param``), e.g. ``hegh:gamma=0``. ``ce`` has a fixed code length (class bits
only) and is run once per seed whatever ``--bits`` says. Results go to ``<out>/results.json`` and
``<out>/results.md`` (rewritten after every configuration).

Full grid (slow: 9 methods x 4 bit lengths x 3 seeds x the steps)::

    python benchmarks/bench_methods.py --steps 300 --seeds 0 1 2

Quick check::

    python benchmarks/bench_methods.py --methods dmuh regu --bits 12 --steps 20 --warm-epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

DEFAULT_METHODS = ["dmuh", "regu", "hegh", "hegh:gamma=0", "dhhe", "ddtl", "crpca", "itq", "lsh"]
DEFAULT_BITS = [12, 24, 32, 48]


def parse_method(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"bad method spec {text!r}: parameters are key=value, comma-separated")
        params[key.strip()] = value.strip()
    return name.strip(), params


def run_one(label: str, name: str, params: dict, bits: int | None, seed: int, splits, args) -> dict:
    from cbir.engine import TrainConfig, train
    from cbir.evaluate import encode_protocol, retrieval_summary

    safe = label.replace(":", "_").replace("=", "").replace(",", "_")
    cfg = TrainConfig(
        method=name,
        dataset="cifar10-subset",
        backbone=args.backbone,
        bits=bits,
        params=dict(params),
        epochs=10**6,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        init_from=args.init_from,
        seed=seed,
        threads=args.threads,
        out=str(Path(args.out) / "runs" / f"{safe}-{bits}-s{seed}"),
        progress=args.progress,
    )
    if args.freeze_backbone:
        # heads on cached features of the frozen warm-start backbone: --steps head steps of
        # P x K class-balanced batches (every class x --head-images-per-class), the same for every method
        cfg = dataclasses.replace(
            cfg,
            epochs=1,
            max_steps=None,
            freeze_backbone=True,
            head_steps=args.steps,
            head_lr=args.head_lr,
            head_images_per_class=args.head_images_per_class,
            feature_views=args.feature_views,
        )
    t0 = time.perf_counter()
    res = train(cfg)
    train_s = time.perf_counter() - t0
    enc = encode_protocol(res.hasher, splits, progress=False)
    summ = retrieval_summary(enc, k=args.k)
    k = summ["k"]
    cov = summ["coverage"]
    return {
        "method": label,
        "name": name,
        "params": params,
        "bits": res.hasher.layout.nbits,
        "seed": seed,
        "requested_bits": bits,
        "steps": res.config["head_steps"] if args.freeze_backbone else res.config["steps"],
        "train_wall_s": round(train_s, 1),
        "tie_lex": summ[f"tie_map@{k}_lex"],
        "tie_hamming": summ[f"tie_map@{k}_hamming"],
        "id_lex": summ[f"map@{k}_lex"],
        "id_hamming": summ[f"map@{k}_hamming"],
        "unique_percent": cov["unique_percent"],
        "average_collision_count": cov["average_collision_count"],
        "random_unique_percent": cov["random_unique_percent"],
        "content_hash": res.hasher.content_hash,
    }


METRICS = ("tie_lex", "tie_hamming", "id_lex", "id_hamming", "unique_percent", "average_collision_count")


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (method, bits): mean and std over seeds of every metric."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["bits"]), []).append(r)
    out = []
    for (method, bits), rs in groups.items():
        agg = {"method": method, "bits": bits, "seeds": [r["seed"] for r in rs], "steps": rs[0]["steps"]}
        for m in METRICS:
            v = np.array([r[m] for r in rs], dtype=np.float64)
            agg[m], agg[m + "_std"] = float(v.mean()), float(v.std())
        out.append(agg)
    return out


def _find(rows, method, bits):
    for r in rows:
        if r["method"] == method and r["bits"] == bits:
            return r
    return None


def claim_pairs(labels: list[str]) -> list[tuple[str, str, str]]:
    """The issue's claims among the labels run: every DMUH variant vs every Regu one, and every
    HEGH run with gamma != 0 vs the HEGH run with gamma = 0 that has the same other parameters
    (gamma_after_acc aside: it only acts when gamma != 0)."""
    parsed = {lab: parse_method(lab) for lab in labels}
    out = []
    for a, (na, pa) in parsed.items():
        for b, (nb, pb) in parsed.items():
            if na == "dmuh" and nb == "regu":
                out.append((a, b, f"DMUH > Regu ({a} vs {b})"))
            if na == nb == "hegh" and float(pa.get("gamma", 1)) != 0 and float(pb.get("gamma", 1)) == 0:
                rest = {k: v for k, v in pa.items() if k not in ("gamma", "gamma_after_acc")}
                if rest == {k: v for k, v in pb.items() if k not in ("gamma", "gamma_after_acc")}:
                    out.append((a, b, f"HEGH gamma={pa.get('gamma', 1)} > gamma=0 ({a} vs {b})"))
    return out


def target_checks(agg: list[dict]) -> list[str]:
    out = []
    for better, worse, what in claim_pairs(list(dict.fromkeys(r["method"] for r in agg))):
        for bits in sorted({r["bits"] for r in agg}):
            a, b = _find(agg, better, bits), _find(agg, worse, bits)
            if not (a and b):
                continue
            for key in ("tie_hamming", "tie_lex"):
                diff = a[key] - b[key]
                sd = max(a[key + "_std"], b[key + "_std"])
                verdict = "holds" if diff > sd else ("reversed" if -diff > sd else "within one std: no claim")
                out.append(
                    f"- {what} at {bits} bits ({key}): {a[key]:.4f} ± {a[key + '_std']:.4f} vs "
                    f"{b[key]:.4f} ± {b[key + '_std']:.4f} -> {verdict}"
                )
    return out


def write_reports(rows: list[dict], meta: dict, out: Path, k: int) -> None:
    agg = aggregate(rows)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": rows, "aggregate": agg}, indent=2))
    lines = [
        "# Method benchmark: cifar10-subset (846 queries vs 4,660 database)",
        "",
        f"Backbone `{meta['backbone']}` warm-started from `{meta['init_from']}` ({meta.get('regime', 'full fine-tune')}), "
        f"{meta['steps']} optimiser steps of batch {meta.get('head_batch', meta['batch_size'])} per run, lr {meta['lr']}, seeds {meta['seeds']}, {meta['torch_threads']} torch "
        f"threads on {meta['machine']}. Mean ± std over seeds.",
        "",
        f"| method | bits | steps | tie mAP@{k} lex | tie mAP@{k} Hamming | id mAP@{k} lex | id mAP@{k} Hamming "
        "| unique % | avg collisions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in agg:
        cells = " | ".join(
            f"{r[m]:.4f} ± {r[m + '_std']:.4f}"
            if "percent" not in m and "collision" not in m
            else f"{r[m]:.2f} ± {r[m + '_std']:.2f}"
            for m in METRICS
        )
        lines.append(f"| {r['method']} | {r['bits']} | {r['steps']} | {cells} |")
    checks = target_checks(agg)
    if checks:
        lines += ["", "## Claims (a difference counts only beyond one std)", "", *checks]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="name or name:key=value,... (default: all)")
    ap.add_argument("--bits", nargs="+", type=int, default=DEFAULT_BITS)
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per run, equal for every method")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--init-from", default=None, help="shared warm start (a CE model.pt); default: train one once")
    ap.add_argument("--warm-epochs", type=int, default=30, help="epochs of the shared CE warm start when trained here")
    ap.add_argument("--backbone", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine two threads ran up to 20x slower under load)",
    )
    ap.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="fit every method's head on cached features of the frozen warm-start backbone (--steps head steps "
        "each; HEGH then runs with cbam_blocks=0 unless given: frozen CBAM blocks would stay random)",
    )
    ap.add_argument("--head-lr", type=float, default=1e-2, help="with --freeze-backbone: the head stage's lr")
    ap.add_argument(
        "--head-images-per-class", type=int, default=51, help="with --freeze-backbone: K of the P x K head batches"
    )
    ap.add_argument("--feature-views", type=int, default=2, help="with --freeze-backbone: augmented views cached")
    ap.add_argument("--out", default="benchmarks/results/methods")
    ap.add_argument("--progress", action="store_true", help="show training progress bars")
    ap.add_argument("--from-results", default=None, help="re-render results.md from a results.json; train nothing")
    args = ap.parse_args(argv)
    if args.from_results:
        data = json.loads(Path(args.from_results).read_text())
        out = Path(args.from_results).parent
        write_reports(data["runs"], data["meta"], out, min(args.k, data["meta"]["database"]))
        for line in target_checks(aggregate(data["runs"])):
            print(line)
        return 0

    from cbir.data import load_dataset, shared_datasets_dir

    shared = shared_datasets_dir()
    if shared is None or not (shared / "cifar10-subset.npz").is_file():
        print("SKIP: ../shared/datasets/cifar10-subset.npz not found (set CBIR_DATASETS); nothing to benchmark.")
        return 0
    methods = [(m, *parse_method(m)) for m in args.methods]
    from cbir.models.registry import list_methods, resolve_params

    for _label, name, params in methods:
        if name not in list_methods():
            raise SystemExit(f"unknown method {name!r}; choose from {list_methods()}")
        resolve_params(name, params)  # fail fast on bad hyper-parameters
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.init_from is None:
        from cbir.engine import TrainConfig, train

        print(f"[bench] shared warm start: CE {args.backbone}, {args.warm_epochs} epochs ...", flush=True)
        warm = train(
            TrainConfig(
                method="ce",
                dataset="cifar10-subset",
                backbone=args.backbone,
                epochs=args.warm_epochs,
                batch_size=args.batch_size,
                lr=2e-3,
                seed=0,
                threads=args.threads,
                out=str(out / "warm_ce"),
                progress=args.progress,
            )
        )
        args.init_from = str(warm.checkpoint)
    splits = load_dataset("cifar10-subset")
    meta = {
        "dataset": "cifar10-subset",
        "queries": len(splits.query),
        "database": len(splits.database),
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "steps": args.steps,
        "regime": "frozen backbone, head steps on cached features" if args.freeze_backbone else "full fine-tune",
        "head_batch": f"10 classes x {args.head_images_per_class}" if args.freeze_backbone else args.batch_size,
        "seeds": args.seeds,
        "init_from": args.init_from,
        "k": args.k,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "argv": sys.argv[1:],
    }
    rows: list[dict] = []
    kk = min(args.k, len(splits.database))
    if args.freeze_backbone:
        for _label, name, params in methods:
            if name == "hegh":
                params.setdefault("cbam_blocks", "0")
    # seeds outermost: with a frozen backbone every run of one seed reuses one feature cache
    grid = [
        (label, name, params, bits, seed)
        for seed in args.seeds
        for label, name, params in methods
        for bits in ([None] if name == "ce" else args.bits)
    ]
    for label, name, params, bits, seed in grid:
        row = run_one(label, name, params, bits, seed, splits, args)
        rows.append(row)
        print(
            f"[bench] {label} {row['bits']} bits seed {seed}: tie-aware mAP@{kk} lex {row['tie_lex']:.4f} "
            f"hamming {row['tie_hamming']:.4f}, unique {row['unique_percent']:.2f}%, collisions "
            f"{row['average_collision_count']:.2f} ({row['steps']} steps, {row['train_wall_s']} s)",
            flush=True,
        )
        write_reports(rows, meta, out, kk)
    for line in target_checks(aggregate(rows)):
        print(line)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
