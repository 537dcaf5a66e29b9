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

Frozen features (``--freeze-backbone``, DDTL's two-stage mode). A method that can fit its head on
cached backbone features implements

* ``head_loss(feats, targets) -> (loss, logs)``: ``feats`` is a ``(n, F)`` tensor, or a pair of
  them (two augmented views) when ``head_two_views``; ``training_loss`` then defaults to
  ``head_loss`` on ``backbone(images)``;
* ``head_parameters()``: what the head stage optimises (default: everything but the backbone);
* ``finalize_features(feats)`` (optional): ``finalize`` on cached eval-transform features;
* ``class_head`` (optional): the classifier layer a warm start may copy (``cbir.models.warmstart``);
* ``after_init()``: called after warm-start weights were copied in (DMUH syncs its momentum net).

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
    # integer division by powers of two rather than ``>>``: the same bits, and an op every
    # export target (ONNX) has
    powers = 2 ** torch.arange(nbits - 1, -1, -1, device=cls.device)
    return (torch.div(cls.long()[:, None], powers, rounding_mode="floor") % 2).bool()


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

    #: the classifier layer (``nn.Linear`` holder) a warm start may copy; None if the method has none.
    class_head: nn.Module | None = None

    @property
    def head_two_views(self) -> bool:
        return self.two_views

    def training_loss(self, images, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if isinstance(images, (tuple, list)):
            n = images[0].shape[0]
            f = self.backbone(torch.cat(list(images), 0))
            return self.head_loss((f[:n], f[n:]), targets)
        return self.head_loss(self.backbone(images), targets)

    def head_loss(self, feats, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError(
            f"{type(self).__name__} has no head_loss: it cannot be trained on cached features; drop --freeze-backbone"
        )

    def head_parameters(self) -> list:
        bb = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in bb and p.requires_grad]

    def after_init(self) -> None:
        """Hook run after warm-start weights were copied into the backbone (default: nothing)."""

    def after_step(self) -> None:
        """Hook run after each optimiser step (default: nothing)."""

    def finalize(self, loader: Iterable) -> None:
        """Hook run once after training on the training set in eval transform (default: nothing)."""

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)
