"""``cbir demo``: the main job end to end on an embedded default (no download, no server to start).

Trains a DDTL hasher (default: scikit-learn's digits, upscaled; ``--dataset cifar10-subset``
uses the shared CIFAR subset when present), encodes the database and the queries, builds the
on-disk LMDB index, starts the gRPC server in-process on a free loopback port, runs
lexicographic searches by image through a real gRPC client (checked against the in-memory
reference ranking), stops the server and prints mAP@k and the hash-coverage statistics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def run(args) -> int:
    import io
    import sys

    from cbir.codes import rank
    from cbir.indexer import build_index
    from cbir.server import serve_in_process
    from cbir.server.convert import pb_to_codes
    from cbir.v1 import search_pb2 as pb
    from cbir.data import load_dataset
    from cbir.engine import train
    from cbir.evaluate import encode_protocol, retrieval_summary

    from cbir.cli.train_cmd import config_from_args

    t0 = time.perf_counter()
    out = Path(args.out)
    cfg = config_from_args(args, out=str(out / "model"))
    print(f"[1/5] training {cfg.method} ({cfg.backbone}) on {cfg.dataset} for {cfg.epochs} epochs -> {cfg.out}")
    result = train(cfg)
    hasher = result.hasher
    print(f"      layout: {hasher.layout.nbits} bits = {hasher.layout.class_bits} class bits + "
          f"{hasher.layout.depth} path bits; model {hasher.content_hash[:12]}; "
          f"{result.config['train_wall_s']:.0f} s")

    print("[2/5] encoding database and queries")
    splits = load_dataset(cfg.dataset, root=cfg.data_root, image_size=cfg.image_size)
    enc = encode_protocol(hasher, splits, progress=cfg.progress)

    names = splits.class_names
    index_dir = out / "index"
    print(f"[3/5] building the on-disk index -> {index_dir}")
    meta = [{"label": names[int(lbl)] if not splits.multilabel else None, "dataset": splits.name,
             "source": (splits.database.paths[i] if splits.database.paths else f"{splits.name}:{int(i)}")}
            for i, lbl in zip(enc.db_index, enc.db_labels)]
    build_index(index_dir, enc.db_index, enc.db_codes, meta=meta, conf=enc.db_conf, layout=hasher.layout,
                model_hash=hasher.content_hash, build_params={"source": "cbir demo", "dataset": splits.name},
                progress=cfg.progress)

    n_check = min(args.grpc_queries, len(enc.query_codes))
    print(f"[4/5] gRPC server on loopback: {n_check} lexicographic searches by image")
    mismatches = 0
    with serve_in_process(index_dir, hasher) as (address, stub):
        print(f"      serving on {address}")
        for qi in range(n_check):
            png = io.BytesIO()
            splits.query.get_pil(int(enc.query_index[qi])).save(png, format="PNG")
            resp = stub.Search(pb.SearchRequest(image=png.getvalue(), k=5, mode=pb.LEXICOGRAPHIC,
                                                return_codes=True, return_metadata=True))
            expect = enc.db_index[rank(enc.query_codes[qi], enc.db_codes, k=5, order="lex", ids=enc.db_index)[0]]
            got = [h.id for h in resp.hits]
            mismatches += got != expect.tolist()
            if qi == 0:
                qcode = pb_to_codes(resp.query_code, hasher.nbits)
                print(f"      query 0 (class {names[int(enc.query_labels[0])]!s}) code {qcode.to_hex()[0]}")
                for h in resp.hits:
                    hit_code = pb_to_codes(h.code, hasher.nbits)
                    print(f"        id {h.id:5d}  class {h.metadata['label']!s:>10}  code {hit_code.to_hex()[0]}  "
                          f"prefix {h.common_prefix_length:2d}  hamming {h.hamming_distance:2d}")
    print(f"      gRPC results equal the in-memory reference ranking for {n_check - mismatches}/{n_check} queries")
    if mismatches:
        print("      error: the server's ranking differs from the reference", file=sys.stderr)
        return 1

    print(f"[5/5] scoring {len(enc.query_codes)} queries x {len(enc.db_codes)} database codes")
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
    summary["index"] = str(index_dir)
    summary["grpc_queries_checked"] = n_check
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
    p.add_argument("--grpc-queries", type=int, default=20,
                   help="queries sent as images through the in-process gRPC server (default: %(default)s)")
    p.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    p.set_defaults(func=run)
