"""Heads shared by the methods.

``DDTLHead`` is the deep decision tree layer of Darlow, "Deep hashing for ... retrieval" (PhD
thesis, Edinburgh 2022), ch. 3:

* ``g2``: linear layer -> ``m`` class logits (softmax; sigmoid per label for multi-label);
* ``g1``: linear layer -> ``2^d - 1`` internal-node logits ``u`` of a complete binary tree of
  depth ``d`` in heap order (root 0; the children of node ``n`` are ``2n+1`` (left, bit 0) and
  ``2n+2`` (right, bit 1));
* leaf probability (eq. 3.5): ``z_k = prod_{j=1..d} sigma(u_{n_j})^{s_j} (1 - sigma(u_{n_j}))^{1 - s_j}``
  over the root-to-leaf path ``n_1..n_d`` of leaf ``k`` whose binary digits (MSB first) are
  ``s_1..s_d``; computed in log space, vectorised over all leaves (``leaf_log_probs``);
* hash path (eqs. 3.6-3.7): greedy descent from the root, ``s_j = 1[sigma(u_{n_j}) > 0.5]``,
  ``n_{j+1} = 2 n_j + 1 + s_j`` (``greedy_path``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DDTLHead", "leaf_log_probs", "greedy_path", "ClassHead"]


def leaf_log_probs(node_logits: torch.Tensor, depth: int) -> torch.Tensor:
    """``(N, 2^d - 1)`` node logits -> ``(N, 2^d)`` log leaf probabilities (eq. 3.5).

    Leaf ``k`` is reached by the path whose bits (MSB first) are the binary digits of ``k``.
    """
    n_nodes = (1 << depth) - 1
    if node_logits.shape[-1] != n_nodes:
        raise ValueError(f"expected {n_nodes} node logits for depth {depth}, got {node_logits.shape[-1]}")
    logp = node_logits.new_zeros(node_logits.shape[0], 1)
    for level in range(depth):
        u = node_logits[:, (1 << level) - 1 : (1 << (level + 1)) - 1]  # (N, 2^level), left-to-right
        left, right = F.logsigmoid(-u), F.logsigmoid(u)
        logp = torch.stack([logp + left, logp + right], dim=2).reshape(node_logits.shape[0], -1)
    return logp


def greedy_path(node_logits: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard decision path (eqs. 3.6-3.7): ``(bits (N, d) bool, nodes (N, d) long)``."""
    n = node_logits.shape[0]
    node = torch.zeros(n, dtype=torch.long, device=node_logits.device)
    bits, nodes = [], []
    for _ in range(depth):
        nodes.append(node)
        s = node_logits.gather(1, node[:, None])[:, 0] > 0
        bits.append(s)
        node = 2 * node + 1 + s.long()
    return torch.stack(bits, 1), torch.stack(nodes, 1)


class ClassHead(nn.Module):
    """Linear class logits (``g2``)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.fc(feat)


class DDTLHead(nn.Module):
    """Class logits ``g2`` and tree node logits ``g1`` (see module docstring)."""

    def __init__(self, in_dim: int, num_classes: int, depth: int):
        super().__init__()
        if not 1 <= depth <= 20:
            raise ValueError(f"tree depth must be in 1..20 (2^d leaves), got {depth}")
        self.depth = depth
        self.g2 = ClassHead(in_dim, num_classes)
        self.g1 = nn.Linear(in_dim, (1 << depth) - 1)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.g2(feat), self.g1(feat)
