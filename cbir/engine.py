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
  ``--resume``.

Model selection never looks at the query set: the model written is the one after the last
epoch. ``val_fraction`` holds out part of the *training* set for monitoring only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbir.models.hasher import Hasher, resolve_device
from cbir.models.registry import MethodSpec, create_method, resolve_params

__all__ = ["TrainConfig", "train", "TrainResult", "set_seed"]

log = logging.getLogger("cbir.train")


@dataclass
class TrainConfig:
    """Everything that determines a training run; written to ``config.json``."""

    method: str = "ddtl"
    dataset: str = "digits"
    data_root: str | None = None
    backbone: str = "resnet20"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    bits: int | None = None
    depth: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    scheduler: str = "cosine"
    warmup_steps: int = 0
    time_budget_s: float | None = None
    max_steps_per_epoch: int | None = None
    aug_strength: float = 1.0
    image_size: int | None = None
    val_fraction: float = 0.0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: int | None = None
    out: str = "runs/model"
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError("optimizer must be adam, adamw or sgd")
        if self.scheduler not in ("cosine", "none"):
            raise ValueError("scheduler must be cosine or none")
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError("val_fraction must be in [0, 0.5)")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError("time_budget_s must be > 0")
        if self.bits is not None and self.bits <= 0:
            raise ValueError("bits must be > 0")
        if self.depth is not None and self.depth <= 0:
            raise ValueError("depth must be > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)


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


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.dataset``; see the module docstring for the outputs."""
    from tqdm.auto import tqdm

    from cbir.data import SkipLog, TwoViews, load_dataset, make_loader, split_validation, train_transform

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)

    splits = load_dataset(cfg.dataset, root=cfg.data_root, image_size=cfg.image_size)
    image_size = splits.image_size
    train_set, val_set = splits.train, None
    if cfg.val_fraction > 0:
        train_set, val_set = split_validation(train_set, cfg.val_fraction, cfg.seed)

    params = resolve_params(cfg.method, cfg.params)
    spec = MethodSpec(
        backbone=cfg.backbone,
        num_classes=splits.num_classes,
        nbits=cfg.bits,
        multilabel=splits.multilabel,
        class_names=tuple(splits.class_names),
        depth=cfg.depth,
        backbone_kwargs=tuple(sorted(cfg.backbone_kwargs.items())),
    )
    method = create_method(cfg.method, spec, params).to(device)

    aug = train_transform(image_size, flip=splits.flip_ok, strength=cfg.aug_strength)
    skip_log = SkipLog()
    train_loader = make_loader(
        train_set.with_transform(TwoViews(aug) if method.two_views else aug),
        cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, seed=cfg.seed, drop_last=True,
        skip_log=skip_log,
    )
    from cbir.data import eval_transform

    val_loader = None
    if val_set is not None:
        val_loader = make_loader(val_set.with_transform(eval_transform(image_size)), 256, num_workers=cfg.num_workers)

    trainable = [p for p in method.parameters() if p.requires_grad]
    opt = _optimizer(cfg, trainable) if (method.trainable and trainable) else None
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = max(1, steps_per_epoch * cfg.epochs)

    start_epoch, step, elapsed_before, history = 0, 0, 0.0, []
    state_path = out / "train_state.pt"
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st["config"] != _resume_key(cfg):
            raise ValueError(f"{state_path} was written by a different config; drop --resume or use a new --out")
        method.load_state_dict(st["model"])
        if opt is not None and st.get("optimizer"):
            opt.load_state_dict(st["optimizer"])
        start_epoch, step, elapsed_before = st["epoch"], st["step"], st["elapsed"]
        history = st["history"]
        torch.set_rng_state(st["rng"])
        log.info("resumed from %s at epoch %d", state_path, start_epoch)

    t0 = time.perf_counter() - elapsed_before
    budget_hit = False
    if opt is not None and cfg.epochs > 0:
        method.train()
        for epoch in range(start_epoch, cfg.epochs):
            sums: dict[str, float] = {}
            nb = 0
            bar = tqdm(total=steps_per_epoch, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
                       unit="step", disable=not cfg.progress, leave=False)
            torch.manual_seed(cfg.seed * 100003 + epoch)  # per-epoch shuffling/augmentation stream
            for i, batch in enumerate(train_loader):
                if i >= steps_per_epoch:
                    break
                elapsed = time.perf_counter() - t0
                progress = step / total_steps
                if cfg.time_budget_s:
                    progress = max(progress, elapsed / cfg.time_budget_s)
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * _lr_factor(cfg, progress, step)
                batch = batch.to(device, non_blocking=True)
                loss, logs = method.training_loss(batch.images, batch.targets)
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
                if cfg.time_budget_s and time.perf_counter() - t0 >= cfg.time_budget_s:
                    budget_hit = True
                    break
            bar.close()
            rec = {k: v / max(nb, 1) for k, v in sums.items()}
            rec.update(epoch=epoch + 1, step=step, lr=opt.param_groups[0]["lr"],
                       wall_s=round(time.perf_counter() - t0, 2))
            acc = _val_accuracy(method, val_loader, device)
            if acc is not None:
                rec["val_accuracy"] = acc
            history.append(rec)
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
            torch.save({"config": _resume_key(cfg), "model": method.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch + 1, "step": step, "elapsed": time.perf_counter() - t0,
                        "history": history, "rng": torch.get_rng_state()}, state_path)
            if budget_hit:
                log.info("time budget of %.0f s reached after %d steps", cfg.time_budget_s, step)
                break

    # Post-training fit on the training set in the evaluation transform (CrPCA, ITQ, bit order...).
    method.eval()
    fit_loader = make_loader(train_set.with_transform(eval_transform(image_size)), 256,
                             num_workers=cfg.num_workers, skip_log=skip_log)
    with torch.no_grad():
        method.finalize(_DeviceLoader(fit_loader, device))
    train_wall = time.perf_counter() - t0

    hasher = Hasher(method, cfg.method, spec, params, image_size, config=cfg.to_dict(), device=device)
    ckpt = hasher.save(out / "model.pt")
    resolved = {
        "train_config": cfg.to_dict(),
        "method_params": dataclasses.asdict(params),
        "layout": hasher.layout.to_dict(),
        "content_hash": hasher.content_hash,
        "dataset": {"name": splits.name, "train": len(train_set), "val": len(val_set) if val_set else 0,
                    "database": len(splits.database), "query": len(splits.query), "image_size": image_size},
        "device": str(device),
        "steps": step,
        "train_wall_s": round(train_wall, 2),
        "time_budget_hit": budget_hit,
        "skipped_images": skip_log.count,
        "torch": torch.__version__,
    }
    (out / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))
    with open(out / "history.jsonl", "w") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    if skip_log.count:
        log.warning(skip_log.summary())
    return TrainResult(ckpt, hasher, history, resolved)


def _resume_key(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    for k in ("resume", "progress", "num_workers", "threads", "device", "out"):
        d.pop(k, None)
    return d


class _DeviceLoader:
    """Wraps a loader so that ``finalize`` sees batches already on the method's device."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        for batch in self.loader:
            yield batch.to(self.device, non_blocking=True)

    def __len__(self):
        return len(self.loader)
