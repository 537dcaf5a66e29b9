#!/usr/bin/env python
"""Method benchmark (issue 3): every hasher on the shared CIFAR-10 subset protocol.

Protocol: ``load_dataset("cifar10-subset")`` — 4,660 training images, which are also the
database, and 846 queries (relevance = same class); see ``../shared/datasets/README.md``.
Every (method, bits) run trains through the one engine (``cbir.engine.train``) for at most
``--epochs`` epochs *and* at most ``--time-budget`` seconds of wall time
(``TrainConfig.time_budget_s``: the cosine schedule follows whichever ends first; the
post-training fit in ``finalize`` — CrPCA/ITQ/LSH projections, DMUH bit order — comes on top),
then encodes the query and database sets and reports mAP@1000 in lexicographic and Hamming
order, mAP over the whole database (Hamming order), and the database coverage (entropy of the
code distribution, unique-code percentage, average collision count = sum_c n_c^2 / N - 1).

A method is given as ``name`` or ``name:key=value,key=value`` (hyper-parameters, as
``cbir train --param``), e.g. ``hegh:gamma=0``. ``ce`` has a fixed code length (class bits
only) and is run once whatever ``--bits`` says. Results go to ``<out>/results.json`` and
``<out>/results.md`` (rewritten after every run, so an interrupted grid keeps what finished),
with the issue's target comparisons checked at the end of the markdown.

Full grid (slow: 9 methods x 4 bit lengths x the budget; run on an otherwise idle machine)::

    python benchmarks/bench_methods.py --time-budget 300

Quick check::

    python benchmarks/bench_methods.py --methods dmuh regu --bits 12 --time-budget 20

Re-measure some rows of an existing table (e.g. after a disturbed run) with ``--merge``.
"""

from __future__ import annotations

import argparse
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


def run_one(label: str, name: str, params: dict, bits: int | None, splits, args) -> dict:
    from cbir.engine import TrainConfig, train
    from cbir.evaluate import encode_protocol, retrieval_summary

    safe = label.replace(":", "_").replace("=", "").replace(",", "_")
    cfg = TrainConfig(method=name, dataset="cifar10-subset", backbone=args.backbone, bits=bits, params=dict(params),
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, time_budget_s=args.time_budget,
                      seed=args.seed, threads=args.threads, out=str(Path(args.out) / "runs" / f"{safe}-{bits}"),
                      progress=args.progress)
    t0 = time.perf_counter()
    res = train(cfg)
    train_s = time.perf_counter() - t0
    enc = encode_protocol(res.hasher, splits, progress=False)
    summ = retrieval_summary(enc, k=args.k)
    k = summ["k"]
    cov = summ["coverage"]
    return {
        "method": label, "name": name, "params": params, "bits": res.hasher.layout.nbits,
        "requested_bits": bits, "steps": res.config["steps"], "epochs_run": len(res.history),
        "time_budget_hit": res.config["time_budget_hit"], "train_wall_s": round(train_s, 1),
        "encode_s": round(enc.encode_s, 1),
        f"map@{k}_lex": summ[f"map@{k}_lex"], f"map@{k}_hamming": summ[f"map@{k}_hamming"],
        "map@all_hamming": summ["map@all_hamming"],
        "entropy_bits": cov["entropy_bits"], "unique_percent": cov["unique_percent"],
        "average_collision_count": cov["average_collision_count"], "largest_bucket": cov["largest_bucket"],
        "checkpoint": str(res.checkpoint), "content_hash": res.hasher.content_hash,
        "final_loss": res.history[-1]["loss"] if res.history else None,
        # CrPCA: only the tree bits carry information (bits past max_depth are constant 0)
        "informative_bits": (res.hasher.method.tree.depth if name == "crpca" else res.hasher.layout.nbits),
    }


def _find(rows, method, bits):
    for r in rows:
        if r["method"] == method and r["bits"] == bits:
            return r
    return None


def target_checks(rows: list[dict], k: int) -> list[str]:
    key = f"map@{k}_hamming"
    out = []
    for better, worse, what in (("dmuh", "regu", "DMUH > Regu"), ("hegh", "hegh:gamma=0", "HEGH gamma=1 > gamma=0")):
        for bits in sorted({r["bits"] for r in rows}):
            a, b = _find(rows, better, bits), _find(rows, worse, bits)
            if a and b:
                ok = a[key] > b[key]
                out.append(f"- {what} at {bits} bits ({key}): {a[key]:.4f} vs {b[key]:.4f} -> "
                           f"{'holds' if ok else 'DOES NOT HOLD'}")
    for bits in sorted({r["bits"] for r in rows}):
        here = [r for r in rows if r["bits"] == bits]
        d = _find(here, "ddtl", bits)
        if d and len(here) > 1:
            best = max(here, key=lambda r: (r["unique_percent"], -r["average_collision_count"]))
            ok = best["method"] == "ddtl"
            out.append(f"- DDTL best coverage at {bits} bits: DDTL unique {d['unique_percent']:.2f}% / collisions "
                       f"{d['average_collision_count']:.2f}; best {best['method']} {best['unique_percent']:.2f}% / "
                       f"{best['average_collision_count']:.2f} -> {'holds' if ok else 'DOES NOT HOLD'}")
    return out


