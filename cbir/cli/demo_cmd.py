"""``cbir demo``: the main job end to end on an embedded default (no download, no server to start).

Trains a DDTL hasher (default: scikit-learn's digits, upscaled; ``--dataset cifar10-subset``
uses the shared CIFAR subset when present), encodes the database and the queries, builds the
on-disk LMDB index, starts the gRPC server in-process on a free loopback port, runs
lexicographic searches by image through a real gRPC client (checked against the in-memory
reference ranking), stops the server and prints the tie-aware mAP@k (lexicographic and Hamming),
the id-order mAP@k and the hash coverage beside what uniformly random codes would give.

What it trains by default (under a minute on two CPU cores): DDTL in its two-stage mode
(thesis §3.3.3) on a small backbone (``convnet``, width 16): stage 1 trains backbone + class head
with cross-entropy for ``--epochs``; stage 2 freezes them, caches the training-set features of
the eval view and ``--feature-views`` augmented views, sets the tree by class-wise median splits
(``tree_init=pca``, ``class_bias=true``) and fine-tunes it with the per-class NT-Xent in
class-balanced batches (``--head-steps``). Every training
flag of ``cbir train`` applies (e.g. ``--init-from`` a CE model and ``--epochs 0`` to skip stage 1).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_EPOCHS = 20
DEMO_HEAD_STEPS = 0  # the NT-Xent steps lowered unique codes on the held-out selection (bench_ddtl)
#: DDTL defaults of the demo (any --param overrides them): the two-stage mode with the tree
#: initialised by class-wise median splits (cbir.models.heads.fit_pca_median_tree)
DEMO_DDTL_PARAMS = {"two_stage": True, "tree_init": "pca", "class_bias": True, "tau": 0.2}


def run(args) -> int:
    import io
    import sys

    from cbir.cli.train_cmd import config_from_args
    from cbir.codes import rank
    from cbir.data import load_dataset
    from cbir.engine import train
    from cbir.evaluate import encode_protocol, format_summary, retrieval_summary
    from cbir.indexer import build_index
    from cbir.server import serve_in_process
    from cbir.server.convert import pb_to_codes
    from cbir.v1 import search_pb2 as pb

    t0 = time.perf_counter()
    out = Path(args.out)
    cfg = config_from_args(args, out=str(out / "model"))
    if cfg.method == "ddtl":
        for key, value in DEMO_DDTL_PARAMS.items():
            cfg.params.setdefault(key, value)
    print(f"[1/5] training {cfg.method} ({_describe(cfg)}) on {cfg.dataset} -> {cfg.out}")
    result = train(cfg)
    hasher = result.hasher
    rc = result.config
    print(
        f"      {rc['steps']} image-stage steps ({rc['batches']['sampler']} batches), {rc['head_steps']} head steps on "
        f"cached features{' (' + ', '.join(rc['head_stage']) + ')' if rc['head_stage'] else ''}; "
        f"{rc['dataset']['train']} training images; {rc['train_wall_s']:.0f} s"
    )
    print(
        f"      layout: {hasher.layout.nbits} bits = {hasher.layout.class_bits} class bits + "
        f"{hasher.layout.depth} path bits; model {hasher.content_hash[:12]}"
    )

    print("[2/5] encoding database and queries")
    splits = load_dataset(cfg.dataset, root=cfg.data_root, image_size=cfg.image_size)
    enc = encode_protocol(hasher, splits, progress=cfg.progress)

    names = splits.class_names
    index_dir = out / "index"
    print(f"[3/5] building the on-disk index -> {index_dir}")
    meta = [
        {
            "label": names[int(lbl)] if not splits.multilabel else None,
            "dataset": splits.name,
            "source": (splits.database.paths[i] if splits.database.paths else f"{splits.name}:{int(i)}"),
        }
        for i, lbl in zip(enc.db_index, enc.db_labels)
    ]
    build_index(
        index_dir,
        enc.db_index,
        enc.db_codes,
        meta=meta,
        conf=enc.db_conf,
        layout=hasher.layout,
        model_hash=hasher.content_hash,
        build_params={"source": "cbir demo", "dataset": splits.name},
        progress=cfg.progress,
    )

    n_check = min(args.grpc_queries, len(enc.query_codes))
    print(f"[4/5] gRPC server on loopback: {n_check} lexicographic searches by image")
    mismatches = 0
    with serve_in_process(index_dir, hasher) as (address, stub):
        print(f"      serving on {address}")
        for qi in range(n_check):
            png = io.BytesIO()
            splits.query.get_pil(int(enc.query_index[qi])).save(png, format="PNG")
            resp = stub.Search(
                pb.SearchRequest(
                    image=png.getvalue(), k=5, mode=pb.LEXICOGRAPHIC, return_codes=True, return_metadata=True
                )
            )
            expect = enc.db_index[rank(enc.query_codes[qi], enc.db_codes, k=5, order="lex", ids=enc.db_index)[0]]
            got = [h.id for h in resp.hits]
            mismatches += got != expect.tolist()
            if qi == 0:
                qcode = pb_to_codes(resp.query_code, hasher.nbits)
                print(f"      query 0 (class {names[int(enc.query_labels[0])]!s}) code {qcode.to_hex()[0]}")
                for h in resp.hits:
                    hit_code = pb_to_codes(h.code, hasher.nbits)
                    print(
                        f"        id {h.id:5d}  class {h.metadata['label']!s:>10}  code {hit_code.to_hex()[0]}  "
                        f"prefix {h.common_prefix_length:2d}  hamming {h.hamming_distance:2d}"
                    )
    print(f"      gRPC results equal the in-memory reference ranking for {n_check - mismatches}/{n_check} queries")
    if mismatches:
        print("      error: the server's ranking differs from the reference", file=sys.stderr)
        return 1

    print(f"[5/5] scoring {len(enc.query_codes)} queries x {len(enc.db_codes)} database codes")
    summary = retrieval_summary(enc, k=args.k, fixed_bits=hasher.layout.class_bits if hasher.layout.depth else 0)
    print()
    print("\n".join(format_summary(summary)))
    summary["trained"] = _describe(cfg)
    summary["train"] = {k: rc[k] for k in ("steps", "head_steps", "batches", "head_stage", "init", "train_wall_s")}
    summary["model"] = str(result.checkpoint)
    summary["index"] = str(index_dir)
    summary["grpc_queries_checked"] = n_check
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "demo_report.json").write_text(json.dumps(summary, indent=2))
    print(f"\nreport: {out / 'demo_report.json'}  (total {summary['wall_s']} s)")
    return 0


def _describe(cfg) -> str:
    width = cfg.backbone_kwargs.get("width")
    parts = [f"{cfg.backbone}{f' width {width}' if width else ''}"]
    if cfg.init_from:
        parts.append(f"warm start {cfg.init_from}")
    if cfg.params.get("two_stage"):
        steps = (
            f"{cfg.head_steps} per-class NT-Xent steps on {cfg.feature_views} augmented views"
            if cfg.head_steps
            else "no NT-Xent steps"
        )
        init = "class-wise median splits, then " if cfg.params.get("tree_init") == "pca" else ""
        parts.append(f"two-stage: CE {cfg.epochs} epochs, then the tree on cached features ({init}{steps})")
    elif cfg.freeze_backbone:
        parts.append(f"frozen backbone, head fitted on cached features ({cfg.head_steps} steps)")
    else:
        parts.append(f"{cfg.epochs} epochs end to end")
    return ", ".join(parts)


def register(sub) -> None:
    from cbir.cli.train_cmd import add_training_args
    from cbir.engine import TrainConfig

    p = sub.add_parser("demo", help="train, encode, search and score on an embedded dataset", description=__doc__)
    # One torch thread: on a shared 2-core machine two threads ran a convnet step 20x slower (0.70 s
    # vs 0.03 s) under load; digits are 8x8 images, so 16x16 inputs lose nothing.
    add_training_args(
        p,
        TrainConfig(
            backbone="convnet",
            backbone_kwargs={"width": 16},
            epochs=DEMO_EPOCHS,
            batch_size=128,
            lr=2e-3,
            head_steps=DEMO_HEAD_STEPS,
            threads=1,
            image_size=16,
            aug_strength=0.0,
        ),
    )
    p.add_argument("--k", type=int, default=1000, help="mAP@k cut-off (default: %(default)s)")
    p.add_argument(
        "--grpc-queries",
        type=int,
        default=20,
        help="queries sent as images through the in-process gRPC server (default: %(default)s)",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    p.set_defaults(func=run)
