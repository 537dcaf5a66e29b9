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

__all__ = [
    "DDTLHead",
    "leaf_log_probs",
    "greedy_path",
    "ClassHead",
    "split_depth",
    "forest_leaf_probs",
    "forest_greedy_path",
    "node_slices",
]


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
    """Class logits ``g2`` and node logits ``g1`` of a forest of ``tree_depths`` (module docstring).

    ``class_bias=True`` (single-label only; our extension) adds a learned per-class offset to every
    node logit, selected by the *predicted* class (argmax of ``g2``, the class bits of the code):
    ``u = g1(f) + b[argmax g2(f)]``. One tree then holds a threshold per class at every node, so a
    node can split each class that reaches it in half (see ``fit_pca_median_tree``).
    """

    def __init__(self, in_dim: int, num_classes: int, depth: int, max_tree_depth: int = 12, class_bias: bool = False):
        super().__init__()
        if not 1 <= depth <= 256:
            raise ValueError(f"path depth must be in 1..256 bits, got {depth}")
        self.depth = depth
        self.tree_depths = split_depth(depth, max_tree_depth)
        self.g2 = ClassHead(in_dim, num_classes)
        n_nodes = sum((1 << d) - 1 for d in self.tree_depths)
        self.g1 = nn.Linear(in_dim, n_nodes)
        self.class_bias = nn.Parameter(torch.zeros(num_classes, n_nodes)) if class_bias else None

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        class_logits = self.g2(feat)
        node_logits = self.g1(feat)
        if self.class_bias is not None:
            node_logits = node_logits + self.class_bias[class_logits.detach().argmax(1)]
        return class_logits, node_logits


@torch.no_grad()
def fit_pca_median_tree(head: DDTLHead, feats: torch.Tensor, sharpness: float = 4.0) -> dict:
    """Initialise ``head``'s trees by class-wise median splits along within-class principal directions.

    Top-down over the training features ``feats`` (``(N, F)``, eval view), with ``c`` the
    predicted class of each item: at every node, ``w`` = the leading eigenvector of the pooled
    within-class covariance of the items that reach it (the parent's ``w`` when fewer than two items
    do), and, with ``head.class_bias``, the bias of class ``c`` = minus the median of ``w . x`` over
    the items of class ``c`` at the node, so that each class splits in half at each node it reaches
    (CrPCA's repeated median split, thesis §3.3.1, done within each class); without
    ``class_bias`` the bias is the median over all items at the node. ``w`` is scaled by
    ``sharpness / std(w . x)`` so the node probabilities are saturated. Returns counts for the log.
    """
    if feats.ndim != 2 or feats.shape[1] != head.g1.in_features:
        raise ValueError(f"expected (N, {head.g1.in_features}) features, got {tuple(feats.shape)}")
    x = feats.double()
    cls = head.g2(feats).argmax(1)
    weight = torch.zeros_like(head.g1.weight, dtype=torch.float64)
    bias = torch.zeros(head.g1.out_features, dtype=torch.float64)
    cbias = None if head.class_bias is None else torch.zeros_like(head.class_bias, dtype=torch.float64)
    fitted = 0
    for sl, d in zip(node_slices(head.tree_depths), head.tree_depths):
        node = torch.zeros(len(x), dtype=torch.long)  # heap index within this tree
        parent_w = None
        ws: dict[int, torch.Tensor] = {}
        for level in range(d):
            first = (1 << level) - 1
            for j in range(first, 2 * first + 1):
                m = node == j
                xs, cs = x[m], cls[m]
                pw = ws.get((j - 1) // 2, parent_w) if j else None
                if len(xs) >= 2:
                    centred = xs.clone()
                    for c in torch.unique(cs):
                        mc = cs == c
                        centred[mc] -= xs[mc].mean(0)
                    cov = centred.t() @ centred / len(xs)
                    w = torch.linalg.eigh(cov).eigenvectors[:, -1]
                    if pw is not None and float(w @ pw) < 0:
                        w = -w  # keep a stable orientation down the tree
                    fitted += 1
                elif pw is not None:
                    w = pw
                else:
                    w = torch.linalg.eigh(torch.cov(x.t())).eigenvectors[:, -1]
                ws[j] = w
                proj = xs @ w
                scale = sharpness / float(proj.std()) if len(xs) >= 2 and float(proj.std()) > 0 else sharpness
                weight[sl.start + j] = w * scale
                if len(xs):
                    bias[sl.start + j] = -float(proj.median()) * scale
                if cbias is not None:
                    cbias[:, sl.start + j] = bias[sl.start + j]
                    for c in torch.unique(cs):
                        pc = proj[cs == c]
                        cbias[c, sl.start + j] = -float(pc.median()) * scale
                    cbias[:, sl.start + j] -= bias[sl.start + j]  # g1's bias holds the shared part
            u = (x * weight[sl.start + node]).sum(1) + bias[sl.start + node]
            if cbias is not None:
                u = u + cbias[cls, sl.start + node]
            node = 2 * node + 1 + (u > 0).long()
    head.g1.weight.copy_(weight.to(head.g1.weight.dtype))
    head.g1.bias.copy_(bias.to(head.g1.bias.dtype))
    if cbias is not None:
        head.class_bias.copy_(cbias.to(head.class_bias.dtype))
    return {"nodes_fitted": fitted, "nodes": int(head.g1.out_features)}
