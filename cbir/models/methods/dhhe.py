"""DHHE: deep hashing by discriminating hard examples (Yan et al., ACM MM 2019) — a
**reconstruction** from the abstract only.

backbone -> linear -> tanh codes ``h``, trained with :class:`cbir.losses.DualHingeLoss` (our
Gamma / symmetric-KL "dual hinge" reading; the formula and the reasoning are in that module's
docstring) + ``lam`` quantisation. Codes: bit ``k`` = ``h_k > 0`` in model order; confidence
``|h_k|``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cbir.losses import DualHingeLoss
from cbir.models.base import HashingMethod
from cbir.models.methods.regu import HashNet
from cbir.models.registry import MethodSpec, register_method


@dataclass
class DHHEParams:
    """Reconstructed dual-hinge parameters (normalised distances in [0, 1])."""

    delta_s: float = 0.25
    delta_d: float = 0.5
    tau: float = 0.2
    kappa: float = 1.0
    rho: float = 1.0
    lam: float = 0.1

    def __post_init__(self):
        DualHingeLoss(self.delta_s, self.delta_d, self.tau, self.kappa, self.rho, self.lam)  # validates


class DHHE(HashNet):
    def __init__(self, spec: MethodSpec, params: DHHEParams):
        super().__init__(spec, "dhhe")
        self.params = params
        self.criterion = DualHingeLoss(params.delta_s, params.delta_d, params.tau, params.kappa, params.rho, params.lam)

    def training_loss(self, images, targets):
        return self.criterion(self.codes(images), targets)


@register_method(
    "dhhe",
    params=DHHEParams,
    description="Deep hashing by discriminating hard examples (Yan et al. 2019), reconstructed loss",
)
def dhhe(spec: MethodSpec, params: DHHEParams) -> HashingMethod:
    return DHHE(spec, params)
