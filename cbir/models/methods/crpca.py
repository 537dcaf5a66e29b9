"""CrPCA baseline (Darlow 2022, PhD thesis, §3.3.1): classifier backbone features, then a tree of
repeated PCA splits.

Design (the simplest honest reading): the backbone is trained exactly like the ``ce`` method
(ClassHead + cross-entropy, :class:`~cbir.models.methods.common.CEFeatureMethod`); after
training, ``finalize`` fits a complete binary tree of depth ``T = min(B, max_depth)`` on the
pooled backbone features of the training set (eval transform):

* every node (heap order: root 0, children ``2n+1`` = bit 0, ``2n+2`` = bit 1) takes the images
  that reached it, computes the first principal component ``w_n`` of their features (SVD of the
  centred node matrix, sign fixed so that its largest-magnitude entry is positive) and the
  median ``t_n`` of the projections ``f . w_n`` (for ``n`` values sorted ``v``, the midpoint
  ``(v[n//2 - 1] + v[n//2]) / 2``, so ``floor(n/2)`` images go left and ``ceil(n/2)`` right);
* a node with fewer than 2 images gets ``w = 0``, ``t = 0`` (everything goes left, confidence 0).

Encoding descends from the root: bit ``j`` = ``f . w_n > t_n`` at the node ``n`` visited at depth
``j`` (bit 0 = root split, most important). Per-bit confidence: ``erf(|f . w_n - t_n| /
(sigma_n sqrt 2))`` with ``sigma_n`` the std of the node's training projections. Directions,
medians and spreads are float64 buffers of shape ``(2^T - 1, ...)``, saved in the checkpoint.

Bits beyond the tree depth (``B > max_depth``): the training set cannot support deeper splits
(4,660 CIFAR-subset images give ~1 image per leaf at depth 12), so those bits are constant 0 with
confidence 0 — they change neither Hamming nor lexicographic ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cbir.models.base import HashingMethod
from cbir.models.methods.common import CEFeatureMethod, free_bit_layout, gaussian_confidence
from cbir.models.registry import MethodSpec, register_method

MAX_TREE_DEPTH = 16


class RecursivePCA(nn.Module):
    """Depth-``depth`` tree of PCA median splits over ``dim``-dimensional features."""

    def __init__(self, dim: int, depth: int):
        super().__init__()
        if not 1 <= depth <= MAX_TREE_DEPTH:
            raise ValueError(f"recursive PCA depth must be in 1..{MAX_TREE_DEPTH}, got {depth}")
        n_nodes = (1 << depth) - 1
        self.depth = depth
        self.register_buffer("directions", torch.zeros(n_nodes, dim, dtype=torch.float64))
        self.register_buffer("thresholds", torch.zeros(n_nodes, dtype=torch.float64))
        self.register_buffer("scales", torch.ones(n_nodes, dtype=torch.float64))

    @torch.no_grad()
    def fit(self, feats: torch.Tensor) -> torch.Tensor:
        """Fit every node on ``feats`` (``(N, dim)``); returns the leaf index of each row."""
        x = feats.detach().to("cpu", torch.float64)
        node = torch.zeros(x.shape[0], dtype=torch.long)
        dirs = torch.zeros_like(self.directions, device="cpu")
        thr = torch.zeros_like(self.thresholds, device="cpu")
        scl = torch.ones_like(self.scales, device="cpu")
        for level in range(self.depth):
            for n in range((1 << level) - 1, (1 << (level + 1)) - 1):
                idx = torch.nonzero(node == n).flatten()
                if idx.numel() < 2:
                    continue
                xs = x[idx]
                xc = xs - xs.mean(0, keepdim=True)
                _, _, vh = torch.linalg.svd(xc, full_matrices=False)
                w = vh[0]
                w = w * torch.sign(w[w.abs().argmax()])
                p = xs @ w
                v = torch.sort(p).values
                k = v.numel() // 2
                dirs[n], thr[n] = w, 0.5 * (v[k - 1] + v[k])
                s = float(p.std())
                scl[n] = s if s > 0 else 1.0
            node = self._step(x, node, dirs, thr)[0]
        self.directions.copy_(dirs)
        self.thresholds.copy_(thr)
        self.scales.copy_(scl)
        return node - ((1 << self.depth) - 1)

    @staticmethod
    def _step(x, node, dirs, thr):
        p = (x * dirs[node]).sum(1)
        bit = p > thr[node]
        return 2 * node + 1 + bit.long(), bit, p - thr[node]

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bits (N, depth) bool, conf (N, depth) float32)``."""
        x = feats.to(self.directions.dtype)
        node = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        bits, confs = [], []
        for _ in range(self.depth):
            cur = node
            node, bit, margin = self._step(x, node, self.directions, self.thresholds)
            fitted = self.directions[cur].abs().sum(1) > 0
            bits.append(bit)
            confs.append(torch.where(fitted, gaussian_confidence(margin, self.scales[cur]), torch.zeros_like(margin)))
        return torch.stack(bits, 1), torch.stack(confs, 1).float()


@dataclass
class CrPCAParams:
    """Tree depth cap and whether to train the backbone (CE) before fitting."""

    max_depth: int = 12
    train_backbone: bool = True

    def __post_init__(self):
        if not 1 <= self.max_depth <= MAX_TREE_DEPTH:
            raise ValueError(f"max_depth must be in 1..{MAX_TREE_DEPTH} (2^max_depth - 1 stored nodes)")


class CrPCA(CEFeatureMethod):
    def __init__(self, spec: MethodSpec, params: CrPCAParams):
        super().__init__(spec, free_bit_layout(spec, "crpca", default=params.max_depth), params.train_backbone)
        self.params = params
        self.tree = RecursivePCA(self.backbone.feature_dim, min(self.nbits, params.max_depth))

    @torch.no_grad()
    def finalize_features(self, feats) -> None:
        self.tree.fit(feats)

    def encode(self, images):
        bits, conf = self.tree(self.backbone(images))
        pad = self.nbits - bits.shape[1]
        if pad:
            bits = torch.cat([bits, bits.new_zeros(bits.shape[0], pad)], 1)
            conf = torch.cat([conf, conf.new_zeros(conf.shape[0], pad)], 1)
        return bits, conf


@register_method(
    "crpca", params=CrPCAParams, description="CE backbone features + recursive PCA median splits (Darlow 2022, §3.3.1)"
)
def crpca(spec: MethodSpec, params: CrPCAParams) -> HashingMethod:
    return CrPCA(spec, params)
