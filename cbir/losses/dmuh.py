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
"""

from __future__ import annotations

import torch
from torch import nn

from cbir.losses.dpsh import pairwise_likelihood_terms
from cbir.losses.pairs import check_codes, hard_bits, similarity_matrix

__all__ = ["DMUHLoss"]


class DMUHLoss(nn.Module):
    """Uncertainty-weighted DPSH (DMUH eq. 10); see the module docstring."""

    def __init__(self, beta: float = 50.0, gamma: float = 1.0, detach_weights: bool = True, ref_pairs: float = 5000.0):
        super().__init__()
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
        logs = {
            "pair": float(pair.detach()),
            "quant": float(quant.detach()),
            "uncert": float(unc.detach()),
            "mean_u": float(u.detach().mean()),
        }
        return pair + quant + unc, logs
