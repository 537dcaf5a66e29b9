"""The contract between a hashing method and the one training engine.

A method is *backbone + head + loss*: a :class:`HashingMethod` owns a backbone, a head and a
criterion, and tells the engine

* ``two_views``: whether training batches carry two augmented views (contrastive losses);
* ``training_loss(images, targets) -> (loss, logs)``: one minibatch's loss;
* ``after_step()``: called after every optimiser step (DMUH's momentum update);
* ``finalize(loader)``: called once after training with a loader over the training set in the
  evaluation transform (fit CrPCA/ITQ projections, order DMUH bits by uncertainty, ...);
* ``encode(images) -> (bits, conf)``: hard bits (bool, ``(N, B)``, bit 0 most important) and
  per-bit confidence in [0, 1], in inference mode.

Anything a method learns outside gradient descent (projections, medians, bit orders) must be a
registered buffer of fixed shape so that it is saved in the checkpoint's ``state_dict``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from cbir.codes import CodeLayout

__all__ = ["HashingMethod", "binary_of_class"]


def binary_of_class(cls: torch.Tensor, nbits: int) -> torch.Tensor:
    """``(N,)`` class indices -> ``(N, nbits)`` bool, most significant bit first."""
    shifts = torch.arange(nbits - 1, -1, -1, device=cls.device)
    return ((cls.long()[:, None] >> shifts) & 1).bool()


class HashingMethod(nn.Module):
    """Base class of every registered method; see the module docstring for the contract."""

    two_views: bool = False
    #: False for methods that learn nothing by gradient descent (the engine skips training).
    trainable: bool = True

    def __init__(self, backbone: nn.Module, layout: CodeLayout):
        super().__init__()
        self.backbone = backbone
        self._layout = layout

    @property
    def layout(self) -> CodeLayout:
        return self._layout

    @property
    def nbits(self) -> int:
        return self._layout.nbits

    def training_loss(self, images, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook run after each optimiser step (default: nothing)."""

    def finalize(self, loader: Iterable) -> None:
        """Hook run once after training on the training set in eval transform (default: nothing)."""

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)
