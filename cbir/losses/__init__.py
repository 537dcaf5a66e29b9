"""Losses: one small ``nn.Module`` (or function) per paper; see each module's docstring."""

from cbir.losses.classification import AsymmetricLoss, classification_loss
from cbir.losses.contrastive import PerClassNTXent, group_ids
from cbir.losses.dhhe import DualHingeLoss
from cbir.losses.dmuh import DMUHLoss
from cbir.losses.dpsh import DPSHLoss
from cbir.losses.hegh import HEGHLoss
from cbir.losses.pairs import hard_bits, similarity_matrix
from cbir.losses.tree_balance import PerClassNodeBalance

__all__ = [
    "AsymmetricLoss",
    "classification_loss",
    "PerClassNTXent",
    "group_ids",
    "DPSHLoss",
    "DMUHLoss",
    "HEGHLoss",
    "DualHingeLoss",
    "similarity_matrix",
    "hard_bits",
    "PerClassNodeBalance",
]
