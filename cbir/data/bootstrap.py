"""Bootstrap draws of a training set, for the bootstrap perturbation of ensembles.

"Looking for controversy: an ensemble approach to epistemic uncertainty" (2022), ensemble
construction by bagging: each member trains on ``n`` draws **with replacement** from the ``n``
training items (Efron's bootstrap; about 63.2 % of the items appear, some several times, the
rest are the member's out-of-bag items).

* :func:`bootstrap_draw` makes member draws: a pure function of ``(n, seed)`` (numpy PCG64 of
  ``[seed, 0xB007]``), so a member's draw is reproduced from the seed recorded in its checkpoint.
* **Class-balanced batches** (:mod:`cbir.data.sampler`, DDTL's ``P x K`` batches and the head
  stage on cached features) draw ``K`` images per class from each class's pool. They work on a
  bootstrap sample unchanged (the sample is renumbered ``0..n-1``, so an item drawn ``m`` times
  is ``m`` entries of its class pool and, like any draw with replacement, may occur more than
  once in a batch), as long as every class of the training set still has at least
  ``min_per_class`` (default 2: a positive and an anchor) distinct items in the draw. When a
  plain draw leaves a class below that (small classes, tiny datasets), the member **falls back**
  to a *stratified* bootstrap (``n_c`` draws with replacement inside every class ``c``: every class
  keeps its size and is in every batch cycle of the sampler; still
  ``n`` in all) and the draw records ``kind="stratified"`` and the reason.
* the engine applies a draw to the training split it loads when ``TrainConfig.bootstrap_seed``
  is set (``train.subset(indices)``; database and query are untouched) and records it in the
  run's ``config.json`` (``bootstrap``).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["BootstrapDraw", "bootstrap_draw", "BOOTSTRAP_STREAM"]

#: the second word of the PCG64 seed of every draw (keeps bootstrap draws independent of any
#: other stream seeded with the member's seed)
BOOTSTRAP_STREAM = 0xB007


@dataclass(frozen=True)
class BootstrapDraw:
    """One member's bootstrap sample of the ``n`` training items (recorded in the checkpoint)."""

    seed: int
    n: int
    kind: str  # "bootstrap" (the paper's n draws of n) or "stratified" (the class-balanced fallback)
    reason: str  # why a stratified fallback was needed ("" for a plain draw)
    unique: int  # distinct items drawn (n - unique are the out-of-bag items)
    sha256: str  # of the int64 indices, to check a reproduction

    def indices(self, labels=None) -> np.ndarray:
        """Re-draw the indices from the seed (``labels`` are needed for a stratified draw)."""
        idx = _draw(self.n, self.seed, None if self.kind == "bootstrap" else np.asarray(labels))
        if _sha(idx) != self.sha256:
            raise ValueError(
                f"the bootstrap draw of seed {self.seed} does not reproduce (different training set "
                f"or labels than the {self.n} items it was drawn from)"
            )
        return idx

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BootstrapDraw":
        return cls(**d)


def _sha(idx: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()


def _draw(n: int, seed: int, labels: np.ndarray | None) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64([int(seed) % 2**63, BOOTSTRAP_STREAM]))
    if labels is None:
        return rng.integers(0, n, size=n).astype(np.int64)
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} items")
    out = np.empty(n, np.int64)
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        out[pos] = pos[rng.integers(0, len(pos), size=len(pos))]
    return out


def bootstrap_draw(
    n: int, seed: int, labels=None, balanced: bool = False, min_per_class: int = 2
) -> tuple[np.ndarray, BootstrapDraw]:
    """``n`` draws with replacement from ``range(n)`` (the paper's bootstrap), seeded by ``seed``.

    With ``balanced`` (the member trains on class-balanced batches) and single-label ``labels``,
    a draw that leaves a class of the training set with fewer than ``min_per_class`` distinct
    items is replaced by a stratified draw (see the module docstring). Returns the indices (in
    draw order) and their :class:`BootstrapDraw` record."""
    if n < 1:
        raise ValueError(f"a bootstrap needs at least 1 training item, got {n}")
    idx = _draw(n, seed, None)
    kind, reason = "bootstrap", ""
    lab = None if labels is None else np.asarray(labels)
    if balanced and lab is not None and lab.ndim == 1:
        have = np.unique(lab)
        per = {int(c): len(np.unique(idx[lab[idx] == c])) for c in have}
        short = {c: k for c, k in per.items() if k < min(min_per_class, int((lab == c).sum()))}
        if short:
            worst = min(short, key=lambda c: short[c])
            reason = (
                f"the plain draw left {len(short)} class(es) below {min_per_class} distinct items for "
                f"class-balanced batches (class {worst}: {short[worst]} of {int((lab == worst).sum())})"
            )
            kind = "stratified"
            idx = _draw(n, seed, lab)
    return idx, BootstrapDraw(int(seed), int(n), kind, reason, int(len(np.unique(idx))), _sha(idx))
