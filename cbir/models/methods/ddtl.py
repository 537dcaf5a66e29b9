"""DDTL: deep decision tree layer hashing (Darlow 2022, PhD thesis, Edinburgh, ch. 3).

Code = class bits (binary of the argmax class, or one bit per label) followed by the greedy
root-to-leaf decision path of a soft decision tree over the backbone features (eqs. 3.5-3.7,
see :mod:`cbir.models.heads`).

Loss (eqs. 3.15-3.17): ``alpha * CE(class logits of both views) + beta * NT-Xent`` on the
leaf-probability vectors of the two augmented views, computed within each class of the
minibatch and averaged (:class:`cbir.losses.PerClassNTXent`). No quantisation loss is needed:
the code is read off the tree's decisions. Defaults alpha=1, beta=0.1, tau=1, d=12.

More than ``max_tree_depth`` (default 12) path bits are held by a forest of balanced trees whose
paths are concatenated (our extension for long codes, see :mod:`cbir.models.heads`).

Per-bit confidence at encode time: class bits get the class-probability margin (top-1 minus
top-2; ``|2p - 1|`` per label for multi-label), path bits ``|2 sigma(u) - 1|`` of the node
visited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbir.codes import CodeLayout, class_bits_for
from cbir.losses import AsymmetricLoss, PerClassNTXent, classification_loss
from cbir.models.base import HashingMethod
from cbir.models.heads import DDTLHead, forest_greedy_path, forest_leaf_probs, split_depth
from cbir.models.methods.ce import class_code
from cbir.models.registry import MethodSpec, register_method

DEFAULT_DEPTH = 12


@dataclass
class DDTLParams:
    """DDTL loss weights (thesis eq. 3.17) and temperature."""

    alpha: float = 1.0
    beta: float = 0.1
    tau: float = 1.0
    multilabel_loss: str = "bce"  # "bce" or "asl"
    max_tree_depth: int = 12  # more path bits -> a forest of trees (cbir.models.heads.split_depth)

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0:
            raise ValueError("alpha and beta must be >= 0")
        if self.tau <= 0:
            raise ValueError("tau must be > 0")
        if self.multilabel_loss not in ("bce", "asl"):
            raise ValueError("multilabel_loss must be 'bce' or 'asl'")
        split_depth(1, self.max_tree_depth)  # validates max_tree_depth (1..16)


def ddtl_depth(spec: MethodSpec, class_bits: int) -> int:
    if spec.depth is not None:
        if spec.nbits is not None and spec.nbits != class_bits + spec.depth:
            raise ValueError(
                f"--bits {spec.nbits} disagrees with {class_bits} class bits + --depth {spec.depth}; give one of them"
            )
        return spec.depth
    if spec.nbits is not None:
        depth = spec.nbits - class_bits
        if depth < 1:
            raise ValueError(
                f"DDTL needs more than {class_bits} bits ({class_bits} class bits + >= 1 path bit); got --bits {spec.nbits}"
            )
        return depth
    return DEFAULT_DEPTH


class DDTL(HashingMethod):
    two_views = True

    def __init__(self, spec: MethodSpec, params: DDTLParams):
        cbits = spec.num_classes if spec.multilabel else class_bits_for(spec.num_classes)
        depth = ddtl_depth(spec, cbits)
        layout = CodeLayout(nbits=cbits + depth, class_bits=cbits, depth=depth, multilabel=spec.multilabel,
                            class_names=spec.class_names, method="ddtl")
        super().__init__(spec.make_backbone(), layout)
        self.head = DDTLHead(self.backbone.feature_dim, spec.num_classes, depth, params.max_tree_depth)
        self.params = params
        self.multilabel = spec.multilabel
        self.contrastive = PerClassNTXent(params.tau)
        self.asl = AsymmetricLoss() if params.multilabel_loss == "asl" else None

    def training_loss(self, images, targets):
        x1, x2 = images
        n = x1.shape[0]
        class_logits, node_logits = self.head(self.backbone(torch.cat([x1, x2], 0)))
        ce = classification_loss(class_logits, torch.cat([targets, targets], 0), self.multilabel, self.asl)
        z = forest_leaf_probs(node_logits, self.head.tree_depths)
        con = self.contrastive(z[:n], z[n:], targets)
        loss = self.params.alpha * ce + self.params.beta * con
        return loss, {"ce": float(ce.detach()), "ntxent": float(con.detach())}

    def encode(self, images):
        class_logits, node_logits = self.head(self.backbone(images))
        cbits, cconf = class_code(class_logits, self.multilabel, self.layout.class_bits)
        pbits, nodes = forest_greedy_path(node_logits, self.head.tree_depths)
        pconf = (2 * torch.sigmoid(node_logits.gather(1, nodes)) - 1).abs()
        return torch.cat([cbits, pbits], 1), torch.cat([cconf, pconf], 1)


@register_method("ddtl", params=DDTLParams, description="Deep decision tree layer hashing (Darlow 2022, ch. 3)")
def ddtl(spec: MethodSpec, params: DDTLParams) -> HashingMethod:
    return DDTL(spec, params)
