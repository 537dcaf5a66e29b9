"""``cbir train``: train any registered method with the one training engine."""

from __future__ import annotations

import argparse
import json


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def add_training_args(p: argparse.ArgumentParser, defaults) -> None:
    """Flags shared by ``cbir train`` and ``cbir demo`` (defaults from a TrainConfig)."""
    from cbir.models.backbones import list_backbones
    from cbir.models.registry import list_methods

    g = p.add_argument_group("model")
    g.add_argument("--method", default=defaults.method, choices=list_methods(), help="hashing method (default: %(default)s)")
    g.add_argument("--backbone", default=defaults.backbone, choices=list_backbones(), help="backbone (default: %(default)s)")
    g.add_argument("--width", type=int, default=None, help="backbone width multiplier where supported (resnet20: base width)")
    g.add_argument("--bits", type=int, default=defaults.bits, help="code length B (DDTL: class bits + depth)")
    g.add_argument("--depth", type=int, default=defaults.depth, help="DDTL path bits d (default 12; more than --param max_tree_depth=12 are split over a forest of trees)")
    g.add_argument("--param", action="append", type=_kv, default=[], metavar="NAME=VALUE",
                   help="method hyper-parameter, repeatable (e.g. --param beta=0.1); see `cbir train --list-methods`")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=defaults.dataset,
                   help="digits (embedded), cifar10-subset, mnist, an image folder, a .csv/.jsonl manifest or a .npz (default: %(default)s)")
    d.add_argument("--data-root", default=defaults.data_root, help="folder holding the named .npz datasets (default: ../shared/datasets or $CBIR_DATASETS)")
    d.add_argument("--image-size", type=int, default=defaults.image_size, help="input size (default: per dataset)")
    d.add_argument("--workers", type=int, default=defaults.num_workers, help="DataLoader worker processes (default: %(default)s)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=defaults.epochs, help="(default: %(default)s)")
    o.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    o.add_argument("--lr", type=float, default=defaults.lr, help="(default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="(default: %(default)s)")
    o.add_argument("--optimizer", default=defaults.optimizer, choices=["adam", "adamw", "sgd"], help="(default: %(default)s)")
    o.add_argument("--scheduler", default=defaults.scheduler, choices=["cosine", "none"], help="(default: %(default)s)")
    o.add_argument("--time-budget", type=float, default=defaults.time_budget_s,
                   help="stop after this many seconds of training; the cosine schedule follows the budget")
    o.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                   help="hold out this fraction of the training set for monitoring (never the query set)")
    o.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    o.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args, **overrides):
    from cbir.engine import TrainConfig

    bk = {"width": args.width} if args.width else {}
    cfg = TrainConfig(
        method=args.method, dataset=args.dataset, data_root=args.data_root, backbone=args.backbone,
        backbone_kwargs=bk, bits=args.bits, depth=args.depth, params=dict(args.param), epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, optimizer=args.optimizer,
        scheduler=args.scheduler, time_budget_s=args.time_budget, image_size=args.image_size,
        val_fraction=args.val_fraction, seed=args.seed, device=args.device, num_workers=args.workers,
        threads=args.threads, progress=not args.no_progress,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _list_methods() -> int:
    import dataclasses

    from cbir.models.registry import list_methods, method_description, method_params_class

    for name in list_methods():
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(method_params_class(name)))
        print(f"{name:10s} {method_description(name)}")
        if fields:
            print(f"{'':10s} params: {fields}")
    return 0


def run(args) -> int:
    if args.list_methods:
        return _list_methods()
    from cbir.engine import train

    cfg = config_from_args(args, out=args.out, resume=args.resume)
    result = train(cfg)
    print(json.dumps({"checkpoint": str(result.checkpoint), "content_hash": result.hasher.content_hash,
                      "layout": result.hasher.layout.to_dict(), "steps": result.config["steps"],
                      "train_wall_s": result.config["train_wall_s"]}, indent=2))
    return 0


def register(sub) -> None:
    from cbir.engine import TrainConfig

    p = sub.add_parser("train", help="train a hashing model", description=__doc__)
    add_training_args(p, TrainConfig())
    p.add_argument("--out", default="runs/model", help="output directory (model.pt, config.json, history.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--list-methods", action="store_true", help="list registered methods and their parameters")
    p.set_defaults(func=run)
