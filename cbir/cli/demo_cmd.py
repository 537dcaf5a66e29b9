"""``cbir demo``: the main job end to end on an embedded default (no download, no server to start).

Trains a DDTL hasher (default: scikit-learn's digits, upscaled; ``--dataset cifar10-subset``
uses the shared CIFAR subset when present), encodes the database and the queries, builds the
on-disk LMDB index, starts the gRPC server in-process on a free loopback port, runs
lexicographic searches by image through ``cbir.client.CbirClient`` (checked against the in-memory
reference ranking), shows one example query (the one with the median AP@k, with the class of the
query and of each hit), stops the server and prints the tie-aware mAP@k (lexicographic and
Hamming), the id-order mAP@k and the hash coverage beside what uniformly random codes would give.
Log lines (training, the server's per-RPC lines) go to ``<out>/demo.log``; the terminal shows
warnings only (``cbir -v demo``: everything).

Under ``torchrun`` (e.g. ``torchrun --standalone --nproc-per-node 2 -m cbir.cli demo --param
two_stage=false``; only the image stage is distributed) every rank trains and rank 0 alone
encodes, serves, searches and prints; the other ranks return after training.

What it trains by default (under a minute on two CPU cores): DDTL in its two-stage mode
(thesis §3.3.3) on a small backbone (``convnet``, width 16): stage 1 trains backbone + class head
with cross-entropy for ``--epochs``; stage 2 freezes them, caches the training-set features of
the eval view and ``--feature-views`` augmented views, sets the tree by class-wise median splits
(``tree_init=pca``, ``class_bias=true``) and fine-tunes it with the per-class NT-Xent in
class-balanced batches (``--head-steps``). Every training
flag of ``cbir train`` applies (e.g. ``--init-from`` a CE model and ``--epochs 0`` to skip stage 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

DEMO_EPOCHS = 20
DEMO_HEAD_STEPS = 0  # the NT-Xent steps lowered unique codes on the held-out selection (bench_ddtl)
#: DDTL defaults of the demo (any --param overrides them): the two-stage mode with the tree
#: initialised by class-wise median splits (cbir.models.heads.fit_pca_median_tree)
DEMO_DDTL_PARAMS = {"two_stage": True, "tree_init": "pca", "class_bias": True, "tau": 0.2}


def run(args) -> int:
    from cbir.cli.train_cmd import config_from_args
    from cbir.distributed import ddp

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    denv = ddp.detect()
    main = denv is None or denv.is_main
    # only rank 0 of a torchrun start prints, serves and searches; it keeps its own log file
    log_path = out / ("demo.log" if main else f"demo.rank{denv.rank}.log")
    with _logs_to_file(log_path, verbose=getattr(args, "verbose", 0)):
        cfg = config_from_args(args, out=str(out / "model"))
        if cfg.method == "ddtl":
            for key, value in DEMO_DDTL_PARAMS.items():
                cfg.params.setdefault(key, value)
        return _run(args, cfg, out, log_path, main)


def _run(args, cfg, out: Path, log_path: Path, main: bool) -> int:
    from cbir.client import CbirError
    from cbir.engine import train
    from cbir.evaluate import encode_protocol, format_summary, retrieval_summary
    from cbir.indexer import build_index

    t0 = time.perf_counter()
    if main:
        print(f"[1/5] training {cfg.method} ({_describe(cfg)}) on {cfg.dataset} -> {cfg.out}")
        print(f"      log (training and per-RPC server lines): {log_path}")
    result = train(cfg)
    if not main:  # a torchrun rank other than 0: it took part in training; rank 0 does the rest
        return 0
    hasher = result.hasher
    rc = result.config
    dist = f" on {rc['distributed']['world_size']} processes" if rc.get("distributed") else ""
    print(
        f"      {rc['steps']} image-stage steps ({rc['batches']['sampler']} batches{dist}), {rc['head_steps']} head "
        f"steps on cached features{' (' + ', '.join(rc['head_stage']) + ')' if rc['head_stage'] else ''}; "
        f"{rc['dataset']['train']} training images; {rc['train_wall_s']:.0f} s"
    )
    print(
        f"      layout: {hasher.layout.nbits} bits = {hasher.layout.class_bits} class bits + "
        f"{hasher.layout.depth} path bits; model {hasher.content_hash[:12]}"
    )

    print("[2/5] encoding database and queries")
    from cbir.data import load_dataset

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

    kk = min(args.k, len(enc.db_codes))
    example = _median_ap_query(enc, kk)
    n_check = min(args.grpc_queries, len(enc.query_codes))
    print(f"[4/5] gRPC server on loopback: {n_check} lexicographic searches by image (cbir.client)")
    try:
        mismatches, shown = _grpc_searches(index_dir, hasher, splits, enc, n_check, example)
    except CbirError as exc:  # the typed client error: name the call that failed
        print(f"cbir demo: error: the in-process server answered {exc}", file=sys.stderr)
        return 1
    print(f"      gRPC results equal the in-memory reference ranking for {n_check - mismatches}/{n_check} queries")
    if mismatches:
        print("      error: the server's ranking differs from the reference", file=sys.stderr)
        return 1
    _print_example(example, shown, enc, names, splits.multilabel, kk)

    print(f"[5/5] scoring {len(enc.query_codes)} queries x {len(enc.db_codes)} database codes")
    summary = retrieval_summary(enc, k=args.k, fixed_bits=hasher.layout.class_bits if hasher.layout.depth else 0)
    print()
    print("\n".join(format_summary(summary)))
    summary["trained"] = _describe(cfg)
    summary["train"] = {k: rc[k] for k in ("steps", "head_steps", "batches", "head_stage", "init", "train_wall_s")}
    if rc.get("distributed"):
        summary["train"]["distributed"] = rc["distributed"]
    summary["model"] = str(result.checkpoint)
    summary["index"] = str(index_dir)
    summary["log"] = str(log_path)
    summary["grpc_queries_checked"] = n_check
    summary["example"] = {
        "rule": example["rule"],
        "query": example["position"],
        "query_class": _label_text(enc.query_labels[example["position"]], names, splits.multilabel),
        f"ap@{kk}_lex": example["ap"],
        "hits": [
            {"id": int(i), "class": _label_text(lbl, names, splits.multilabel), "same_class": bool(same)}
            for i, lbl, same in zip(shown["ids"], shown["labels"], shown["same"])
        ],
    }
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "demo_report.json").write_text(json.dumps(summary, indent=2))
    print(f"\nreport: {out / 'demo_report.json'}  (total {summary['wall_s']} s)")
    return 0


EXAMPLE_HITS = 5


def _median_ap_query(enc, k: int) -> dict:
    """The example query: the one whose lexicographic AP@k (the server's order: ties by id) is the
    median over all queries (the lower median; ties by query position), so the example shows a
    typical query rather than whichever came first."""
    import numpy as np

    from cbir.metrics import average_precisions

    aps = average_precisions(
        enc.query_codes, enc.query_labels, enc.db_codes, enc.db_labels, k, order="lex", db_ids=enc.db_index
    )
    order = np.lexsort((np.arange(len(aps)), aps))
    pos = int(order[(len(aps) - 1) // 2])
    return {
        "position": pos,
        "ap": float(aps[pos]),
        "map": float(aps.mean()),
        "n": len(aps),
        "rule": f"the query with the median lexicographic AP@{k} (ties by database id) of all {len(aps)} queries",
    }


def _png(splits, index: int) -> bytes:
    import io

    png = io.BytesIO()
    splits.query.get_pil(int(index)).save(png, format="PNG")
    return png.getvalue()


def _grpc_searches(index_dir, hasher, splits, enc, n_check: int, example: dict):
    """``n_check`` searches by image through :class:`cbir.client.CbirClient`, each checked against
    the in-memory reference ranking, and the example query's top hits (with codes and metadata)."""
    import numpy as np

    from cbir.client import CbirClient
    from cbir.codes import rank
    from cbir.server import serve_in_process

    mismatches = 0
    shown = None
    with serve_in_process(index_dir, hasher) as (address, _stub), CbirClient(address) as client:
        print(f"      serving on {address}")
        for qi in sorted(set(range(n_check)) | {example["position"]}):
            res = client.search(
                image=_png(splits, enc.query_index[qi]),
                k=EXAMPLE_HITS,
                mode="lex",
                return_codes=qi == example["position"],
                return_metadata=qi == example["position"],
            )
            expect = enc.db_index[
                rank(enc.query_codes[qi], enc.db_codes, k=EXAMPLE_HITS, order="lex", ids=enc.db_index)[0]
            ]
            if qi < n_check:
                mismatches += res.ids.tolist() != expect.tolist()
            if qi == example["position"]:
                pos = {int(i): j for j, i in enumerate(enc.db_index)}
                labels = [enc.db_labels[pos[int(i)]] for i in res.ids]
                ql = enc.query_labels[qi]
                same = [bool(np.any(np.logical_and(ql, lbl))) if np.ndim(ql) else lbl == ql for lbl in labels]
                shown = {"result": res, "ids": res.ids, "labels": labels, "same": same}
    return mismatches, shown


def _label_text(label, names, multilabel: bool) -> str:
    import numpy as np

    if multilabel:
        on = [names[j] for j in np.flatnonzero(np.asarray(label))]
        return "+".join(on) if on else "(none)"
    return str(names[int(label)])


def _print_example(example: dict, shown: dict, enc, names, multilabel: bool, k: int) -> None:
    res, qi = shown["result"], example["position"]
    qclass = _label_text(enc.query_labels[qi], names, multilabel)
    print(f"      example: {example['rule']}")
    print(
        f"      query {qi} (class {qclass}) code {res.query_code.to_hex()[0]}: AP@{k} {example['ap']:.4f} "
        f"(mAP@{k} {example['map']:.4f}); {sum(shown['same'])}/{len(shown['same'])} of its top {len(shown['same'])} "
        "hits share its class"
    )
    for j, (i, lbl, same) in enumerate(zip(shown["ids"], shown["labels"], shown["same"])):
        print(
            f"        id {int(i):5d}  class {_label_text(lbl, names, multilabel):>10}  "
            f"{'same class ' if same else 'OTHER class'}  code {res.codes.to_hex()[j]}  "
            f"prefix {int(res.prefix[j]):2d}  hamming {int(res.hamming[j]):2d}"
        )


@contextlib.contextmanager
def _logs_to_file(path: Path, verbose: int = 0):
    """Send log records (training, the in-process server's per-RPC lines) to ``path``; the terminal
    keeps warnings and errors only (everything with ``cbir -v demo``)."""
    root = logging.getLogger()
    fh = logging.FileHandler(path, mode="w", encoding="utf-8")
    fh.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    terminal = [
        (h, h.level)
        for h in root.handlers
        if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stderr, sys.stdout)
    ]
    prev_level = root.level
    if not verbose:
        for h, level in terminal:
            h.setLevel(max(level, logging.WARNING))
    root.addHandler(fh)
    if root.level > fh.level or root.level == logging.NOTSET:
        root.setLevel(fh.level)
    try:
        yield
    finally:
        root.removeHandler(fh)
        fh.close()
        root.setLevel(prev_level)
        for h, level in terminal:
            h.setLevel(level)


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
    p.add_argument("-k", "--k", type=_at_least(1), default=1000, help="mAP@k cut-off, >= 1 (default: %(default)s)")
    p.add_argument(
        "--grpc-queries",
        type=_at_least(0),
        default=20,
        help="queries sent as images through the in-process gRPC server (default: %(default)s)",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    p.set_defaults(func=run)


def _at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse
