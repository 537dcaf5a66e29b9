"""DPSH / "Regu": pairwise likelihood + quantisation (Li et al., "Feature learning based deep
supervised hashing with pairwise labels", IJCAI 2016), as restated by Fu et al., "Deep momentum
uncertainty hashing", Pattern Recognition 2021, **eq. 4** (their "Regu" ablation baseline).

With continuous codes ``h_i`` (``(N, B)``, here the tanh outputs of the hash layer), hard bits
``b_i = sign(h_i)`` (``+1`` where ``h > 0``, else ``-1``), ``Theta_ij = 1/2 h_i^T h_j`` and
``S_ij = 1`` when ``i`` and ``j`` share a label::

    L = -sum_{i != j} (S_ij Theta_ij - log(1 + exp(Theta_ij))) + beta * sum_i ||h_i - b_i||^2

Normalisation. The pair sum runs over all ordered pairs ``i != j`` of the minibatch and is
divided by their number ``N (N - 1)`` (a mean over pairs). The per-image sum is divided by
``N * n_ref`` (``n_ref = ref_pairs``, default 5,000): in DPSH (which DMUH builds on) the pair
sum runs over *minibatch x whole training set* (``N * n`` pairs, ``n`` ~ 5,000 CIFAR-10 training
images in the usual protocol) while the quantisation sum runs over the ``N`` minibatch images,
so each image's quantisation term carries the weight of ``1 / n`` of its pairs. Normalising the
two sums this way is our reading of the scale at which DMUH's ``beta = 50`` was set; dividing
both by ``N (N - 1)`` instead makes ``beta = 50`` dominate an in-batch pair term and collapses
the codes (we measured 0.5 % unique codes on digits). Relative to the mean pair term, each
image's ``||h_i - b_i||^2`` then has weight ``beta / n_ref = 0.01``.
``log(1 + e^x)`` is computed as ``softplus`` (stable for large ``|Theta|``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cbir.losses.pairs import check_codes, hard_bits, similarity_matrix

__all__ = ["DPSHLoss", "pairwise_likelihood_terms"]


def pairwise_likelihood_terms(h: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` negative log-likelihood per pair, ``log(1 + e^Theta) - S Theta``; diagonal 0."""
    theta = 0.5 * h @ h.t()
    nll = F.softplus(theta) - sim * theta
    eye = torch.eye(h.shape[0], dtype=torch.bool, device=h.device)
    return nll.masked_fill(eye, 0.0)


class DPSHLoss(nn.Module):
    """DMUH eq. 4 (DPSH): see the module docstring for the exact formula and normalisation."""

    def __init__(self, beta: float = 50.0, ref_pairs: float = 5000.0):
        super().__init__()
        if not beta >= 0:
            raise ValueError(f"beta (quantisation weight) must be >= 0, got {beta}")
        if not ref_pairs > 0:
            raise ValueError(
                f"ref_pairs (pairs per image the per-image terms are normalised by) must be > 0, got {ref_pairs}"
            )
        self.beta, self.ref_pairs = float(beta), float(ref_pairs)

    def forward(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        check_codes(h, targets, "DPSHLoss")
        n = h.shape[0]
        npairs = n * (n - 1)
        pair = pairwise_likelihood_terms(h, similarity_matrix(targets)).sum() / npairs
        quant = self.beta * (h - hard_bits(h)).pow(2).sum() / (n * self.ref_pairs)
        return pair + quant, {"pair": float(pair.detach()), "quant": float(quant.detach())}
