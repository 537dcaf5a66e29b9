"""Class-balanced batches: a P-classes x K-images batch sampler (multi-label aware).

Darlow (2022, ch. 3) computes the DDTL contrastive term *within each class of the minibatch*
(eqs. 3.15-3.17), with batch 512 on 10 classes, i.e. ~51 images per class. A uniformly shuffled
batch of 128 gives ~13 per class, and a class with few images in the batch has almost no
negatives. :class:`ClassBalancedBatchSampler` makes every batch hold ``P`` classes with ``K``
images each:

* **single-label**: each batch takes the next ``P`` classes of a shuffled class cycle (every
  class is visited equally often; a new shuffle when the cycle is used up) and ``K`` images of
  each from the class's own shuffled pool, drawn without replacement until the pool is empty
  and then reshuffled (so every image is seen about equally often). A class with fewer than
  ``K`` images contributes all of them (no image twice in one batch).
* **multi-label**: the "classes" are the labels; an image belongs to the pool of every label it
  carries. A batch takes ``P`` labels and ``K`` images carrying each, skipping images already in
  the batch (an image with two chosen labels is counted once), so rare labels get their ``K``
  images per visit.

The order is a pure function of ``seed`` and the epoch (``set_epoch``), numpy's PCG64 generator.
Items are dataset indices; batches are lists of ints (``DataLoader(batch_sampler=...)``).

:class:`DistributedClassBalancedBatchSampler` (DDP under torchrun) draws the same global batches
with the same seed on every rank and yields rank ``r``'s part, items ``r, r + N, ...`` of each:
the ranks' parts are disjoint and together are the 1-process batch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ClassBalancedBatchSampler", "DistributedClassBalancedBatchSampler", "resolve_pk"]


def resolve_pk(
    num_classes: int, batch_size: int, classes_per_batch: int | None, images_per_class: int | None
) -> tuple[int, int]:
    """``(P, K)`` from what the user gave: ``P`` defaults to ``batch_size // K`` (at least 2, at most the
    number of classes), ``K`` to ``batch_size // P`` or 32."""
    if num_classes < 1:
        raise ValueError("a class-balanced sampler needs at least one class")
    if classes_per_batch is not None and classes_per_batch < 1:
        raise ValueError(f"classes_per_batch (P) must be >= 1, got {classes_per_batch}")
    if images_per_class is not None and images_per_class < 2:
        raise ValueError(
            f"images_per_class (K) must be >= 2 so each class has a positive and negatives, got {images_per_class}"
        )
    if images_per_class is None:
        k = max(2, batch_size // classes_per_batch) if classes_per_batch else 32
    else:
        k = int(images_per_class)
    p = int(classes_per_batch) if classes_per_batch else max(2, batch_size // k)
    return min(p, num_classes), k


class ClassBalancedBatchSampler:
    """Batches of ``P`` classes x ``K`` images (see the module docstring).

    ``labels``: ``(N,)`` class indices or ``(N, m)`` multi-hot. ``num_batches`` defaults to
    ``ceil(N / (P K))`` (about one pass over the data per epoch).
    """

    def __init__(
        self, labels, classes_per_batch: int, images_per_class: int, num_batches: int | None = None, seed: int = 0
    ):
        labels = np.asarray(labels)
        if labels.ndim not in (1, 2) or labels.shape[0] == 0:
            raise ValueError(f"labels must be a non-empty (N,) or (N, m) array, got shape {labels.shape}")
        self.multilabel = labels.ndim == 2
        if self.multilabel:
            pools = [np.flatnonzero(labels[:, c] != 0) for c in range(labels.shape[1])]
        else:
            pools = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
        self.classes = np.array([c for c, p in enumerate(pools) if len(p)], dtype=np.int64)
        self.pools = {int(c): pools[c] for c in self.classes}
        if classes_per_batch < 1:
            raise ValueError(f"classes_per_batch (P) must be >= 1, got {classes_per_batch}")
        if images_per_class < 1:
            raise ValueError(f"images_per_class (K) must be >= 1, got {images_per_class}")
        self.p = min(int(classes_per_batch), len(self.classes))
        self.k = int(images_per_class)
        n = labels.shape[0]
        self.num_batches = int(num_batches) if num_batches else max(1, -(-n // (self.p * self.k)))
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
        cursor = {c: 0 for c in self.pools}
        perm = {c: rng.permutation(p) for c, p in self.pools.items()}
        cycle, ci = rng.permutation(self.classes), 0

        def take(c: int, want: int, used: set) -> list[int]:
            pool, out, tried = perm[c], [], 0
            while len(out) < want and tried < len(pool):
                if cursor[c] >= len(pool):
                    perm[c] = pool = rng.permutation(self.pools[c])
                    cursor[c] = 0
                j = int(pool[cursor[c]])
                cursor[c] += 1
                tried += 1
                if j not in used:
                    used.add(j)
                    out.append(j)
            return out

        for _ in range(self.num_batches):
            chosen = []
            while len(chosen) < self.p:
                if ci >= len(cycle):
                    cycle, ci = rng.permutation(self.classes), 0
                c = int(cycle[ci])
                ci += 1
                if c not in chosen:
                    chosen.append(c)
            used: set = set()
            batch: list[int] = []
            for c in chosen:
                batch += take(c, self.k, used)
            yield batch


class DistributedClassBalancedBatchSampler(ClassBalancedBatchSampler):
    """Rank ``rank``'s part (items ``rank::world_size``) of each global batch of
    :class:`ClassBalancedBatchSampler` with the same arguments (see the module docstring)."""

    def __init__(
        self,
        labels,
        classes_per_batch: int,
        images_per_class: int,
        rank: int,
        world_size: int,
        num_batches: int | None = None,
        seed: int = 0,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        super().__init__(labels, classes_per_batch, images_per_class, num_batches=num_batches, seed=seed)
        self.rank, self.world_size = int(rank), int(world_size)

    def __iter__(self):
        for batch in super().__iter__():
            if len(batch) < self.world_size:
                raise ValueError(
                    f"a global batch of {len(batch)} items cannot be split over {self.world_size} "
                    "processes; use a larger batch or fewer processes"
                )
            yield batch[self.rank :: self.world_size]
