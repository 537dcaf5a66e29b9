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

Long codes (our extension, not in the thesis). One tree of depth ``d`` has ``2^d`` leaves, so
the leaf-probability vector is only affordable up to ``d ~ 12-16`` (the thesis uses 12). For
more path bits the head holds a *forest*: ``T = ceil(d / max_tree_depth)`` trees whose depths
differ by at most one (larger first, e.g. 44 path bits -> 4 trees of 11), all reading the same
features. The code is the concatenation of the trees' greedy paths in tree order (tree 0's
path is the most significant after the class bits, so prefix search refines first within tree
0), and the contrastive loss sees the concatenation of the trees' leaf-probability vectors
(``forest_leaf_probs``). With ``d <= max_tree_depth`` the forest is the thesis' single tree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DDTLHead", "leaf_log_probs", "greedy_path", "ClassHead", "split_depth", "forest_leaf_probs",
           "forest_greedy_path", "node_slices"]


def leaf_log_probs(node_logits: torch.Tensor, depth: int) -> torch.Tensor:
    """``(N, 2^d - 1)`` node logits -> ``(N, 2^d)`` log leaf probabilities (eq. 3.5).

    Leaf ``k`` is reached by the path whose bits (MSB first) are the binary digits of ``k``.
    """
    n_nodes = (1 << depth) - 1
    if node_logits.shape[-1] != n_nodes:
        raise ValueError(f"expected {n_nodes} node logits for depth {depth}, got {node_logits.shape[-1]}")
    n = node_logits.shape[0]
    right_all = F.logsigmoid(node_logits)  # log sigma(u); log sigma(-u) = log sigma(u) - u
    both = torch.stack([right_all - node_logits, right_all], dim=2)  # (N, nodes, 2): left, right
    logp = node_logits.new_zeros(n, 1)
    for level in range(depth):
        lr = both[:, (1 << level) - 1 : (1 << (level + 1)) - 1]  # (N, 2^level, 2), nodes left-to-right
        logp = (logp[:, :, None] + lr).reshape(n, -1)
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


def split_depth(depth: int, max_tree_depth: int) -> list[int]:
    """Depths of the forest holding ``depth`` path bits (see the module docstring)."""
    if depth < 1:
        raise ValueError(f"path depth must be >= 1, got {depth}")
    if not 1 <= max_tree_depth <= 16:
        raise ValueError(f"max_tree_depth must be in 1..16 (2^d leaves per tree), got {max_tree_depth}")
    n_trees = -(-depth // max_tree_depth)
    base, extra = divmod(depth, n_trees)
    return [base + (1 if t < extra else 0) for t in range(n_trees)]


def node_slices(depths: list[int]) -> list[slice]:
    out, start = [], 0
    for d in depths:
        out.append(slice(start, start + (1 << d) - 1))
        start += (1 << d) - 1
    return out


def forest_leaf_probs(node_logits: torch.Tensor, depths: list[int]) -> torch.Tensor:
    """Concatenated leaf probabilities of the forest's trees: ``(N, sum_t 2^d_t)``."""
    return torch.cat([leaf_log_probs(node_logits[:, sl], d).exp() for sl, d in zip(node_slices(depths), depths)], 1)


def forest_greedy_path(node_logits: torch.Tensor, depths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy paths of every tree, concatenated: ``(bits (N, sum d) bool, nodes (N, sum d) long)``.

    ``nodes`` index columns of the full ``node_logits`` (each tree's heap indices are offset by the
    node count of the trees before it).
    """
    bits, nodes = [], []
    for sl, d in zip(node_slices(depths), depths):
        b, nd = greedy_path(node_logits[:, sl], d)
        bits.append(b)
        nodes.append(nd + sl.start)
    return torch.cat(bits, 1), torch.cat(nodes, 1)


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
    """Class logits ``g2`` and node logits ``g1`` of a forest of ``tree_depths`` (module docstring)."""

    def __init__(self, in_dim: int, num_classes: int, depth: int, max_tree_depth: int = 12):
        super().__init__()
        if not 1 <= depth <= 256:
            raise ValueError(f"path depth must be in 1..256 bits, got {depth}")
        self.depth = depth
        self.tree_depths = split_depth(depth, max_tree_depth)
        self.g2 = ClassHead(in_dim, num_classes)
        self.g1 = nn.Linear(in_dim, sum((1 << d) - 1 for d in self.tree_depths))

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.g2(feat), self.g1(feat)
