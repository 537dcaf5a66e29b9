"""Issue 10 benchmark: DDTL (class bits + tree path) vs CE-only from the same start, one command.

Protocol per dataset (cifar10-subset: 846 queries vs 4,660 database = training images; MNIST:
last 1,000 queries vs first 9,000):

1. **Stage 1, shared**: one CE classifier (backbone + class head) trained on 90 % of the training
   set (the other 10 % is held out for selection; never the queries). This model *is* the CE-only
   baseline (4 class bits) and the start of DDTL.
2. **Selection on the held-out 10 %**: for each candidate (``--tau`` x ``--head-steps``) DDTL's
   tree is fitted on the cached features of the 90 % part (two-stage mode, thesis §3.3.3: backbone
   and class head frozen; the tree initialised by class-wise median splits with per-class node
   offsets (``--tree-init pca``), then ``head-steps`` of per-class NT-Xent on leaf probabilities of
   two augmented views in class-balanced P x K batches) and scored with the held-out images as
   queries against the 90 % part: the candidate with the best mean tie-aware mAP@1000 (lex,
   Hamming) among those reaching ``--min-unique`` % unique codes on the 90 % part wins (the most
   unique if none does).
3. **Final DDTL**: the tree refitted with the chosen candidate on all training images
   (= database), then both models are scored on the real protocol.

Printed per model: tie-aware mAP@1000 (lexicographic and Hamming; expected AP over all orders of
tied items, order-independent), the id-order mAP@1000 (ties broken by database id) and mAP@all,
unique %, average collisions (sum n^2 / N - 1), and the same two figures for uniformly random
codes at the same N and B with the class bits as observed (``cbir.metrics.coverage.random_expectation``),
and the ratio. Budgets are optimiser steps (stage 1: ``--ce-epochs`` x steps/epoch, shared by both
models; stage 2: the tree alone, ``--head-steps`` on cached features; the class head is frozen, so
DDTL's class bits are exactly the CE-only code), so figures do not depend on machine load.

    python benchmarks/bench_ddtl.py --out runs/bench_ddtl --threads 2

Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def score(hasher, db_set, q_set, k=1000) -> dict:
    """Tie-aware and id-order mAP@k, mAP@all and coverage beside the random expectation
    (:func:`cbir.evaluate.retrieval_summary`), flattened."""
    from types import SimpleNamespace

    from cbir.evaluate import encode_protocol, retrieval_summary

    enc = encode_protocol(hasher, SimpleNamespace(database=db_set, query=q_set), progress=False)
    s = retrieval_summary(enc, k, fixed_bits=hasher.layout.class_bits if hasher.layout.depth else 0)
    kk, cov = s["k"], s["coverage"]
    return {
        "k": kk,
        "n_db": cov["n"],
        "n_query": len(enc.query_codes),
        "nbits": cov["nbits"],
        "tie_map_lex": s[f"tie_map@{kk}_lex"],
        "tie_map_hamming": s[f"tie_map@{kk}_hamming"],
        "id_map_lex": s[f"map@{kk}_lex"],
        "id_map_hamming": s[f"map@{kk}_hamming"],
        "map_all_hamming": s["map@all_hamming"],
        "unique": cov["unique_percent"],
        "collisions": cov["average_collision_count"],
        "entropy": cov["entropy_bits"],
        "largest_bucket": cov["largest_bucket"],
        "random_unique": cov["random_unique_percent"],
        "random_collisions": cov["random_average_collision_count"],
        "random_fixed_bits": cov["random_fixed_bits"],
        "unique_ratio": cov["unique_ratio"],
    }


def line(name: str, s: dict) -> str:
    return (
        f"{name:24s} tie-aware mAP@{s['k']} lex {s['tie_map_lex']:.4f} hamming {s['tie_map_hamming']:.4f} | "
        f"id-order lex {s['id_map_lex']:.4f} hamming {s['id_map_hamming']:.4f} | mAP@all {s['map_all_hamming']:.4f} | "
        f"unique {s['unique']:6.2f} % (random {s['random_unique']:6.2f} %, ratio {s['unique_ratio']:.3f}) | "
        f"collisions {s['collisions']:.3f} (random {s['random_collisions']:.3f})"
    )


def run_dataset(name: str, args, out: Path) -> dict:
    from cbir.data import load_dataset, split_validation
    from cbir.engine import TrainConfig, train
    from cbir.models.hasher import Hasher

    splits = load_dataset(name)
    train_part, held_out = split_validation(splits.train, 0.1, 0)
    ce_epochs = args.ce_epochs if name == "cifar10-subset" else args.mnist_ce_epochs
    common = dict(dataset=name, backbone=args.backbone, progress=False, seed=0, threads=args.threads)
    t0 = time.perf_counter()
    ce_from = args.ce_from if name == "cifar10-subset" else args.mnist_ce_from
    if ce_from:
        ce, ce_cfg = Hasher.load(ce_from, device="cpu"), {"reused": str(ce_from)}
        ce_path = ce_from
        print(f"[{name}] stage 1: reusing the CE model {ce_from}", flush=True)
    else:
        res = train(
            TrainConfig(
                method="ce",
                epochs=ce_epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                val_fraction=0.1,
                out=str(out / name / "ce"),
                **common,
            )
        )
        ce, ce_cfg, ce_path = res.hasher, res.config, str(res.checkpoint)
        print(
            f"[{name}] stage 1: CE {args.backbone}, {res.config['steps']} steps (batch {args.batch_size}, "
            f"{ce_epochs} epochs on {len(train_part)} images), {res.config['train_wall_s']:.0f} s",
            flush=True,
        )

    tree = {"two_stage": True, "tree_init": args.tree_init, "class_bias": args.tree_init == "pca"}

    def ddtl(tau: float, steps: int, val_fraction: float, tag: str):
        return train(
            TrainConfig(
                method="ddtl",
                depth=args.depth,
                epochs=0,
                init_from=ce_path,
                val_fraction=val_fraction,
                params=dict(tree, tau=tau),
                head_steps=steps,
                head_lr=args.head_lr,
                head_images_per_class=args.k_per_class,
                feature_views=args.views,
                out=str(out / name / tag),
                **common,
            )
        )

    selection = []
    for tau in args.tau:
        for steps in args.head_steps:
            r = ddtl(tau, steps, 0.1, f"select_tau{tau:g}_steps{steps}")
            s = score(r.hasher, train_part, held_out)
            selection.append({"tau": tau, "head_steps": steps, **s})
            print(
                f"[{name}] held-out selection tau={tau:g}, {steps} NT-Xent steps: tie-aware mAP lex "
                f"{s['tie_map_lex']:.4f} hamming {s['tie_map_hamming']:.4f}, unique {s['unique']:.2f} % of "
                f"{s['n_db']} training codes, collisions {s['collisions']:.3f}",
                flush=True,
            )
    ok = [s for s in selection if s["unique"] >= args.min_unique] or [max(selection, key=lambda s: s["unique"])]
    best = max(ok, key=lambda s: (s["tie_map_lex"] + s["tie_map_hamming"]) / 2)
    print(f"[{name}] chosen on the held-out part: tau={best['tau']:g}, {best['head_steps']} NT-Xent steps", flush=True)
    final = ddtl(best["tau"], best["head_steps"], 0.0, "ddtl")
    ce_scores = score(ce, splits.database, splits.query)
    dd_scores = score(final.hasher, splits.database, splits.query)
    print(line(f"{name} CE-only 4 bits", ce_scores), flush=True)
    print(line(f"{name} DDTL 4+{args.depth} bits", dd_scores), flush=True)
    end = [r for r in final.history if r.get("end_of_stage")][-1]
    return {
        "dataset": name,
        "ce": ce_scores,
        "ddtl": dd_scores,
        "selection": selection,
        "tau": best["tau"],
        "head_steps": best["head_steps"],
        "ce_config": ce_cfg,
        "ddtl_config": final.config,
        "ddtl_tree": end,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def verdicts(r: dict) -> list[str]:
    d, c = r["ddtl"], r["ce"]
    rows = [
        f"unique {d['unique']:.2f} % (target >= 75): {'met' if d['unique'] >= 75 else 'NOT met'}",
        f"collisions {d['collisions']:.3f} (target <= 0.5): {'met' if d['collisions'] <= 0.5 else 'NOT met'}",
    ]
    for o in ("lex", "hamming"):
        diff = d[f"tie_map_{o}"] - c[f"tie_map_{o}"]
        rows.append(
            f"tie-aware mAP@1000 {o}: DDTL - CE = {diff:+.4f} (target >= -0.01): "
            f"{'met' if diff >= -0.01 else 'NOT met'}"
        )
    return rows


def main(argv=None) -> int:
    from cbir.data import shared_datasets_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet20")
    ap.add_argument("--ce-epochs", type=int, default=40, help="stage-1 CE epochs on cifar10-subset")
    ap.add_argument("--mnist-ce-epochs", type=int, default=8, help="stage-1 CE epochs on MNIST")
    ap.add_argument("--ce-from", default=None, help="reuse this CE model.pt as stage 1 on cifar10-subset")
    ap.add_argument("--mnist-ce-from", default=None, help="reuse this CE model.pt as stage 1 on MNIST")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument(
        "--tau", type=float, nargs="+", default=[0.2], help="NT-Xent temperatures, chosen on the held-out part"
    )
    ap.add_argument(
        "--head-steps",
        type=int,
        nargs="+",
        default=[0, 100],
        help="NT-Xent fine-tuning steps of the tree after its initialisation, chosen on the held-out part",
    )
    ap.add_argument(
        "--tree-init",
        default="pca",
        choices=["pca", "random"],
        help="pca: class-wise median splits + per-class node offsets (cbir.models.heads.fit_pca_median_tree); "
        "random: the thesis' gradient-only fit",
    )
    ap.add_argument("--min-unique", type=float, default=75.0)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--k-per-class", type=int, default=51, help="images per class in the tree-fitting batches")
    ap.add_argument("--views", type=int, default=4, help="augmented views cached per image")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine two threads ran up to 20x slower under load)",
    )
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--skip-cifar", action="store_true")
    ap.add_argument("--out", default="runs/bench_ddtl")
    args = ap.parse_args(argv)
    if shared_datasets_dir() is None:
        print("../shared/datasets not found (set CBIR_DATASETS): nothing to benchmark", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if not args.skip_cifar:
        results.append(run_dataset("cifar10-subset", args, out))
        for v in verdicts(results[-1]):
            print(f"cifar10-subset {v}", flush=True)
    if not args.skip_mnist:
        results.append(run_dataset("mnist", args, out))
        m = results[-1]["ddtl"]
        print(
            f"MNIST DDTL mAP@1000 tie-aware lex {m['tie_map_lex']:.4f}, id-order lex {m['id_map_lex']:.4f} "
            f"(target >= 0.98): {'met' if min(m['tie_map_lex'], m['id_map_lex']) >= 0.98 else 'NOT met'}",
            flush=True,
        )
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [
        "| dataset | model | bits | tie mAP@1000 lex | tie mAP@1000 Hamming | id mAP@1000 lex | id mAP@1000 Hamming "
        "| unique % | random unique % | collisions | random collisions |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for key in ("ce", "ddtl"):
            s = r[key]
            lines.append(
                f"| {r['dataset']} | {key} | {s['nbits']} | {s['tie_map_lex']:.4f} | {s['tie_map_hamming']:.4f} | "
                f"{s['id_map_lex']:.4f} | {s['id_map_hamming']:.4f} | {s['unique']:.2f} | {s['random_unique']:.2f} | "
                f"{s['collisions']:.3f} | {s['random_collisions']:.3f} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
