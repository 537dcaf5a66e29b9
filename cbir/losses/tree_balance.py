"""Per-class node balance of a soft decision tree (Frosst & Hinton 2017, "Distilling a Neural
Network Into a Soft Decision Tree", sec. 4, eq. 4), computed within each class of the minibatch.

Frosst & Hinton penalise every inner node ``i`` whose (reach-weighted) routing ``alpha_i`` is far
from an even split::

    alpha_i = sum_x P_i(x) p_i(x) / sum_x P_i(x),      C = -lambda sum_i 2^{-depth(i)} (0.5 log alpha_i + 0.5 log(1 - alpha_i))

with ``P_i(x)`` the probability that ``x`` reaches node ``i`` (product of the routing
probabilities along the path) and ``p_i(x) = sigma(u_i(x))`` its probability of going right.
Here ``alpha`` is computed over the items of *one class* (DDTL's class bits already separate the
classes; the path bits should spread each class over the leaves), and the class terms are
averaged. Levels are weighted ``decay^level`` (the paper's ``decay = 0.5``) and normalised to sum to 1, so the
loss is ``log 2 = 0.693`` for a perfectly balanced tree and grows as a class piles into one side
of a node. ``alpha`` is clamped to ``[1e-6, 1 - 1e-6]``. Only levels where a class of ``n_c`` items
still has at least ``min_items`` items per node on average (``2^level <= n_c / min_items``) are
used: deeper nodes are estimated from too few items.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PerClassNodeBalance"]


class PerClassNodeBalance(nn.Module):
    """See the module docstring."""

    def __init__(self, min_items: float = 2.0, decay: float = 0.5):
        super().__init__()
        if not min_items > 0:
            raise ValueError(f"min_items must be > 0, got {min_items}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.min_items = float(min_items)
        self.decay = float(decay)

    def forward(self, node_logits: torch.Tensor, depth: int, targets: torch.Tensor) -> torch.Tensor:
        from cbir.losses.contrastive import group_ids

        n_nodes = (1 << depth) - 1
        if node_logits.ndim != 2 or node_logits.shape[1] != n_nodes:
            raise ValueError(f"expected (n, {n_nodes}) node logits for depth {depth}, got {tuple(node_logits.shape)}")
        cls = group_ids(targets)
        classes, counts = torch.unique(cls, return_counts=True)
        levels_of = [
            min(depth, int(math.floor(math.log2(max(int(nc) / self.min_items, 1.0)))) + 1) for nc in counts.tolist()
        ]
        top = max(levels_of)
        used = node_logits[:, : (1 << top) - 1]  # only the levels some class can estimate
        right = F.logsigmoid(used)
        left = right - used
        sig = torch.sigmoid(used)
        n = used.shape[0]
        # log reach probabilities of the used nodes, level by level (heap order)
        reach = [used.new_zeros(n, 1)]
        for level in range(top - 1):
            sl = slice((1 << level) - 1, (1 << (level + 1)) - 1)
            r = reach[-1]
            reach.append(torch.stack([r + left[:, sl], r + right[:, sl]], dim=2).reshape(n, -1))
        reach_p = torch.cat(reach, 1).exp()  # (n, used nodes)
        losses = []
        for c, levels in zip(classes, levels_of):
            m = cls == c
            pr, sg = reach_p[m], sig[m]
            total, wsum = 0.0, 0.0
            for level in range(levels):
                sl = slice((1 << level) - 1, (1 << (level + 1)) - 1)
                mass = pr[:, sl].sum(0)
                alpha = ((pr[:, sl] * sg[:, sl]).sum(0) / mass.clamp_min(1e-12)).clamp(1e-6, 1 - 1e-6)
                w = mass / mass.sum()  # a node's share of the class at that level
                ce = -(0.5 * alpha.log() + 0.5 * (1 - alpha).log())
                total = total + self.decay**level * (w * ce).sum()
                wsum += self.decay**level
            losses.append(total / wsum)
        return torch.stack(losses).mean()
