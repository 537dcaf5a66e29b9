"""The typed configuration of a training run (:class:`TrainConfig`, written as ``config.json``
beside every checkpoint) and what a resume compares: :func:`config_changes` names every field
that differs, old and new value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "config_changes", "resume_key"]


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
    max_steps: int | None = None  # stop the image stage after this many optimiser steps (the cosine follows it)
    aug_strength: float = 1.0
    sampler: str = "auto"  # auto | balanced | random (see the module docstring)
    classes_per_batch: int | None = None  # P of balanced batches (default batch_size // K)
    images_per_class: int | None = None  # K of balanced batches (default 32)
    init_from: str | None = None
    input_norm: str | None = None  # None/cbir, imagenet or "m1,m2,m3/s1,s2,s3" (cbir.models.warmstart)
    freeze_backbone: bool = False
    head_steps: int = 1000
    head_lr: float = 1e-2
    head_classes_per_batch: int | None = None  # default: every class (at most 16)
    head_images_per_class: int = 51  # the thesis' batch 512 over 10 classes
    feature_views: int = 4
    feature_aug_strength: float | None = None  # default aug_strength
    image_size: int | None = None
    val_fraction: float = 0.0
    bootstrap_seed: int | None = None  # train on n draws with replacement of the n training items (cbir.data.bootstrap)
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
        if self.bootstrap_seed is not None and self.val_fraction > 0:
            raise ValueError(
                "--perturb bootstrap with --val-fraction: a bootstrap sample repeats items, so a validation "
                "split of it would share items with training; use --val-fraction 0"
            )
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError("time_budget_s must be > 0")
        if self.bits is not None and self.bits <= 0:
            raise ValueError("bits must be > 0")
        if self.depth is not None and self.depth <= 0:
            raise ValueError("depth must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1 (or None)")
        if self.sampler not in ("auto", "balanced", "random"):
            raise ValueError("sampler must be auto, balanced or random")
        if self.head_steps < 0 or self.head_lr <= 0:
            raise ValueError("head_steps must be >= 0 and head_lr > 0")
        if self.feature_views < 1:
            raise ValueError("feature_views must be >= 1 (augmented views cached per image)")
        if self.head_images_per_class < 2:
            raise ValueError("head_images_per_class must be >= 2 (a positive and negatives per class)")
        if self.aug_strength < 0 or (self.feature_aug_strength is not None and self.feature_aug_strength < 0):
            raise ValueError("augmentation strengths must be >= 0")
        from cbir.models.backbones import check_backbone_arguments

        check_backbone_arguments(self.backbone, self.backbone_kwargs)  # before any data is loaded

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)


def config_changes(old: dict, new: dict) -> list[str]:
    """``"field: old -> new"`` for every field that differs between two resume keys (nested
    dicts such as ``params`` field by field, ``params.beta: 0.1 -> 0.2``)."""
    missing = object()

    def show(v) -> str:
        return "(not set)" if v is missing else repr(v)

    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, missing), new.get(key, missing)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{c}" for c in config_changes(a, b)]
        else:
            out.append(f"{key}: {show(a)} -> {show(b)}")
    return out


def resume_key(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    for k in ("resume", "progress", "num_workers", "threads", "device", "out"):
        d.pop(k, None)
    return d
