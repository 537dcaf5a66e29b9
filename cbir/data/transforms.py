"""Image transforms (``torchvision.transforms.v2``) for training and evaluation.

Every transform accepts an RGB ``uint8`` CHW tensor (the fast path used by the in-memory
datasets), a PIL image or an HWC ``uint8`` array, and returns a plain ``float32`` tensor of
shape ``(3, image_size, image_size)`` normalised with mean 0.5 / std 0.5 (values in [-1, 1]).

**One preprocessing path.** The geometry of evaluation (shorter side resized to
``image_size`` with antialiased bilinear interpolation on the ``uint8`` tensor, then a centre
crop) is :func:`resize_uint8`, used both by :func:`eval_transform` (one image from a file or a
gRPC payload) and by the in-memory datasets when they pre-resize a whole array at load time;
it is exact on batches, so the same pixels give the same tensor - and the same code - whichever
way they arrive (``tests/test_preprocessing.py``).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["train_transform", "eval_transform", "resize_uint8", "transform_batch", "TwoViews", "MEAN", "STD"]

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def _finish() -> list:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(MEAN), std=list(STD)),
        v2.ToPureTensor(),
    ]


def train_transform(image_size: int, flip: bool = True, strength: float = 1.0) -> v2.Compose:
    """SimCLR-style augmentation: random resized crop (scale 0.6-1), optional horizontal flip,
    colour jitter (0.4, 0.4, 0.4, 0.1 times ``strength``, p = 0.8), random greyscale (p = 0.1
    times ``strength``), then float + normalisation.

    Pass ``flip=False`` for data where a mirror image changes the meaning (digits).
    """
    image_size = int(image_size)
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    strength = float(strength)
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    steps: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if strength > 0:
        s = strength
        steps.append(
            v2.RandomApply(
                [v2.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.4 * s, hue=min(0.5, 0.1 * s))],
                p=0.8,
            )
        )
        steps.append(v2.RandomGrayscale(p=min(1.0, 0.1 * s)))
    steps += _finish()
    return v2.Compose(steps)


def resize_uint8(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """The evaluation geometry on ``uint8`` ``(..., 3, H, W)`` tensors (one image or a batch):
    shorter side to ``image_size`` (antialiased bilinear), centre crop to a square. A no-op for
    images already ``image_size`` square; per-image results equal batched ones exactly."""
    if x.dtype != torch.uint8:
        raise ValueError(f"resize_uint8 expects a uint8 tensor, got {x.dtype}")
    if tuple(x.shape[-2:]) == (image_size, image_size):
        return x
    x = TF.resize(x, [image_size], antialias=True)
    return TF.center_crop(x, [image_size, image_size])


class _EvalResize(torch.nn.Module):
    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size

    def forward(self, x):
        return resize_uint8(x, self.image_size)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}"


def eval_transform(image_size: int) -> v2.Compose:
    """Deterministic transform: :func:`resize_uint8` (shorter side to ``image_size``, centre
    crop; a no-op for images already of that size), then float + normalisation."""
    image_size = int(image_size)
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8, scale=True), _EvalResize(image_size), *_finish()])


def transform_batch(raw: list, transform) -> torch.Tensor:
    """Apply a deterministic per-image ``transform`` to a list of ``uint8`` CHW tensors as few
    batched calls: images of one size are stacked and transformed in one call (a v2 pipeline
    costs ~180 us per 48x48 image one by one and ~25 us per image in a batch of 512). The rows
    keep the input order and equal the per-image transform (``tests/test_preprocessing.py``);
    only for deterministic transforms (a random one would draw once per group).
    """
    if not raw:
        raise ValueError("transform_batch needs at least one image")
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(raw):
        groups.setdefault((t.dtype, *t.shape), []).append(i)
    if len(groups) == 1:
        return transform(torch.stack(raw))
    out = None
    for rows in groups.values():
        batch = transform(torch.stack([raw[i] for i in rows]))
        if out is None:
            out = torch.empty(len(raw), *batch.shape[1:], dtype=batch.dtype)
        elif batch.shape[1:] != out.shape[1:]:
            raise ValueError(
                f"the transform gave {tuple(batch.shape[1:])} for some images and {tuple(out.shape[1:])} for others"
            )
        out[rows] = batch
    return out


class TwoViews:
    """Wraps a (random) transform ``t`` and returns two independently augmented views
    ``(t(x), t(x))`` of the same image, as contrastive (SimCLR-style) training needs."""

    def __init__(self, transform):
        if transform is None:
            raise ValueError("TwoViews needs a transform")
        self.transform = transform

    def __call__(self, x):
        return self.transform(x), self.transform(x)

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"
