"""Classification losses used by the class-bit heads.

* single-label: softmax cross-entropy;
* multi-label: binary cross-entropy on sigmoid outputs, or the asymmetric loss (ASL) of
  Ridnik et al., "Asymmetric Loss for Multi-Label Classification", ICCV 2021, eq. 7:
  ``L+ = (1 - p)^gamma_pos log(p)``, ``L- = p_m^gamma_neg log(1 - p_m)`` with the shifted
  probability ``p_m = max(p - clip, 0)``; the loss is ``-sum(y L+ + (1 - y) L-)`` averaged over
  the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AsymmetricLoss", "classification_loss"]


class AsymmetricLoss(nn.Module):
    """ASL (Ridnik et al. 2021, eq. 7) for multi-label logits and multi-hot targets."""

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05, eps: float = 1e-8):
        super().__init__()
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError("gamma_pos and gamma_neg must be >= 0")
        if not 0 <= clip < 1:
            raise ValueError("clip must be in [0, 1)")
        self.gamma_pos, self.gamma_neg, self.clip, self.eps = gamma_pos, gamma_neg, clip, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        pm = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        lp = targets * (1 - p).pow(self.gamma_pos) * torch.log(p.clamp(min=self.eps))
        ln = (1 - targets) * pm.pow(self.gamma_neg) * torch.log((1 - pm).clamp(min=self.eps))
        return -(lp + ln).sum(dim=1).mean()


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, multilabel: bool, asl: nn.Module | None = None
) -> torch.Tensor:
    """CE for class indices; BCE (or ``asl``) for multi-hot targets."""
    if multilabel:
        t = targets.float()
        return asl(logits, t) if asl is not None else F.binary_cross_entropy_with_logits(logits, t)
    return F.cross_entropy(logits, targets.long())
