"""DMUH loss: Fu et al., "Deep momentum uncertainty hashing", Pattern Recognition 2021, **eqs. 6,
7 and 10**.

With hashing-net codes ``h_i`` and momentum-net codes ``m_i`` (``(N, B)``), bit uncertainty
``u_i = |h_i - m_i|`` (eq. 6), image uncertainty ``ubar_i = mean_k u_ik`` (eq. 7), hard bits
``b_i = sign(h_i)``, ``Theta_ij = 1/2 h_i^T h_j`` and ``S_ij = 1`` for pairs sharing a label::

    L = -sum_{i != j} exp(ubar_i + ubar_j) (S_ij Theta_ij - log(1 + exp(Theta_ij)))
        + beta  * sum_i sum_k exp(u_ik) (h_ik - b_ik)^2
        + gamma * sum_i sum_k u_ik                                          (eq. 10)

Normalisation, as for :class:`cbir.losses.DPSHLoss`: the pair sum (all ordered pairs ``i != j``
of the minibatch) is divided by ``N (N - 1)``; the two per-image sums (quantisation and
uncertainty) by ``N * ref_pairs`` (default 5,000: in DPSH, which DMUH builds on, the pair sum
runs over minibatch x training set, ~5,000 images in the CIFAR-10 protocol, while the per-image
sums run over the minibatch; this is our reading of the scale at which ``beta = 50``,
``gamma = 1`` were set — dividing everything by ``N (N - 1)`` instead lets ``beta = 50`` swamp
the pair term and collapses the codes). With ``u = 0`` the loss is exactly eq. 4 (DPSH/Regu).

Gradient of the uncertainty weights: with ``detach_weights=True`` (default, the stable reading)
the weights ``exp(ubar_i + ubar_j)`` and ``exp(u_ik)`` are constants for back-propagation, so
the network cannot lower the loss by shrinking its own uncertainty through the weights; the
``gamma * sum u`` term always carries gradient (through ``h``: the momentum codes ``m`` come from
a net without gradients), pulling the hashing net towards its momentum average. With
``detach_weights=False`` the weights are differentiated too.

Balancing (§5.2: beta and gamma are chosen "by balancing the magnitude" of the terms). With
``balance_steps = T > 0`` the first ``T`` training-mode calls use the normalisation above and
record the mean magnitudes of the three terms; from then on the quantisation and uncertainty
terms are multiplied by fixed scales ``s_q = |pair| / quant`` and ``s_u = |pair| / uncert`` (the
means over those ``T`` calls; each clipped to ``[1 / max_scale, max_scale]``, and 1 where a term
was 0), so that all three start at the pair term's magnitude. Without it the uncertainty term
is ~1e-4 of the pair term at the paper's gamma = 1 and the run is in effect the paper's
"without uncertainty" ablation. The scales are logged (``scale_quant``, ``scale_uncert``); they
are training state only (not saved: a resumed run recalibrates).
"""

from __future__ import annotations

import torch
from torch import nn

from cbir.losses.dpsh import pairwise_likelihood_terms
from cbir.losses.pairs import check_codes, hard_bits, similarity_matrix

__all__ = ["DMUHLoss"]


class DMUHLoss(nn.Module):
    """Uncertainty-weighted DPSH (DMUH eq. 10); see the module docstring."""

    def __init__(
        self,
        beta: float = 50.0,
        gamma: float = 1.0,
        detach_weights: bool = True,
        ref_pairs: float = 5000.0,
        balance_steps: int = 0,
        max_scale: float = 1e3,
    ):
        super().__init__()
        if balance_steps < 0:
            raise ValueError(f"balance_steps must be >= 0 (0 turns magnitude balancing off), got {balance_steps}")
        if not max_scale >= 1:
            raise ValueError(f"max_scale (bound of the balancing scales) must be >= 1, got {max_scale}")
        self.balance_steps, self.max_scale = int(balance_steps), float(max_scale)
        self.register_buffer("scales", torch.ones(2, dtype=torch.float64), persistent=False)
        self.register_buffer("magnitudes", torch.zeros(3, dtype=torch.float64), persistent=False)
        self.calls = 0
        if not ref_pairs > 0:
            raise ValueError(
                f"ref_pairs (pairs per image the per-image terms are normalised by) must be > 0, got {ref_pairs}"
            )
        self.ref_pairs = float(ref_pairs)
        if not beta >= 0:
            raise ValueError(f"beta (quantisation weight) must be >= 0, got {beta}")
        if not gamma >= 0:
            raise ValueError(f"gamma (uncertainty weight) must be >= 0, got {gamma}")
        self.beta, self.gamma, self.detach_weights = float(beta), float(gamma), bool(detach_weights)

    def forward(self, h: torch.Tensor, u: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        check_codes(h, targets, "DMUHLoss")
        if u.shape != h.shape:
            raise ValueError(
                f"DMUHLoss: uncertainty u must have the codes' shape {tuple(h.shape)}, got {tuple(u.shape)}"
            )
        n = h.shape[0]
        npairs = n * (n - 1)
        w_u = u.detach() if self.detach_weights else u
        ubar = w_u.mean(1)
        pair_w = torch.exp(ubar[:, None] + ubar[None, :])
        pair = (pair_w * pairwise_likelihood_terms(h, similarity_matrix(targets))).sum() / npairs
        quant = self.beta * (torch.exp(w_u) * (h - hard_bits(h)).pow(2)).sum() / (n * self.ref_pairs)
        unc = self.gamma * u.sum() / (n * self.ref_pairs)
        if self.balance_steps and self.training and self.calls < self.balance_steps:
            self._calibrate(pair, quant, unc)
        s_q, s_u = (float(v) for v in self.scales)
        quant, unc = quant * s_q, unc * s_u
        logs = {
            "pair": float(pair.detach()),
            "quant": float(quant.detach()),
            "uncert": float(unc.detach()),
            "mean_u": float(u.detach().mean()),
        }
        if self.balance_steps:
            logs.update(scale_quant=s_q, scale_uncert=s_u)
        return pair + quant + unc, logs

    @torch.no_grad()
    def _calibrate(self, pair: torch.Tensor, quant: torch.Tensor, unc: torch.Tensor) -> None:
        """Record one call's term magnitudes; after ``balance_steps`` calls fix the scales."""
        self.magnitudes += torch.stack([pair.abs(), quant.abs(), unc.abs()]).double().cpu().to(self.magnitudes)
        self.calls += 1
        if self.calls == self.balance_steps:
            p, q, u = (float(v) / self.calls for v in self.magnitudes)
            lo, hi = 1.0 / self.max_scale, self.max_scale
            self.scales.copy_(
                torch.tensor([min(hi, max(lo, p / v)) if v > 0 else 1.0 for v in (q, u)], dtype=torch.float64)
            )
