"""DMUH: deep momentum uncertainty hashing (Fu et al., Pattern Recognition 2021).

* Hashing net ``phi_h`` = backbone -> linear -> tanh (``coding="linear"``: no tanh, the paper's
  linear coding layer) (:class:`~cbir.models.methods.regu.HashNet`);
  momentum net ``phi_m`` = a deep copy of it (``momentum_backbone``, ``momentum_hash``) whose
  parameters have ``requires_grad = False``. After every optimiser step (``after_step``)
  ``theta_m <- alpha theta_m + (1 - alpha) theta_h`` for every parameter (eq. 5, ``alpha = 0.7``).
  The momentum net's BatchNorm running statistics are not averaged: they are updated by its own
  forward passes (it runs in the method's train/eval mode).
* Loss: :class:`cbir.losses.DMUHLoss` (eq. 10) with ``u = |h - m|`` (eq. 6), ``m`` computed
  without gradient; the uncertainty weights are detached by default (``detach_weights``).
* Encode: bit ``k`` = ``h_k > 0``; per-bit confidence ``1 - u_k / 2`` where ``u_k = |h_k - m_k|``
  (both codes are tanh outputs, so ``u`` lies in ``[0, 2)`` and the confidence in ``(0, 1]``).
* Bit order (``order_bits=True``, default): ``finalize`` measures each bit's mean uncertainty on
  the training set (eval transform) and stores the permutation sorting bits by *ascending* mean
  uncertainty in the buffer ``bit_perm`` (with the means in ``bit_uncertainty``); codes are
  emitted in that order (bit 0 = most certain), and the layout says ``bit_order="uncertainty"``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from cbir.losses import DMUHLoss
from cbir.models.base import HashingMethod
from cbir.models.methods.common import HASH_ACTIVATIONS
from cbir.models.methods.regu import HashNet
from cbir.models.registry import MethodSpec, register_method


@dataclass
class DMUHParams:
    """DMUH eq. 10 weights, eq. 5 momentum and bit ordering."""

    beta: float = 50.0
    gamma: float = 1.0
    alpha: float = 0.7
    detach_weights: bool = True
    order_bits: bool = True
    ref_pairs: float = 5000.0  # normaliser of the per-image sums, see cbir.losses.DMUHLoss
    balance_steps: int = 0  # > 0: balance the terms' magnitudes over the first steps (§5.2), see DMUHLoss
    max_scale: float = 1e3  # bound of the balancing scales
    coding: str = "tanh"  # coding layer: "tanh" or "linear"

    def __post_init__(self):
        if self.coding not in HASH_ACTIVATIONS:
            raise ValueError(f"coding must be one of {HASH_ACTIVATIONS}, got {self.coding!r}")
        if not self.beta >= 0 or not self.gamma >= 0:
            raise ValueError(f"beta and gamma must be >= 0, got beta={self.beta}, gamma={self.gamma}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha (momentum, eq. 5) must be in [0, 1), got {self.alpha}")
        self.loss()  # validates

    def loss(self) -> DMUHLoss:
        return DMUHLoss(self.beta, self.gamma, self.detach_weights, self.ref_pairs, self.balance_steps, self.max_scale)


class DMUH(HashNet):
    def __init__(self, spec: MethodSpec, params: DMUHParams):
        super().__init__(spec, "dmuh", params.coding)
        self.params = params
        self.criterion = params.loss()
        self.momentum_backbone = copy.deepcopy(self.backbone)
        self.momentum_hash = copy.deepcopy(self.hash_layer)
        for p in self._momentum_params():
            p.requires_grad_(False)
        self.register_buffer("bit_perm", torch.arange(self.nbits, dtype=torch.long))
        self.register_buffer("bit_uncertainty", torch.zeros(self.nbits))

    def _momentum_params(self):
        return list(self.momentum_backbone.parameters()) + list(self.momentum_hash.parameters())

    def _hash_params(self):
        return list(self.backbone.parameters()) + list(self.hash_layer.parameters())

    def momentum_codes(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.momentum_hash(self.momentum_backbone(images))

    def uncertainty(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, u)`` with ``u = |h - m|`` (eq. 6)."""
        h = self.codes(images)
        return h, (h - self.momentum_codes(images)).abs()

    def training_loss(self, images, targets):
        h, u = self.uncertainty(images)
        loss, logs = self.criterion(h, u, targets)
        logs["bit_uncertainty"] = float(u.detach().mean())  # mean |h - m| over bits and images
        return loss, logs

    def head_loss(self, feats, targets):
        """On cached features of the frozen backbone: the momentum backbone equals it (it starts
        as a copy and the EMA of a constant is the constant), so ``m = momentum_hash(feats)``."""
        h = self.hash_layer(feats)
        with torch.no_grad():
            m = self.momentum_hash(feats)
        u = (h - m).abs()
        loss, logs = self.criterion(h, u, targets)
        logs["bit_uncertainty"] = float(u.detach().mean())
        return loss, logs

    def head_parameters(self) -> list:
        return list(self.hash_layer.parameters())

    @torch.no_grad()
    def after_init(self) -> None:
        """A warm start copied weights into the hashing net: the momentum net starts equal to it."""
        for pm, ph in zip(self._momentum_params(), self._hash_params()):
            pm.copy_(ph)
        for bm, bh in zip(self.momentum_backbone.buffers(), self.backbone.buffers()):
            bm.copy_(bh)

    @torch.no_grad()
    def after_step(self) -> None:
        a = self.params.alpha
        for pm, ph in zip(self._momentum_params(), self._hash_params()):
            pm.mul_(a).add_(ph.detach(), alpha=1 - a)

    @torch.no_grad()
    def finalize(self, loader) -> None:
        if not self.params.order_bits:
            return
        total, n = torch.zeros(self.nbits, dtype=torch.float64, device=self.bit_perm.device), 0
        for batch in loader:
            images = batch.images[0] if isinstance(batch.images, (tuple, list)) else batch.images
            _, u = self.uncertainty(images)
            total += u.double().sum(0)
            n += u.shape[0]
        if n == 0:
            raise ValueError("DMUH finalize() got an empty training loader; cannot order bits")
        mean_u = (total / n).float()
        self.bit_uncertainty.copy_(mean_u)
        self.bit_perm.copy_(torch.sort(mean_u, stable=True).indices)
        self._layout = dataclasses.replace(self._layout, bit_order="uncertainty")

    def encode(self, images):
        h, u = self.uncertainty(images)
        perm = self.bit_perm
        return (h > 0)[:, perm], (1 - u / 2).clamp(0, 1)[:, perm]


@register_method("dmuh", params=DMUHParams, description="Deep momentum uncertainty hashing (Fu et al. 2021)")
def dmuh(spec: MethodSpec, params: DMUHParams) -> HashingMethod:
    return DMUH(spec, params)