def write_reports(rows: list[dict], meta: dict, out: Path, k: int) -> None:
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [
        "# Method benchmark: cifar10-subset (846 queries vs 4,660 database)", "",
        f"Backbone `{meta['backbone']}`, batch {meta['batch_size']}, lr {meta['lr']}, at most {meta['epochs']} epochs "
        f"and {meta['time_budget_s']} s training wall time per run (cosine schedule over the budget), seed "
        f"{meta['seed']}, {meta['torch_threads']} torch threads on {meta['machine']}. `train s` is the wall time of "
        "`cbir.engine.train` (data loading, training up to the budget, and the post-hoc `finalize` fit); `steps` "
        "the optimiser steps it fitted in. CrPCA codes carry at most `max_depth` (12) informative bits; "
        "longer CrPCA codes are padded with constant bits.", "",
        f"| method | bits | steps | train s | mAP@{k} lex | mAP@{k} Hamming | mAP@all | entropy (bits) | unique % "
        "| avg collisions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits']} | {r['steps']} | {r['train_wall_s']:.0f} | {r[f'map@{k}_lex']:.4f} "
                     f"| {r[f'map@{k}_hamming']:.4f} | {r['map@all_hamming']:.4f} | {r['entropy_bits']:.2f} "
                     f"| {r['unique_percent']:.2f} | {r['average_collision_count']:.2f} |")
    checks = target_checks(rows, k)
    if checks:
        lines += ["", "## Targets (issue 3)", "", *checks]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="name or name:key=value,... (default: all)")
    ap.add_argument("--bits", nargs="+", type=int, default=DEFAULT_BITS)
    ap.add_argument("--time-budget", type=float, default=300.0, help="training wall-time budget per run, seconds")
    ap.add_argument("--epochs", type=int, default=50, help="epoch cap per run (the time budget usually ends first)")
    ap.add_argument("--backbone", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default="benchmarks/results/methods")
    ap.add_argument("--progress", action="store_true", help="show training progress bars")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in <out>/results.json, replacing those this run re-measures")
    args = ap.parse_args(argv)

    from cbir.data import load_dataset, shared_datasets_dir

    shared = shared_datasets_dir()
    if shared is None or not (shared / "cifar10-subset.npz").is_file():
        print("SKIP: ../shared/datasets/cifar10-subset.npz not found (set CBIR_DATASETS); nothing to benchmark.")
        return 0
    methods = [(m, *parse_method(m)) for m in args.methods]
    from cbir.models.registry import list_methods, resolve_params

    for label, name, params in methods:
        if name not in list_methods():
            raise SystemExit(f"unknown method {name!r}; choose from {list_methods()}")
        resolve_params(name, params)  # fail fast on bad hyper-parameters
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_dataset("cifar10-subset")
    meta = {"dataset": "cifar10-subset", "queries": len(splits.query), "database": len(splits.database),
            "backbone": args.backbone, "batch_size": args.batch_size, "lr": args.lr, "epochs": args.epochs,
            "time_budget_s": args.time_budget, "seed": args.seed, "k": args.k,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "argv": sys.argv[1:]}
    rows: list[dict] = []
    if args.merge and (out / "results.json").is_file():
        rows = json.loads((out / "results.json").read_text())["results"]
    for label, name, params in methods:
        for bits in ([None] if name == "ce" else args.bits):
            print(f"[bench] {label} bits={bits} ...", flush=True)
            row = run_one(label, name, params, bits, splits, args)
            same = [i for i, r in enumerate(rows) if (r["method"], r["requested_bits"]) == (label, bits)]
            if same:
                rows[same[0]] = row  # re-measured: keep its place in the table
            else:
                rows.append(row)
            kk = min(args.k, len(splits.database))
            print(f"[bench] {label} {row['bits']} bits: mAP@{kk} lex {row[f'map@{kk}_lex']:.4f} hamming "
                  f"{row[f'map@{kk}_hamming']:.4f}, unique {row['unique_percent']:.2f}%, collisions "
                  f"{row['average_collision_count']:.2f} ({row['steps']} steps, {row['train_wall_s']} s)", flush=True)
            write_reports(rows, meta, out, kk)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
