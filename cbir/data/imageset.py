"""The dataset type of cbir (:class:`ImageSet`), batches and the loader that skips corrupt files.

An :class:`ImageSet` holds its images either in memory (a ``uint8`` tensor ``(N, 3, H, W)``;
the transform is applied to the per-item tensor, no PIL round trip) or as file paths decoded
lazily with :func:`cbir.data.decode_image`. An unreadable file never raises: ``ds[i]`` returns
a :class:`Skipped` record, and :func:`make_loader` moves those records out of the batch into
``Batch.skipped`` and reports them to a :class:`SkipLog`.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from cbir.data.images import CorruptImageError, decode_image
from cbir.data.transforms import transform_batch

__all__ = ["ImageSet", "Skipped", "Batch", "SkipLog", "make_loader", "Loader", "collate"]

log = logging.getLogger("cbir.data")


@dataclass(frozen=True)
class Skipped:
    """What ``ImageSet.__getitem__`` returns for an item whose file cannot be read/decoded."""

    index: int
    path: str
    reason: str


class ImageSet(Dataset):
    """A labelled set of RGB images.

    Attributes
    ----------
    labels : np.ndarray
        ``(N,)`` int64 class indices, or ``(N, m)`` uint8 multi-hot when ``multilabel``.
    class_names : tuple[str, ...]
    multilabel : bool
    paths : list[str] | None
        Source path per item when file-backed, else ``None``.
    transform : callable | None
        Applied to the RGB ``uint8`` CHW tensor of an item; may be a :class:`TwoViews`.
        ``None`` returns the raw ``uint8`` tensor.

    ``ds[i]`` is ``(image, target, i)`` with ``image`` a tensor (or a pair of tensors for
    ``TwoViews``) and ``target`` an ``int`` (single-label) or a ``float32`` multi-hot tensor;
    or a :class:`Skipped` record when the file is unreadable.
    """

    def __init__(
        self,
        labels: np.ndarray,
        class_names: Sequence[str],
        *,
        images: torch.Tensor | None = None,
        paths: Sequence[str | Path] | None = None,
        transform: Callable | None = None,
        multilabel: bool | None = None,
        name: str = "",
    ):
        if (images is None) == (paths is None):
            raise ValueError("ImageSet needs exactly one of images= (in memory) or paths=")
        labels = np.asarray(labels)
        if multilabel is None:
            multilabel = labels.ndim == 2
        class_names = tuple(str(c) for c in class_names)
        if multilabel:
            if labels.ndim != 2:
                raise ValueError(f"multi-label labels must be (N, m), got shape {labels.shape}")
            if labels.shape[1] != len(class_names):
                raise ValueError(f"labels have {labels.shape[1]} columns but there are {len(class_names)} class names")
            labels = (labels != 0).astype(np.uint8)
        else:
            if labels.ndim != 1:
                raise ValueError(f"single-label labels must be (N,), got shape {labels.shape}")
            labels = labels.astype(np.int64)
            if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
                raise ValueError(f"labels must lie in 0..{len(class_names) - 1}, got {labels.min()}..{labels.max()}")
        n = labels.shape[0]
        if images is not None:
            images = torch.as_tensor(images)
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(
                    f"in-memory images must be a uint8 tensor (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
                )
            if images.shape[0] != n:
                raise ValueError(f"{images.shape[0]} images but {n} labels")
        else:
            paths = [str(p) for p in paths]
            if len(paths) != n:
                raise ValueError(f"{len(paths)} paths but {n} labels")
        self._images = images
        self.paths: list[str] | None = paths
        self.labels: np.ndarray = labels
        self.class_names: tuple[str, ...] = class_names
        self.multilabel: bool = bool(multilabel)
        self.transform = transform
        self.name = name

    # -- basic protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_memory(self) -> bool:
        return self._images is not None

    @property
    def images(self) -> torch.Tensor | None:
        """The ``uint8`` ``(N, 3, H, W)`` tensor of an in-memory set (else ``None``)."""
        return self._images

    def target(self, i: int):
        """The target of item ``i``: ``int`` class index, or ``float32`` multi-hot tensor."""
        if self.multilabel:
            return torch.from_numpy(self.labels[i].astype(np.float32))
        return int(self.labels[i])

    def _raw_tensor(self, i: int) -> torch.Tensor:
        """uint8 CHW RGB tensor of item ``i``; raises CorruptImageError/OSError for files."""
        if self._images is not None:
            return self._images[i]
        return TF.pil_to_tensor(self._load_file(i))

    def _load_file(self, i: int) -> Image.Image:
        path = self.paths[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CorruptImageError(f"cannot read file: {e.strerror or e}") from None
        return decode_image(data)

    def __getitem__(self, i):
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for ImageSet of {len(self)} items")
        try:
            x = self._raw_tensor(i)
        except CorruptImageError as e:
            return Skipped(i, self.paths[i] if self.paths is not None else f"#{i}", str(e))
        if self.transform is not None:
            x = self.transform(x)
        return x, self.target(i), i

    def get_pil(self, i: int) -> Image.Image:
        """The raw RGB image of item ``i`` (raises :class:`CorruptImageError` if unreadable)."""
        i = int(i)
        if self._images is not None:
            return Image.fromarray(self._images[i].permute(1, 2, 0).contiguous().numpy(), "RGB")
        return self._load_file(i)

    # -- derived sets ----------------------------------------------------------------------
    def with_transform(self, transform) -> "ImageSet":
        """Shallow copy with another transform (the images/labels are shared)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def subset(self, indices) -> "ImageSet":
        """A new set with the given items (in that order), same transform and classes.
        Items are renumbered ``0..len(indices)-1``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError("subset indices out of range")
        idx = np.where(idx < 0, idx + len(self), idx)
        other = copy.copy(self)
        other.labels = self.labels[idx]
        if self._images is not None:
            other._images = self._images[torch.from_numpy(idx)]
        else:
            other.paths = [self.paths[j] for j in idx]
        return other

    def class_counts(self) -> np.ndarray:
        """Number of items per class (for multi-label: per label)."""
        if self.multilabel:
            return self.labels.sum(axis=0).astype(np.int64)
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def __repr__(self) -> str:
        kind = "memory" if self.in_memory else "files"
        ml = ", multilabel" if self.multilabel else ""
        nm = f"{self.name!r}, " if self.name else ""
        return f"ImageSet({nm}{len(self)} items, {self.num_classes} classes{ml}, {kind})"


# ----------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One mini-batch. ``images`` is ``(n, 3, S, S)`` float32 (or a pair of them for
    two-view training, or uint8 without a transform); ``targets`` is int64 ``(n,)`` or
    float32 ``(n, m)`` multi-hot; ``indices`` are item indices in the ImageSet;
    ``skipped`` lists ``(path, reason)`` of the unreadable items left out of this batch."""

    images: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    targets: torch.Tensor
    indices: torch.Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def to(self, device, non_blocking: bool = False) -> "Batch":
        imgs = self.images
        if isinstance(imgs, (tuple, list)):
            imgs = tuple(t.to(device, non_blocking=non_blocking) for t in imgs)
        else:
            imgs = imgs.to(device, non_blocking=non_blocking)
        return Batch(imgs, self.targets.to(device, non_blocking=non_blocking), self.indices, list(self.skipped))


