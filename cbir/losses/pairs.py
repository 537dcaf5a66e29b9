"""Pair helpers shared by the pairwise hashing losses (DPSH/DMUH, HEGH, DHHE).

* ``similarity_matrix(targets)``: ``S_ij = 1`` when items ``i`` and ``j`` share a label (equal
  class index, or at least one common label for multi-hot targets), else 0; float ``(N, N)``.
* ``hard_bits(h)``: ``b = +1`` where ``h > 0`` and ``-1`` elsewhere (the bits the codes use:
  bit = ``h > 0``); unlike ``torch.sign`` it never returns 0, and it carries no gradient.
"""

from __future__ import annotations

import torch

__all__ = ["similarity_matrix", "hard_bits", "check_codes"]


def similarity_matrix(targets: torch.Tensor) -> torch.Tensor:
    """``(N,)`` class indices or ``(N, m)`` multi-hot -> ``(N, N)`` float 0/1 similarity."""
    if targets.ndim == 1:
        return (targets[:, None] == targets[None, :]).float()
    if targets.ndim == 2:
        t = (targets > 0.5).float()
        return (t @ t.t() > 0).float()
    raise ValueError(f"targets must be (N,) class indices or (N, m) multi-hot, got shape {tuple(targets.shape)}")


def hard_bits(h: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``h > 0`` else ``-1`` (detached)."""
    return torch.where(h.detach() > 0, 1.0, -1.0).to(h.dtype)


def check_codes(h: torch.Tensor, targets: torch.Tensor, name: str) -> None:
    if h.ndim != 2:
        raise ValueError(f"{name}: codes must be (N, B), got shape {tuple(h.shape)}")
    if targets.shape[0] != h.shape[0]:
        raise ValueError(f"{name}: {targets.shape[0]} targets for {h.shape[0]} codes; pass one target per row")
    if h.shape[0] < 2:
        raise ValueError(f"{name}: a pairwise loss needs at least 2 items per batch, got {h.shape[0]}")
