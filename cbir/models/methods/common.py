"""Pieces shared by the free-bit methods (DMUH, Regu, HEGH, DHHE, CrPCA, ITQ, LSH).

* :func:`free_bit_layout`: ``CodeLayout(nbits=B, class_bits=0, depth=0, method=name)``, with
  ``B = spec.nbits`` or the method's default;
* :class:`HashLayer`: linear ``feature_dim -> B`` followed by ``tanh`` (relaxed codes in
  ``(-1, 1)``; bit = ``h > 0``);
* :class:`CEFeatureMethod`: a backbone trained with the CE classifier's head and loss (exactly
  the ``ce`` method's training), for the post-hoc baselines that fit a projection of the
  backbone features in ``finalize``; :func:`collect_features` gathers those features;
* :func:`gaussian_confidence`: ``erf(|z| / (sigma sqrt 2))`` in ``[0, 1)``, the confidence of a
  thresholded projection ``z`` whose training-set spread is ``sigma``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from cbir.codes import CodeLayout
from cbir.losses import classification_loss
from cbir.models.base import HashingMethod
from cbir.models.heads import ClassHead
from cbir.models.registry import MethodSpec

__all__ = [
    "free_bit_layout",
    "HashLayer",
    "HASH_ACTIVATIONS",
    "CEFeatureMethod",
    "collect_features",
    "gaussian_confidence",
    "DEFAULT_BITS",
]

DEFAULT_BITS = 32


def free_bit_layout(
    spec: MethodSpec, method: str, default: int = DEFAULT_BITS, max_bits: int | None = None
) -> CodeLayout:
    if spec.depth is not None:
        raise ValueError(f"{method} has no decision tree; give --bits instead of --depth")
    nbits = spec.nbits if spec.nbits is not None else default
    if nbits < 1:
        raise ValueError(f"{method}: --bits must be >= 1, got {nbits}")
    if max_bits is not None and nbits > max_bits:
        raise ValueError(f"{method}: at most {max_bits} bits for this backbone; lower --bits")
    return CodeLayout(
        nbits=nbits, class_bits=0, depth=0, multilabel=spec.multilabel, class_names=spec.class_names, method=method
    )


HASH_ACTIVATIONS = ("tanh", "linear")


class HashLayer(nn.Module):
    """``tanh(W f + c)``: relaxed codes in (-1, 1); ``activation="linear"``: ``W f + c`` (a linear
    coding layer, DMUH's option: the quantisation term alone pulls the codes to +-1)."""

    def __init__(self, in_dim: int, nbits: int, activation: str = "tanh"):
        super().__init__()
        if activation not in HASH_ACTIVATIONS:
            raise ValueError(f"hash layer activation must be one of {HASH_ACTIVATIONS}, got {activation!r}")
        self.fc = nn.Linear(in_dim, nbits)
        self.activation = activation

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        z = self.fc(feat)
        return torch.tanh(z) if self.activation == "tanh" else z


def gaussian_confidence(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return torch.erf(z.abs() / (sigma.clamp(min=1e-12) * math.sqrt(2.0))).clamp(0, 1)


@torch.no_grad()
def collect_features(backbone: nn.Module, loader: Iterable) -> torch.Tensor:
    feats = []
    for batch in loader:
        images = batch.images[0] if isinstance(batch.images, (tuple, list)) else batch.images
        feats.append(backbone(images).float())
    if not feats:
        raise ValueError("finalize() got an empty training loader; nothing to fit the projection on")
    return torch.cat(feats)


class CEFeatureMethod(HashingMethod):
    """Backbone + ClassHead trained with CE (as the ``ce`` method); subclasses fit a post-hoc code.

    ``train_backbone=False`` sets ``trainable = False`` so the engine skips gradient training and
    the projection is fitted on the randomly initialised backbone (an unsupervised floor).
    """

    def __init__(self, spec: MethodSpec, layout, train_backbone: bool = True):
        """``layout``: a :class:`CodeLayout`, or a function of the backbone's feature dimension."""
        backbone = spec.make_backbone()
        if callable(layout):
            layout = layout(backbone.feature_dim)
        super().__init__(backbone, layout)
        self.head = ClassHead(self.backbone.feature_dim, spec.num_classes)
        self.multilabel = spec.multilabel
        self.trainable = bool(train_backbone)

    @property
    def class_head(self):
        return self.head

    def head_loss(self, feats, targets):
        logits = self.head(feats)
        loss = classification_loss(logits, targets, self.multilabel, None)
        return loss, {"ce": float(loss.detach())}

    def finalize(self, loader) -> None:
        self.finalize_features(collect_features(self.backbone, loader))

    def finalize_features(self, feats: torch.Tensor) -> None:
        """Fit the post-hoc code on ``(N, F)`` training-set features (eval transform)."""
        raise NotImplementedError
