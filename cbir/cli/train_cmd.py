"""``cbir train``: train any registered method with the one training engine.

Data-parallel on several processes / GPUs: start it with torchrun, e.g.
``torchrun --nproc-per-node 2 -m cbir.cli train --method ddtl ... --out runs/ddp`` (gloo on CPU,
nccl on CUDA, one GPU per process). Every process draws the same global batch as a 1-process
run; each trains on its part, DDTL's contrastive term is computed over the global batch, and
rank 0 writes the outputs. --freeze-backbone and DDTL two_stage runs are single-process only.

Ensembles ("Looking for controversy", 2022): ``--ensemble E --perturb seed|bootstrap|arch``
trains E members one after another (each a normal run in OUT/member-<i>) and writes one
ensemble checkpoint OUT/model.pt that every cbir command loads like a model. With
--freeze-backbone and --init-from the members are heads on one shared backbone, which the
ensemble then runs once per batch."""

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
    g.add_argument(
        "--method", default=defaults.method, choices=list_methods(), help="hashing method (default: %(default)s)"
    )
    g.add_argument(
        "--backbone", default=defaults.backbone, choices=list_backbones(), help="backbone (default: %(default)s)"
    )
    g.add_argument(
        "--width",
        type=int,
        default=defaults.backbone_kwargs.get("width"),
        help="backbone width where supported (resnet20: base width 16; convnet: 32; default: %(default)s)",
    )
    g.add_argument("--bits", type=int, default=defaults.bits, help="code length B (DDTL: class bits + depth)")
    g.add_argument(
        "--depth",
        type=int,
        default=defaults.depth,
        help="DDTL path bits d (default 12; more than --param max_tree_depth=12 are split over a forest of trees)",
    )
    g.add_argument(
        "--param",
        action="append",
        type=_kv,
        default=[],
        metavar="NAME=VALUE",
        help="method hyper-parameter, repeatable (e.g. --param beta=0.1); see `cbir train --list-methods`",
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        default=defaults.dataset,
        help="digits (embedded), cifar10-subset, mnist, an image folder, a .csv/.jsonl manifest or a .npz (default: %(default)s)",
    )
    d.add_argument(
        "--data-root",
        default=defaults.data_root,
        help="folder holding the named .npz datasets (default: ../shared/datasets or $CBIR_DATASETS)",
    )
    d.add_argument("--image-size", type=int, default=defaults.image_size, help="input size (default: per dataset)")
    d.add_argument(
        "--workers", type=int, default=defaults.num_workers, help="DataLoader worker processes (default: %(default)s)"
    )
    d.add_argument(
        "--aug-strength",
        type=float,
        default=defaults.aug_strength,
        help="colour-jitter / greyscale strength of the training augmentation, 0 = crops and flips only (default: %(default)s)",
    )
    b = p.add_argument_group("batches")
    b.add_argument(
        "--sampler",
        default=defaults.sampler,
        choices=["auto", "balanced", "random"],
        help="auto: class-balanced P x K batches for DDTL (per-class contrastive loss), shuffled otherwise (default: %(default)s)",
    )
    b.add_argument(
        "--classes-per-batch",
        type=int,
        default=defaults.classes_per_batch,
        metavar="P",
        help="classes per balanced batch (default: batch size // K, at most the number of classes)",
    )
    b.add_argument(
        "--images-per-class",
        type=int,
        default=defaults.images_per_class,
        metavar="K",
        help="images per class in a balanced batch (default: 32)",
    )
    w = p.add_argument_group("warm start and frozen features")
    w.add_argument(
        "--init-from",
        default=defaults.init_from,
        metavar="SOURCE",
        help="backbone weights: a cbir model.pt (or run dir; also its class head and normalisation), a state_dict "
        "file, or a torchvision weights name already in the local torch hub cache (never downloaded)",
    )
    w.add_argument(
        "--input-norm",
        default=defaults.input_norm,
        metavar="NORM",
        help="normalisation the --init-from weights expect: cbir (default), imagenet or 'm1,m2,m3/s1,s2,s3'",
    )
    w.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="no backbone training: cache its features once and fit the head on them (seconds)",
    )
    w.add_argument(
        "--head-steps",
        type=int,
        default=defaults.head_steps,
        help="optimiser steps of the head stage on cached features (default: %(default)s)",
    )
    w.add_argument(
        "--head-lr", type=float, default=defaults.head_lr, help="head-stage learning rate (default: %(default)s)"
    )
    w.add_argument(
        "--head-classes-per-batch",
        type=int,
        default=defaults.head_classes_per_batch,
        metavar="P",
        help="classes per head-stage batch (default: all, at most 16)",
    )
    w.add_argument(
        "--head-images-per-class",
        type=int,
        default=defaults.head_images_per_class,
        metavar="K",
        help="images per class per head-stage batch (default: %(default)s)",
    )
    w.add_argument(
        "--feature-views",
        type=int,
        default=defaults.feature_views,
        help="augmented views cached per image for the head stage (default: %(default)s)",
    )
    w.add_argument(
        "--feature-aug-strength",
        type=float,
        default=defaults.feature_aug_strength,
        help="augmentation strength of the cached views (default: --aug-strength)",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=defaults.epochs, help="(default: %(default)s)")
    o.add_argument(
        "--max-steps",
        type=int,
        default=defaults.max_steps,
        help="stop after this many optimiser steps (an equal-steps budget; the cosine schedule follows it)",
    )
    o.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    o.add_argument("--lr", type=float, default=defaults.lr, help="(default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="(default: %(default)s)")
    o.add_argument(
        "--optimizer", default=defaults.optimizer, choices=["adam", "adamw", "sgd"], help="(default: %(default)s)"
    )
    o.add_argument("--scheduler", default=defaults.scheduler, choices=["cosine", "none"], help="(default: %(default)s)")
    o.add_argument(
        "--time-budget",
        type=float,
        default=defaults.time_budget_s,
        help="stop after this many seconds of training; the cosine schedule follows the budget",
    )
    o.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="hold out this fraction of the training set for monitoring (never the query set)",
    )
    o.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    o.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    o.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (default: torch's choice)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args, **overrides):
    from cbir.engine import TrainConfig

    bk = {"width": args.width} if args.width else {}
    cfg = TrainConfig(
        method=args.method,
        dataset=args.dataset,
        data_root=args.data_root,
        backbone=args.backbone,
        backbone_kwargs=bk,
        bits=args.bits,
        depth=args.depth,
        params=dict(args.param),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        scheduler=args.scheduler,
        time_budget_s=args.time_budget,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        device=args.device,
        num_workers=args.workers,
        threads=args.threads,
        progress=not args.no_progress,
        aug_strength=args.aug_strength,
        sampler=args.sampler,
        classes_per_batch=args.classes_per_batch,
        images_per_class=args.images_per_class,
        init_from=args.init_from,
        input_norm=args.input_norm,
        freeze_backbone=args.freeze_backbone,
        head_steps=args.head_steps,
        head_lr=args.head_lr,
        head_classes_per_batch=args.head_classes_per_batch,
        head_images_per_class=args.head_images_per_class,
        feature_views=args.feature_views,
        feature_aug_strength=args.feature_aug_strength,
        max_steps=args.max_steps,
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


def _ensemble_args(args) -> tuple[int, str, list[str]] | None:
    """Validate the ensemble flags; ``(E, perturbation, backbones)`` or None for a single model."""
    from cbir.ensemble import PERTURBATIONS

    if args.ensemble is None:
        if args.perturb is not None or args.ensemble_backbones is not None:
            raise ValueError("--perturb and --ensemble-backbones need --ensemble E (the number of members, E >= 2)")
        return None
    if args.ensemble < 2:
        raise ValueError(
            f"--ensemble {args.ensemble}: an ensemble needs at least 2 members (the t-test needs E >= 2); "
            "use --ensemble 5 as in the paper, or drop --ensemble for one model"
        )
    perturb = args.perturb or "seed"
    if perturb not in PERTURBATIONS:
        raise ValueError(f"--perturb {perturb!r}: unknown perturbation; use one of {', '.join(PERTURBATIONS)}")
    backbones: list[str] = []
    if perturb == "arch":
        from cbir.models.backbones import list_backbones

        if not args.ensemble_backbones:
            raise ValueError(
                "--perturb arch needs --ensemble-backbones: a comma list of backbones, one per member or one list "
                f"cycled over the members (e.g. --ensemble-backbones resnet20,convnet); known: {', '.join(list_backbones())}"
            )
        given = [b.strip() for b in args.ensemble_backbones.split(",") if b.strip()]
        unknown = [b for b in given if b not in list_backbones()]
        if unknown:
            raise ValueError(
                f"--ensemble-backbones: unknown backbone(s) {unknown}; known: {', '.join(list_backbones())}"
            )
        if len(given) > args.ensemble:
            raise ValueError(f"--ensemble-backbones lists {len(given)} backbones for {args.ensemble} members")
        backbones = [given[i % len(given)] for i in range(args.ensemble)]
    elif args.ensemble_backbones is not None:
        raise ValueError(f"--ensemble-backbones is for --perturb arch only (got --perturb {perturb})")
    return args.ensemble, perturb, backbones


def run(args) -> int:
    if args.list_methods:
        return _list_methods()
    from cbir.engine import train

    cfg = config_from_args(args, out=args.out, resume=args.resume)
    ens = _ensemble_args(args)
    if ens is not None:
        from cbir.ensemble import train_ensemble
        from cbir.models.hasher import Hasher

        path = train_ensemble(cfg, *ens)
        eh = Hasher.load(path, device="cpu")
        print(
            json.dumps(
                {
                    "checkpoint": str(path),
                    "content_hash": eh.content_hash,
                    "members": len(eh.members),
                    "perturb": eh.perturb,
                    "member_info": eh.member_info,
                    "shared_backbone": eh.shared_backbone,
                    "layout": eh.layout.to_dict(),
                },
                indent=2,
            )
        )
        return 0
    result = train(cfg)
    if not result.config:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(
        json.dumps(
            {
                "checkpoint": str(result.checkpoint),
                "content_hash": result.hasher.content_hash,
                "layout": result.hasher.layout.to_dict(),
                "steps": result.config["steps"],
                "train_wall_s": result.config["train_wall_s"],
            },
            indent=2,
        )
    )
    return 0


def register(sub) -> None:
    from cbir.engine import TrainConfig

    p = sub.add_parser(
        "train", help="train a hashing model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_training_args(p, TrainConfig())
    p.add_argument("--out", default="runs/model", help="output directory (model.pt, config.json, history.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--list-methods", action="store_true", help="list registered methods and their parameters")
    e = p.add_argument_group(
        "ensembles",
        "E members with perturbed training in one checkpoint; the t-test of their class logits gives each "
        "image a confidence per class, a prediction set and an I-don't-know flag (cbir.uncertainty)",
    )
    e.add_argument(
        "--ensemble",
        type=int,
        default=None,
        metavar="E",
        help="train E >= 2 members and write one ensemble checkpoint OUT/model.pt (members in OUT/member-<i>)",
    )
    e.add_argument(
        "--perturb",
        default=None,
        metavar="{seed,bootstrap,arch}",
        help="how members differ: seed = member i starts from seed SEED+i; bootstrap = every member trains "
        "on its own n draws with replacement from the n training items (seeded SEED+i, recorded in the "
        "checkpoint); arch = member i uses the i-th backbone of --ensemble-backbones (default: seed)",
    )
    e.add_argument(
        "--ensemble-backbones",
        default=None,
        metavar="B1,B2,...",
        help="--perturb arch: comma list of backbones, one per member (a shorter list is cycled), "
        "e.g. resnet20,convnet",
    )
    p.set_defaults(func=run)
