"""Per-class NT-Xent on DDTL leaf probabilities (Darlow 2022, ch. 3, eqs. 3.15-3.17).

SimCLR's NT-Xent (Chen et al. 2020) is applied *within each class of the minibatch*: for the
``n_c`` images of class ``c`` the two augmented views give ``2 n_c`` leaf-probability vectors
``z``. With ``sim(a, b) = a.b / (|a| |b|)`` (cosine) and temperature ``tau``, anchor ``i`` with
positive ``p(i)`` (the other view of the same image) has loss::

    l_i = -log( exp(sim(z_i, z_p(i)) / tau) / sum_{j in class c, j != i} exp(sim(z_i, z_j) / tau) )

The class loss is the mean of ``l_i`` over its ``2 n_c`` anchors; the returned loss is the mean
over the classes present with ``n_c >= 2`` (a class with one image has no negative: its loss is
identically 0 and it is left out of the average). Negatives are other images *of the same class*,
so the loss spreads a class over many leaves (hash coverage) while the positive keeps an image's
leaf stable under augmentation (robustness). For multi-label data a "class" is a distinct label
set.

Under ``torchrun`` (:mod:`cbir.distributed.ddp`, inside ``ddp.global_batch()``) the classes are
those of the *global* batch: ``z1``, ``z2`` and ``targets`` are all-gathered over the ranks first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cbir.distributed import ddp

__all__ = ["PerClassNTXent", "group_ids"]


def group_ids(targets: torch.Tensor) -> torch.Tensor:
    """Class index per item: the label itself, or the id of the distinct label set (multi-label)."""
    if targets.ndim == 1:
        return targets.long()
    _, inv = torch.unique(targets.round().long(), dim=0, return_inverse=True)
    return inv


class PerClassNTXent(nn.Module):
    """NT-Xent restricted to same-class pairs, averaged over classes (see module docstring)."""

    def __init__(self, tau: float = 1.0):
        super().__init__()
        if not tau > 0:
            raise ValueError(f"tau must be > 0 (a temperature), got {tau}")
        self.tau = float(tau)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(f"z1 and z2 must both be (n, L); got {tuple(z1.shape)} and {tuple(z2.shape)}")
        if ddp.is_gathering():  # DDP: the term over the global batch (gradients reach the local rows)
            z1, z2, targets = ddp.gather_cat(z1), ddp.gather_cat(z2), ddp.gather_cat(targets)
        n = z1.shape[0]
        cls = group_ids(targets)
        if cls.shape[0] != n:
            raise ValueError(f"targets has {cls.shape[0]} rows for {n} items")
        # One (2 n_c x 2 n_c) similarity block per class: only same-class pairs enter the loss,
        # so the cost is sum_c n_c^2 L instead of n^2 L for the full matrix.
        order = torch.sort(cls, stable=True).indices
        sorted_cls = cls[order]
        uniq, counts = torch.unique_consecutive(sorted_cls, return_counts=True)
        losses = []
        start = 0
        for c_n in counts.tolist():
            idx = order[start : start + c_n]
            start += c_n
            if c_n < 2:
                continue
            z = F.normalize(torch.cat([z1[idx], z2[idx]], 0), dim=1)
            sim = z @ z.t() / self.tau
            eye = torch.eye(2 * c_n, dtype=torch.bool, device=z.device)
            pos_idx = torch.cat([torch.arange(c_n, 2 * c_n), torch.arange(0, c_n)]).to(z.device)
            pos = sim.gather(1, pos_idx[:, None])[:, 0]
            losses.append((torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1) - pos).mean())
        if not losses:
            return (z1.sum() + z2.sum()) * 0.0
        return torch.stack(losses).mean()
