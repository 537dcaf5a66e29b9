"""Issue 2 benchmark: DDTL (class bits + tree path) vs the same backbone trained with CE only.

On the shared CIFAR subset protocol (846 queries vs 4,660 database = training images) both
models get the same backbone, epochs, batch size, optimiser and schedule (the CPU budget is
stated as epochs; wall times are printed). Reports mAP@1000 (lexicographic and Hamming order),
mAP@all and the coverage of the database codes (unique %, entropy, average collision count),
then the MNIST protocol (first 9,000 train/database, last 1,000 queries) for DDTL alone.

    python benchmarks/bench_ddtl.py --epochs 30 --mnist-epochs 8 --out runs/bench_ddtl

Writes ``results.json`` and ``results.md`` (with the resolved configs) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def run_one(name, cfg, splits):
    from cbir.engine import train
    from cbir.evaluate import encode_protocol, retrieval_summary

    t0 = time.perf_counter()
    res = train(cfg)
    enc = encode_protocol(res.hasher, splits, progress=False)
    summ = retrieval_summary(enc, k=1000)
    summ.update(name=name, train_wall_s=res.config["train_wall_s"], steps=res.config["steps"],
                total_wall_s=round(time.perf_counter() - t0, 1), nbits=res.hasher.nbits,
                content_hash=res.hasher.content_hash, config=res.config["train_config"])
    cov = summ["coverage"]
    print(f"{name:28s} mAP@1000 lex {summ['map@1000_lex']:.4f}  hamming {summ['map@1000_hamming']:.4f}  "
          f"mAP@all {summ['map@all_hamming']:.4f}  unique {cov['unique_percent']:6.2f} %  "
          f"entropy {cov['entropy_bits']:.3f}  collisions {cov['average_collision_count']:.3f}  "
          f"train {summ['train_wall_s']:.0f} s", flush=True)
    return summ


def main(argv=None) -> int:
    from cbir.data import load_dataset, shared_datasets_dir
    from cbir.engine import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--mnist-epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--backbone", default="resnet20")
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--beta", type=float, default=0.1, help="DDTL contrastive weight")
    ap.add_argument("--tau", type=float, default=1.0, help="DDTL NT-Xent temperature")
    ap.add_argument("--skip-ce", action="store_true", help="DDTL only (no CE-only baseline)")
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--skip-cifar", action="store_true")
    ap.add_argument("--out", default="runs/bench_ddtl")
    args = ap.parse_args(argv)
    if shared_datasets_dir() is None:
        print("../shared/datasets not found (set CBIR_DATASETS): nothing to benchmark", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  progress=False, seed=0)
    results = []
    if not args.skip_cifar:
        splits = load_dataset("cifar10-subset")
        print(f"cifar10-subset: {len(splits.query)} queries, {len(splits.database)} database/train images; "
              f"{args.epochs} epochs, batch {args.batch_size}, {args.backbone}", flush=True)
        results.append(run_one(f"DDTL 4+{args.depth} bits", TrainConfig(
            method="ddtl", dataset="cifar10-subset", depth=args.depth, params={"beta": args.beta, "tau": args.tau},
            out=str(out / "cifar_ddtl"), **common), splits))
        if args.skip_ce:
            results.append(None)
        else:
            results.append(run_one("CE-only (4 class bits)", TrainConfig(
            method="ce", dataset="cifar10-subset", out=str(out / "cifar_ce"), **common), splits))
        d, c = results[-2], results.pop()
        if c is not None:
            results.append(c)
            print(f"DDTL - CE mAP@1000 (lex): {d['map@1000_lex'] - c['map@1000_lex']:+.4f}", flush=True)
        print(f"DDTL unique {d['coverage']['unique_percent']:.2f} % (target >= 50), "
              f"collisions {d['coverage']['average_collision_count']:.3f} (target <= 3)", flush=True)
    if not args.skip_mnist:
        splits = load_dataset("mnist")
        print(f"mnist: {len(splits.query)} queries, {len(splits.database)} database/train images; "
              f"{args.mnist_epochs} epochs", flush=True)
        results.append(run_one(f"MNIST DDTL 4+{args.depth} bits", TrainConfig(
            method="ddtl", dataset="mnist", depth=args.depth, params={"beta": args.beta, "tau": args.tau},
            out=str(out / "mnist_ddtl"), **dict(common, epochs=args.mnist_epochs)), splits))
        print(f"MNIST mAP@1000 (lex) {results[-1]['map@1000_lex']:.4f} (target >= 0.98)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| run | bits | mAP@1000 lex | mAP@1000 Hamming | mAP@all | unique % | entropy | avg collisions | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cov = r["coverage"]
        lines.append(f"| {r['name']} | {r['nbits']} | {r['map@1000_lex']:.4f} | {r['map@1000_hamming']:.4f} | "
                     f"{r['map@all_hamming']:.4f} | {cov['unique_percent']:.2f} | {cov['entropy_bits']:.3f} | "
                     f"{cov['average_collision_count']:.3f} | {r['train_wall_s']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
