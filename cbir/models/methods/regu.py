"""Regu / DPSH: DMUH's ablation baseline (Fu et al., Pattern Recognition 2021, eq. 4), which is
DPSH (Li et al., IJCAI 2016): backbone -> linear -> tanh codes ``h``, trained with the pairwise
likelihood + ``beta ||h - b||^2`` quantisation (:class:`cbir.losses.DPSHLoss`: all ordered pairs
of the minibatch, pair sum divided by ``N (N - 1)``, quantisation sum by ``N * ref_pairs``), no
momentum net, no uncertainty.

Codes: bit ``k`` = ``h_k > 0`` in model order (no bit has priority). Per-bit confidence:
``|h_k|`` (the tanh magnitude, in [0, 1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbir.losses import DPSHLoss
from cbir.models.base import HashingMethod
from cbir.models.methods.common import HashLayer, free_bit_layout
from cbir.models.registry import MethodSpec, register_method


@dataclass
class ReguParams:
    """DPSH quantisation weight (DMUH eq. 4; the paper uses beta = 50) and its normaliser."""

    beta: float = 50.0
    ref_pairs: float = 5000.0

    def __post_init__(self):
        DPSHLoss(self.beta, self.ref_pairs)  # validates


class HashNet(HashingMethod):
    """backbone -> :class:`HashLayer` (tanh, or linear); bits ``h > 0``, confidence ``|h|``
    (clipped to 1 for a linear layer). ``head_loss`` on cached features (``--freeze-backbone``)
    is the subclass's criterion on ``hash_layer(feats)``."""

    def __init__(self, spec: MethodSpec, method: str, activation: str = "tanh"):
        super().__init__(spec.make_backbone(), free_bit_layout(spec, method))
        self.hash_layer = HashLayer(self.backbone.feature_dim, self.nbits, activation)

    def codes(self, images: torch.Tensor) -> torch.Tensor:
        return self.hash_layer(self.backbone(images))

    def encode(self, images):
        h = self.codes(images)
        return h > 0, h.abs().clamp(max=1)


class Regu(HashNet):
    def __init__(self, spec: MethodSpec, params: ReguParams):
        super().__init__(spec, "regu")
        self.params = params
        self.criterion = DPSHLoss(params.beta, params.ref_pairs)

    def head_loss(self, feats, targets):
        return self.criterion(self.hash_layer(feats), targets)


@register_method("regu", params=ReguParams, description="Regu/DPSH: pairwise likelihood + quantisation (DMUH eq. 4)")
def regu(spec: MethodSpec, params: ReguParams) -> HashingMethod:
    return Regu(spec, params)
