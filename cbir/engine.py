"""The one training engine: every method is trained by :func:`train`.

A method is backbone + head + loss (:class:`cbir.models.base.HashingMethod`), created by name
from the registry; the engine owns everything else: data, augmentation (two views for
contrastive methods), the optimiser (Adam by default) and learning-rate schedule (cosine by
default, per step), seeding, resumption, progress bars and checkpoints.

Output directory (``cfg.out``):

* ``model.pt`` - the :class:`~cbir.models.hasher.Hasher` checkpoint (one file);
* ``config.json`` - the resolved :class:`TrainConfig` (all defaults filled in), the method's
  hyper-parameters, the code layout, dataset sizes and the model's content hash;
* ``history.jsonl`` - one line per epoch (mean losses, learning rate, wall time, and the
  validation accuracy when ``val_fraction > 0``);
* ``train_state.pt`` - optimiser/scheduler/RNG state after the last finished epoch, used by
  ``--resume`` (same config only: a changed field is named with its old and new values; a run
  stopped by its time budget has spent its schedule, so its resume trains nothing, says so and
  writes the outputs of the saved state unchanged).

Model selection never looks at the query set: the model written is the one after the last
epoch. ``val_fraction`` holds out part of the *training* set for monitoring only.

Stages. (1) **Image stage**: ``epochs`` passes over the images (skipped with
``freeze_backbone``). Batches are uniformly shuffled (``batch_size``) or class-balanced
``P x K`` (:mod:`cbir.data.sampler`; ``sampler="auto"`` picks balanced batches for methods whose
loss is contrastive within classes, i.e. DDTL). (2) **Head stage**, with ``freeze_backbone`` or
DDTL's ``two_stage``: the backbone is frozen, its features of the training set are cached once
(eval view + ``feature_views`` augmented views, :mod:`cbir.data.features`) and the head is fitted
on them for ``head_steps`` steps of ``head_classes_per_batch x head_images_per_class`` batches.
``init_from`` copies warm-start weights (a cbir checkpoint, a state_dict file, a torchvision
weights name in the local hub cache; :mod:`cbir.models.warmstart`) before stage 1.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) the image stage is data-parallel
(:mod:`cbir.distributed.ddp`: gloo on CPU, nccl on CUDA, DistributedDataParallel, each rank a
disjoint part of the 1-process global batch, DDTL's per-class contrastive term over the global
batch); rank 0 alone writes ``train_state.pt``, ``model.pt``, ``config.json`` and ``history.jsonl``.
Frozen-feature paths (``freeze_backbone``, DDTL ``two_stage``) are single-process only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cbir.models.hasher import Hasher, resolve_device
from cbir.models.registry import MethodSpec, create_method, resolve_params
from cbir.train_config import TrainConfig, config_changes, resume_key

__all__ = ["TrainConfig", "train", "TrainResult", "set_seed", "config_changes"]

log = logging.getLogger("cbir.train")


@dataclass
class TrainResult:
    checkpoint: Path
    hasher: Hasher
    history: list[dict]
    config: dict


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainConfig, progress: float, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.scheduler == "none":
        return warm
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _val_accuracy(method, loader, device) -> float | None:
    """Top-1 accuracy of the class bits on a held-out part of the training set."""
    if loader is None or method.layout.class_bits == 0 or method.layout.multilabel:
        return None
    method.eval()
    correct = total = 0
    shifts = torch.arange(method.layout.class_bits - 1, -1, -1)
    for batch in loader:
        bits, _ = method.encode(batch.to(device, non_blocking=True).images)
        pred = (bits[:, : method.layout.class_bits].long().cpu() << shifts).sum(1)
        correct += int((pred == batch.targets).sum())
        total += len(batch.targets)
    method.train()
    return correct / max(total, 1)


def _balanced_image_batches(cfg, method) -> bool:
    """Whether the image stage draws class-balanced P x K batches (else shuffled ones)."""
    return cfg.sampler == "balanced" or (
        cfg.sampler == "auto" and getattr(method, "balanced_batches", False) and method.two_views
    )


def _bootstrap(cfg, method, train_set, two_stage: bool):
    """``cfg.bootstrap_seed``: the training set replaced by its bootstrap sample
    (:func:`cbir.data.bootstrap.bootstrap_draw`; stratified when a plain draw would starve a
    class of class-balanced batches, which the head stage always draws). Returns the subset and
    the draw's record."""
    from cbir.data.bootstrap import bootstrap_draw

    balanced = cfg.freeze_backbone or two_stage or _balanced_image_batches(cfg, method)
    idx, draw = bootstrap_draw(len(train_set), cfg.bootstrap_seed, np.asarray(train_set.labels), balanced=balanced)
    if draw.kind != "bootstrap":
        log.warning("stratified bootstrap instead of a plain one: %s", draw.reason)
    sub = train_set.subset(idx)
    sub.name = f"{train_set.name}[bootstrap]"
    return sub, draw