def _stack(xs: list):
    if isinstance(xs[0], (tuple, list)):
        return tuple(torch.stack([x[k] for x in xs]) for k in range(len(xs[0])))
    return torch.stack(xs)


def collate(items: list, batch_transform=None) -> Batch:
    """Collate ``ImageSet`` items into a :class:`Batch`, moving :class:`Skipped` records
    into ``batch.skipped``. A batch of only skipped items has ``len(batch) == 0``.
    ``batch_transform``: a deterministic transform applied to the batch's raw images at once
    (:func:`~cbir.data.transforms.transform_batch`; the set then carries no transform)."""
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [(it.path, it.reason) for it in items if isinstance(it, Skipped)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), skipped)
    if batch_transform is not None:
        images = transform_batch([it[0] for it in good], batch_transform)
    else:
        images = _stack([it[0] for it in good])
    t0 = good[0][1]
    if isinstance(t0, torch.Tensor):
        targets = torch.stack([it[1] for it in good]).to(torch.float32)
    else:
        targets = torch.tensor([it[1] for it in good], dtype=torch.int64)
    indices = torch.tensor([it[2] for it in good], dtype=torch.int64)
    return Batch(images, targets, indices, skipped)


class SkipLog:
    """Collects the unreadable items met while loading: logs one WARNING per item (path and
    reason, on ``logging.getLogger("cbir.data")``) the first time it is seen; ``count`` is
    the number of distinct skipped files, ``occurrences`` counts every time (e.g. per epoch)."""

    def __init__(self, logger: logging.Logger | None = None):
        self._items: dict[str, str] = {}
        self.occurrences = 0
        self._log = logger or log

    def add(self, path: str, reason: str) -> None:
        self.occurrences += 1
        if path not in self._items:
            self._items[path] = reason
            self._log.warning("skipping unreadable image %s: %s", path, reason)

    def extend(self, skipped) -> None:
        for path, reason in skipped:
            self.add(path, reason)

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def items(self) -> list[tuple[str, str]]:
        return list(self._items.items())

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:  # a SkipLog is always truthy (``skip_log or ...`` idiom)
        return True

    def summary(self) -> str:
        if not self._items:
            return "0 unreadable images skipped"
        lines = [f"{self.count} unreadable image(s) skipped:"]
        lines += [f"  {p}: {r}" for p, r in self._items.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipLog(count={self.count})"


class Loader:
    """Iterable of :class:`Batch` over an :class:`ImageSet` (wraps a ``DataLoader``).

    Skipped items are reported to ``skip_log`` in the main process (so this works with worker
    processes); batches whose items are all unreadable are dropped."""

    def __init__(self, imageset: ImageSet, dataloader: DataLoader, skip_log: SkipLog):
        self.imageset = imageset
        self.dataloader = dataloader
        self.skip_log = skip_log

    @property
    def dataset(self) -> ImageSet:
        return self.imageset

    @property
    def batch_size(self) -> int | None:
        return self.dataloader.batch_size

    def __len__(self) -> int:
        """Number of batches (an upper bound when all-corrupt batches are dropped)."""
        return len(self.dataloader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.dataloader:
            if batch.skipped:
                self.skip_log.extend(batch.skipped)
            if len(batch) == 0:
                continue
            yield batch


def make_loader(
    imageset: ImageSet,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int | None = None,
    drop_last: bool = False,
    skip_log: SkipLog | None = None,
    batch_transform=None,
) -> Loader:
    """Batches of ``imageset`` as :class:`Batch` objects.

    ``seed`` seeds a ``torch.Generator`` used for shuffling (and for the workers' base seed,
    hence their augmentations), so a seeded loader yields the same order every time.
    Unreadable items go to ``batch.skipped`` and to ``skip_log`` (a new one, reachable as
    ``loader.skip_log``, when none is given). ``batch_transform``: a deterministic transform
    applied per batch to the raw items (``imageset`` must then have no transform of its own)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_transform is not None and imageset.transform is not None:
        raise ValueError("make_loader: give the transform either to the ImageSet or as batch_transform, not both")
    gen = None
    if seed is not None:
        gen = torch.Generator()
        gen.manual_seed(int(seed))
    dl = DataLoader(
        imageset,
        batch_size=int(batch_size),
        shuffle=bool(shuffle),
        num_workers=int(num_workers),
        collate_fn=collate if batch_transform is None else functools.partial(collate, batch_transform=batch_transform),
        drop_last=bool(drop_last),
        generator=gen,
        persistent_workers=False,
    )
    return Loader(imageset, dl, skip_log if skip_log is not None else SkipLog())
