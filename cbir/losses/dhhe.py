"""DHHE "dual hinge loss" — a documented **reconstruction** (not the paper's equations).

Paper: Yan et al., "Deep Hashing by Discriminating Hard Examples", ACM MM 2019. Only the
abstract is available: a Gamma-distribution-based, symmetric-KL "dual hinge loss" that
penalises hard similar and hard dissimilar pairs *exponentially* and easy pairs *with a bound*.
Everything below is our reading of that sentence; the paper's exact equations may differ.

Reconstruction. For relaxed codes ``h`` (``(N, k)`` in ``[-1, 1]``, tanh outputs) the
normalised pair distance is ``x_ij = (k - h_i^T h_j) / (2k)`` in ``[0, 1]`` (the Hamming
distance / k for binary codes). Model a pair's distance by a Gamma distribution of shape
``kappa`` whose scale sits at the pair's margin times ``exp(s_ij)``, where ``s_ij`` is the
signed, temperature-scaled violation of that margin::

    s_ij = (x_ij - delta_s) / tau     if (i, j) is similar    (too far apart is hard)
    s_ij = (delta_d - x_ij) / tau     if (i, j) is dissimilar (too close is hard)

For two Gammas of equal shape ``kappa`` and scales ``theta_1, theta_2`` with ``r = theta_1 /
theta_2``, ``KL = kappa (r - 1 - ln r)``, so the *symmetric* KL is
``kappa (r + 1/r - 2) = 2 kappa (cosh(ln r) - 1)``. With ``ln r = s`` this is
``2 kappa (cosh s - 1)``: it grows like ``kappa e^|s|``, i.e. exponentially in the violation.
The *dual hinge* applies it only on the hard side of each margin (one hinge for similar, one
for dissimilar pairs) and gives pairs on the easy side a bounded term::

    l_ij = 2 kappa (cosh(max(s_ij, 0)) - 1) + rho * sigmoid(s_ij)

* hard pairs (``s > 0``): exponential penalty (plus at most ``rho``);
* easy pairs (``s <= 0``): ``rho * sigmoid(s)`` in ``(0, rho / 2]`` — bounded, and fading as a
  pair becomes easier, so easy pairs cannot dominate the batch.

``s`` is clamped to ``<= 20`` for numerical safety (unreachable for codes in ``[-1, 1]`` with the
defaults: ``s <= (1 - 0.25) / 0.2 = 3.75``). The loss is the mean of ``l`` over the similar
pairs plus the mean over the dissimilar pairs (all unordered pairs ``i < j`` of the minibatch;
the two means are taken separately so that the ~1:9 imbalance of a 10-class batch does not
drown the similar pairs; a kind absent from the batch contributes 0), plus a quantisation term
``lam * mean_{i,k} (h_ik - b_ik)^2`` with ``b = sign(h)``. Defaults: ``kappa = 1``,
``rho = 1``, ``tau = 0.2``, ``delta_s = 0.25``, ``delta_d = 0.5``, ``lam = 0.1``.
"""

from __future__ import annotations

import torch
from torch import nn

from cbir.losses.pairs import check_codes, hard_bits, similarity_matrix

__all__ = ["DualHingeLoss", "dual_hinge_terms"]


def dual_hinge_terms(
    x: torch.Tensor, sim: torch.Tensor, delta_s: float, delta_d: float, tau: float, kappa: float, rho: float
) -> torch.Tensor:
    """Per-pair ``l_ij`` (see the module docstring) for normalised distances ``x``."""
    s = torch.where(sim > 0.5, (x - delta_s) / tau, (delta_d - x) / tau).clamp(max=20.0)
    return 2 * kappa * (torch.cosh(s.clamp(min=0)) - 1) + rho * torch.sigmoid(s)


class DualHingeLoss(nn.Module):
    """Reconstructed DHHE loss (Gamma symmetric-KL dual hinge); see the module docstring."""

    def __init__(
        self,
        delta_s: float = 0.25,
        delta_d: float = 0.5,
        tau: float = 0.2,
        kappa: float = 1.0,
        rho: float = 1.0,
        lam: float = 0.1,
    ):
        super().__init__()
        if not 0 <= delta_s < delta_d <= 1:
            raise ValueError(f"need 0 <= delta_s < delta_d <= 1 (normalised distances), got {delta_s}, {delta_d}")
        if not tau > 0 or not kappa > 0:
            raise ValueError(f"tau and kappa must be > 0, got tau={tau}, kappa={kappa}")
        if not rho >= 0 or not lam >= 0:
            raise ValueError(f"rho and lam must be >= 0, got rho={rho}, lam={lam}")
        self.delta_s, self.delta_d, self.tau = float(delta_s), float(delta_d), float(tau)
        self.kappa, self.rho, self.lam = float(kappa), float(rho), float(lam)

    def forward(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        check_codes(h, targets, "DualHingeLoss")
        n, k = h.shape
        sim = similarity_matrix(targets)
        x = (k - h @ h.t()) / (2 * k)
        terms = dual_hinge_terms(x, sim, self.delta_s, self.delta_d, self.tau, self.kappa, self.rho)
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=h.device), diagonal=1)
        pos, neg = upper & (sim > 0.5), upper & (sim <= 0.5)
        zero = h.sum() * 0.0
        l_sim = terms[pos].mean() if bool(pos.any()) else zero
        l_dis = terms[neg].mean() if bool(neg.any()) else zero
        quant = self.lam * (h - hard_bits(h)).pow(2).mean()
        return l_sim + l_dis + quant, {
            "sim": float(l_sim.detach()),
            "dissim": float(l_dis.detach()),
            "quant": float(quant.detach()),
        }