def _image_loader(cfg, method, train_set, aug, skip_log, denv=None):
    """Training loader of the image stage: shuffled, or class-balanced P x K batches.

    Under DDP (``denv``) each rank gets its part of the same global batches."""
    from cbir.data import TwoViews, make_loader
    from cbir.data.imageset import Loader, collate
    from cbir.data.sampler import ClassBalancedBatchSampler, resolve_pk

    ds = train_set.with_transform(TwoViews(aug) if method.two_views else aug)
    balanced = _balanced_image_batches(cfg, method)
    if denv is not None:
        from cbir.data.sampler import DistributedClassBalancedBatchSampler
        from cbir.distributed.ddp import ShardedBatchSampler

        if balanced:
            p, k = resolve_pk(train_set.num_classes, cfg.batch_size, cfg.classes_per_batch, cfg.images_per_class)
            sampler = DistributedClassBalancedBatchSampler(
                train_set.labels, p, k, denv.rank, denv.world_size, seed=cfg.seed
            )
        else:  # the batches of make_loader(shuffle=True, seed=cfg.seed, drop_last=True)
            gen = torch.Generator()
            gen.manual_seed(int(cfg.seed))
            base = torch.utils.data.BatchSampler(
                torch.utils.data.RandomSampler(ds, generator=gen), cfg.batch_size, drop_last=True
            )
            sampler = ShardedBatchSampler(base, denv.rank, denv.world_size)
        dl = torch.utils.data.DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            generator=None if balanced else gen,
        )  # as make_loader: seeds drawn from gen
        return Loader(ds, dl, skip_log), (sampler if balanced else None)
    if not balanced:
        return make_loader(
            ds,
            cfg.batch_size,
            shuffle=True,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
            drop_last=True,
            skip_log=skip_log,
        ), None
    p, k = resolve_pk(train_set.num_classes, cfg.batch_size, cfg.classes_per_batch, cfg.images_per_class)
    sampler = ClassBalancedBatchSampler(train_set.labels, p, k, seed=cfg.seed)
    dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate)
    return Loader(ds, dl, skip_log), sampler


