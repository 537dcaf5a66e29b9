"""``cbir demo``: the main job end to end on an embedded default (no download, no server to start).

Trains a DDTL hasher (default: scikit-learn's digits, upscaled; ``--dataset cifar10-subset``
uses the shared CIFAR subset when present), encodes the database and the queries, runs
lexicographic searches and prints mAP@k and the hash-coverage statistics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run(args) -> int:
    from cbir.codes import common_prefix_length, hamming_distance, rank
    from cbir.data import load_dataset
    from cbir.engine import train
    from cbir.evaluate import encode_protocol, retrieval_summary

    from cbir.cli.train_cmd import config_from_args

    t0 = time.perf_counter()
    out = Path(args.out)
    cfg = config_from_args(args, out=str(out / "model"))
    print(f"[1/3] training {cfg.method} ({cfg.backbone}) on {cfg.dataset} for {cfg.epochs} epochs -> {cfg.out}")
    result = train(cfg)
    hasher = result.hasher
    print(f"      layout: {hasher.layout.nbits} bits = {hasher.layout.class_bits} class bits + "
          f"{hasher.layout.depth} path bits; model {hasher.content_hash[:12]}; "
          f"{result.config['train_wall_s']:.0f} s")

    print("[2/3] encoding database and queries")
    splits = load_dataset(cfg.dataset, root=cfg.data_root, image_size=cfg.image_size)
    enc = encode_protocol(hasher, splits, progress=cfg.progress)

    print(f"[3/3] lexicographic search: {len(enc.query_codes)} queries x {len(enc.db_codes)} database codes")
    q = enc.query_codes[0]
    top = rank(q, enc.db_codes, k=5, order="lex", ids=enc.db_index)[0]
    names = splits.class_names
    print(f"      query 0 (class {names[int(enc.query_labels[0])]!s}) code {q.to_hex()[0]}")
    for pos in top:
        print(f"        db id {int(enc.db_index[pos]):5d}  class {names[int(enc.db_labels[pos])]!s:>10}  "
              f"code {enc.db_codes[pos].to_hex()[0]}  prefix {int(common_prefix_length(q, enc.db_codes[pos])[0, 0]):2d}  "
              f"hamming {int(hamming_distance(q, enc.db_codes[pos])[0, 0]):2d}")
    summary = retrieval_summary(enc, k=args.k)
    kk = summary["k"]
    cov = summary["coverage"]
    print()
    print(f"  mAP@{kk} (lexicographic)     {summary[f'map@{kk}_lex']:.4f}")
    print(f"  mAP@{kk} (Hamming)           {summary[f'map@{kk}_hamming']:.4f}")
    print(f"  mAP@all (Hamming)          {summary['map@all_hamming']:.4f}")
    print(f"  unique codes               {cov['unique_codes']} / {cov['n']} ({cov['unique_percent']:.2f} %)")
    print(f"  code entropy               {cov['entropy_bits']:.3f} bits")
    print(f"  average collision count    {cov['average_collision_count']:.3f}")
    print(f"  largest bucket             {cov['largest_bucket']}")
    summary["model"] = str(result.checkpoint)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "demo_report.json").write_text(json.dumps(summary, indent=2))
    print(f"\nreport: {out / 'demo_report.json'}  (total {summary['wall_s']} s)")
    return 0


def register(sub) -> None:
    from cbir.engine import TrainConfig

    from cbir.cli.train_cmd import add_training_args

    p = sub.add_parser("demo", help="train, encode, search and score on an embedded dataset", description=__doc__)
    add_training_args(p, TrainConfig(epochs=15, batch_size=128, lr=2e-3))
    p.add_argument("--k", type=int, default=1000, help="mAP@k cut-off (default: %(default)s)")
    p.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    p.set_defaults(func=run)
