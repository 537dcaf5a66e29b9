"""Losses: one small ``nn.Module`` (or function) per paper; see each module's docstring."""

from cbir.losses.classification import AsymmetricLoss, classification_loss
from cbir.losses.contrastive import PerClassNTXent, group_ids

__all__ = ["AsymmetricLoss", "classification_loss", "PerClassNTXent", "group_ids"]