def _fit_heads(cfg, method, cache, phases, device, val_loader, history, t0) -> int:
    """Head stage: fit ``method``'s head on cached features for each phase; returns the steps run."""
    from cbir.data.sampler import ClassBalancedBatchSampler

    steps_run = 0
    p = cfg.head_classes_per_batch or min(
        16, int(cache.labels.max()) + 1 if cache.labels.ndim == 1 else cache.labels.shape[1]
    )
    for phase in phases:
        if phase is not None:
            method.set_stage(phase)
        before = getattr(method, "before_head_fit", None)
        if before is not None:
            with torch.no_grad():
                info = before(cache.features[0].to(device), cache.targets(np.arange(len(cache))).to(device))
            if info:
                history.append({"stage": f"head:{phase or method.method_name}", **info})
        params = method.head_parameters()
        if not params or cfg.head_steps == 0:
            params = []
        opt = _optimizer(dataclasses.replace(cfg, lr=cfg.head_lr, optimizer="adam"), params) if params else None
        sampler = ClassBalancedBatchSampler(
            cache.labels, p, cfg.head_images_per_class, num_batches=max(1, cfg.head_steps), seed=cfg.seed + 17
        )
        rng = np.random.Generator(np.random.PCG64([cfg.seed, 23]))
        method.train()
        method.backbone.eval()
        sums: dict[str, float] = {}
        nb = 0
        for i, rows in enumerate(sampler if params else []):
            for g in opt.param_groups:
                g["lr"] = cfg.head_lr * _lr_factor(cfg, i / cfg.head_steps, i)
            feats = cache.batch(rows, method.head_two_views, rng)
            feats = tuple(f.to(device) for f in feats) if isinstance(feats, tuple) else feats.to(device)
            loss, logs = method.head_loss(feats, cache.targets(rows).to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite head loss {float(loss)} at step {i}; lower --head-lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_step()  # e.g. DMUH's momentum update of its (head-only) momentum net
            nb += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            if nb == max(1, cfg.head_steps // 10) or i == cfg.head_steps - 1:
                rec = {k: v / nb for k, v in sums.items()}
                rec.update(
                    stage=f"head:{phase or method.method_name}",
                    head_step=i + 1,
                    lr=opt.param_groups[0]["lr"],
                    wall_s=round(time.perf_counter() - t0, 2),
                )
                history.append(rec)
                sums, nb = {}, 0
        steps_run += cfg.head_steps if params else 0
        method.eval()
        monitor = getattr(method, "monitor_features", None)
        rec = {"stage": f"head:{phase or method.method_name}", "end_of_stage": True}
        if monitor is not None:
            with torch.no_grad():
                rec.update(
                    {
                        f"train_{k}": v
                        for k, v in monitor(
                            cache.features[0].to(device), cache.targets(np.arange(len(cache))).to(device)
                        ).items()
                    }
                )
        acc = _val_accuracy(method, val_loader, device)
        if acc is not None:
            rec["val_accuracy"] = acc
        history.append(rec)
        log.info("head stage %s: %s", phase or method.method_name, rec)
    return steps_run


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.dataset``; see the module docstring for the outputs."""
    from cbir.distributed import ddp

    denv = ddp.detect()
    if denv is None:
        return _train(cfg, None)
    cfg.validate()
    if cfg.freeze_backbone:
        raise ValueError(
            "--freeze-backbone (cached features + head fit) is single-process only; run it without torchrun"
        )
    try:
        return _train(cfg, denv)
    finally:
        ddp.teardown()


def _train(cfg: TrainConfig, denv) -> TrainResult:
    from tqdm.auto import tqdm

    from cbir.data import SkipLog, eval_transform, load_dataset, make_loader, split_validation, train_transform
    from cbir.models.warmstart import apply_init, parse_input_norm, resolve_init

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if denv is not None:
        from cbir.distributed import ddp

        if device.type == "cuda" and device.index is not None and denv.world_size > 1:
            raise ValueError(f"--device {cfg.device} under torchrun: use --device cuda (rank r uses cuda:LOCAL_RANK)")
        device = ddp.setup(denv, device)
    main = denv is None or denv.is_main

    splits = load_dataset(cfg.dataset, root=cfg.data_root, image_size=cfg.image_size)
    image_size = splits.image_size
    train_set, val_set = splits.train, None
    if cfg.val_fraction > 0:
        train_set, val_set = split_validation(train_set, cfg.val_fraction, cfg.seed)

    norm = parse_input_norm(cfg.input_norm)
    init = resolve_init(cfg.init_from, norm) if cfg.init_from else None
    if init is not None:
        norm = init.input_norm
    bk = dict(cfg.backbone_kwargs)
    if norm is not None:
        bk.update(input_mean=tuple(norm[0]), input_std=tuple(norm[1]))
    params = resolve_params(cfg.method, cfg.params)
    spec = MethodSpec(
        backbone=cfg.backbone,
        num_classes=splits.num_classes,
        nbits=cfg.bits,
        multilabel=splits.multilabel,
        class_names=tuple(splits.class_names),
        depth=cfg.depth,
        backbone_kwargs=tuple(sorted(bk.items())),
    )
    set_seed(cfg.seed)
    method = create_method(cfg.method, spec, params)
    init_report = None
    if init is not None:
        init_report = apply_init(method, init)
        method.after_init()
    method.to(device)
    two_stage = getattr(method, "stage", "joint") != "joint"
    if denv is not None and (two_stage or not method.trainable or cfg.epochs == 0):
        raise ValueError(
            f"{cfg.method}: only the image stage is distributed, and this run has none to distribute "
            "(DDTL two_stage, a method without training, or --epochs 0); run it without torchrun"
            + (" or with --param two_stage=false (DDTL end to end)" if two_stage else "")
        )
    if cfg.freeze_backbone:
        method.backbone.requires_grad_(False)
    draw = None
    if cfg.bootstrap_seed is not None:
        train_set, draw = _bootstrap(cfg, method, train_set, two_stage)

    aug = train_transform(image_size, flip=splits.flip_ok, strength=cfg.aug_strength)
    skip_log = SkipLog()
    train_loader, sampler = _image_loader(cfg, method, train_set, aug, skip_log, denv)

    val_loader = None
    if val_set is not None:
        val_loader = make_loader(val_set.with_transform(eval_transform(image_size)), 256, num_workers=cfg.num_workers)

    image_stage = method.trainable and not cfg.freeze_backbone and cfg.epochs > 0
    trainable = [p for p in method.parameters() if p.requires_grad]
    opt = _optimizer(cfg, trainable) if (image_stage and trainable) else None
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    start_epoch, step, elapsed_before, history = 0, 0, 0.0, []
    state_path = out / "train_state.pt"
    budget_hit = False
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        changed = config_changes(st["config"], resume_key(cfg))
        if changed:
            raise ValueError(
                f"{state_path} was written by a different config ({'; '.join(changed)}); rerun with the "
                "old values to resume, or drop --resume / use a new --out for a new run"
            )
        method.load_state_dict(st["model"])
        if opt is not None and st.get("optimizer"):
            opt.load_state_dict(st["optimizer"])
        start_epoch, step, elapsed_before = st["epoch"], st["step"], st["elapsed"]
        history = [r for r in st["history"] if "stage" not in r]
        torch.set_rng_state(st["rng"])
        # a run stopped by its time budget has spent it: its schedule is over (lr 0), so there is
        # no step left to train (one more would only move BatchNorm statistics); the outputs are
        # rebuilt from the saved state as for a finished run
        budget_hit = bool(st.get("budget_hit", cfg.time_budget_s is not None and elapsed_before >= cfg.time_budget_s))
        if budget_hit:
            log.warning(
                "%s: nothing left to train: the run stopped at its time budget of %.0f s after %d steps "
                "(epoch %d of %d); writing the outputs of that state unchanged (a longer run needs a new --out)",
                state_path,
                cfg.time_budget_s,
                step,
                start_epoch,
                cfg.epochs,
            )
        else:
            log.info("resumed from %s at epoch %d", state_path, start_epoch)

    t0 = time.perf_counter() - elapsed_before
    resumed_spent = budget_hit
    model = None  # the DDP wrapper under torchrun
    if opt is not None and denv is not None:
        from torch.nn.parallel import DistributedDataParallel

        from cbir.distributed.ddp import LossModule, all_reduce_max, all_reduce_mean, global_batch

        model = DistributedDataParallel(
            LossModule(method),
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    if opt is not None and not resumed_spent:
        method.train()
        for epoch in range(start_epoch, cfg.epochs):
            sums: dict[str, float] = {}
            nb = 0
            bar = tqdm(
                total=steps_per_epoch,
                desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
                unit="step",
                disable=not (cfg.progress and main),
                leave=False,
            )
            torch.manual_seed(cfg.seed * 100003 + epoch)  # per-epoch shuffling/augmentation stream
            if sampler is not None:
                sampler.set_epoch(epoch)
            for i, batch in enumerate(train_loader):
                if i >= steps_per_epoch or step >= total_steps:
                    break
                elapsed = time.perf_counter() - t0
                if model is not None and cfg.time_budget_s:  # one schedule for all ranks
                    elapsed = all_reduce_max([elapsed], device)[0]
                progress = step / total_steps
                if cfg.time_budget_s:
                    progress = max(progress, elapsed / cfg.time_budget_s)
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * _lr_factor(cfg, progress, step)
                batch = batch.to(device, non_blocking=True)
                if model is None:
                    loss, logs = method.training_loss(batch.images, batch.targets)
                else:
                    with global_batch():
                        loss, logs = model(batch.images, batch.targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {float(loss)} at step {step}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                method.after_step()
                step += 1
                nb += 1
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{sums['loss'] / nb:.4f}")
                bar.update()
                if cfg.time_budget_s:
                    hit = time.perf_counter() - t0 >= cfg.time_budget_s
                    if model is not None:
                        hit = all_reduce_max([float(hit)], device)[0] > 0
                    if hit:
                        budget_hit = True
                        break
            bar.close()
            if model is not None and sums:  # epoch means over the global batch
                keys = sorted(sums)
                means = dict(zip(keys, all_reduce_mean([sums[k] for k in keys], device)))
                sums = {k: means[k] for k in sums}
            rec = {k: v / max(nb, 1) for k, v in sums.items()}
            rec.update(
                epoch=epoch + 1, step=step, lr=opt.param_groups[0]["lr"], wall_s=round(time.perf_counter() - t0, 2)
            )
            acc = _val_accuracy(method, val_loader, device)
            if acc is not None:
                rec["val_accuracy"] = acc
            history.append(rec)
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
            if main:
                torch.save(
                    {
                        "config": resume_key(cfg),
                        "model": method.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch + 1,
                        "step": step,
                        "elapsed": time.perf_counter() - t0,
                        "history": history,
                        "rng": torch.get_rng_state(),
                        "budget_hit": budget_hit,
                    },
                    state_path,
                )
            if budget_hit:
                log.info("time budget of %.0f s reached after %d steps", cfg.time_budget_s, step)
                break
            if step >= total_steps:
                break

    if denv is not None and not main:  # rank 0 finalizes and writes; the others load what it wrote
        import torch.distributed as dist

        dist.barrier()
        return TrainResult(out / "model.pt", Hasher.load(out / "model.pt"), history, {})

    # Head stage on cached features (frozen backbone; DDTL's two-stage tree fit).
    phases: list = []
    if two_stage:
        head_ready = opt is not None or bool(init_report and init_report["class_head_loaded"])
        phases = ([] if head_ready else ["representation"]) + ["tree"]
    elif cfg.freeze_backbone and method.trainable:
        phases = [None]
    cache, head_steps = None, 0
    fit_tf = eval_transform(image_size)
    if phases or (cfg.freeze_backbone and hasattr(method, "finalize_features")):
        from cbir.data.features import build_feature_cache

        method.backbone.requires_grad_(False)
        strength = cfg.aug_strength if cfg.feature_aug_strength is None else cfg.feature_aug_strength
        tc = time.perf_counter()
        cache = build_feature_cache(
            method.backbone,
            train_set,
            fit_tf,
            train_transform(image_size, flip=splits.flip_ok, strength=strength),
            cfg.feature_views if (cfg.head_steps > 0 and phases) else 0,
            device,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            skip_log=skip_log,
        )
        log.info(
            "cached %d x %d features of %d images in %.1f s",
            cache.features.shape[0],
            cache.features.shape[2],
            len(cache),
            time.perf_counter() - tc,
        )
        head_steps = _fit_heads(cfg, method, cache, phases, device, val_loader, history, t0)

    # Post-training fit on the training set in the evaluation transform (CrPCA, ITQ, bit order...).
    method.eval()
    with torch.no_grad():
        if cache is not None and hasattr(method, "finalize_features"):
            method.finalize_features(cache.features[0].to(device))
        else:
            fit_loader = make_loader(
                train_set.with_transform(fit_tf), 256, num_workers=cfg.num_workers, skip_log=skip_log
            )
            method.finalize(_DeviceLoader(fit_loader, device))
    train_wall = time.perf_counter() - t0

    hasher = Hasher(method, cfg.method, spec, params, image_size, config=cfg.to_dict(), device=device)
    ckpt = hasher.save(out / "model.pt")
    resolved = {
        "train_config": cfg.to_dict(),
        "method_params": dataclasses.asdict(params),
        "layout": hasher.layout.to_dict(),
        "content_hash": hasher.content_hash,
        "dataset": {
            "name": splits.name,
            "train": len(train_set),
            "val": len(val_set) if val_set else 0,
            "database": len(splits.database),
            "query": len(splits.query),
            "image_size": image_size,
        },
        "device": str(device),
        "steps": step,
        "head_steps": head_steps,
        "batches": (
            {"sampler": "balanced", "classes_per_batch": sampler.p, "images_per_class": sampler.k}
            if sampler is not None
            else {"sampler": "random", "batch_size": cfg.batch_size}
        ),
        "init": init_report,
        "bootstrap": draw.to_dict() if draw is not None else None,
        "backbone_frozen": cfg.freeze_backbone,
        "head_stage": [p or cfg.method for p in phases],
        "feature_cache": None
        if cache is None
        else {"views": cache.views, "images": len(cache), "dim": int(cache.features.shape[2])},
        "train_wall_s": round(train_wall, 2),
        "time_budget_hit": budget_hit,
        "skipped_images": skip_log.count,
        "torch": torch.__version__,
    }
    if denv is not None:
        resolved["distributed"] = {
            "world_size": denv.world_size,
            "backend": "nccl" if device.type == "cuda" else "gloo",
        }
    (out / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))
    with open(out / "history.jsonl", "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    if skip_log.count:
        log.warning(skip_log.summary())
    if denv is not None:
        import torch.distributed as dist

        dist.barrier()
    return TrainResult(ckpt, hasher, history, resolved)


class _DeviceLoader:
    """Wraps a loader so that ``finalize`` sees batches already on the method's device."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        for batch in self.loader:
            yield batch.to(self.device, non_blocking=True)

    def __len__(self):
        return len(self.loader)
