"""CE-only baseline: a classifier whose code is the class bits alone (no tree, no free bits).

Single-label: ``ceil(log2 m)`` bits, the binary of the argmax class (MSB first), confidence =
top-1 minus top-2 softmax probability. Multi-label: one bit per label (sigmoid > 0.5),
confidence ``|2p - 1|``. This is the "class bits + no tree" comparison of Darlow 2022, ch. 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbir.codes import CodeLayout, class_bits_for
from cbir.losses import AsymmetricLoss, classification_loss
from cbir.models.base import HashingMethod, binary_of_class
from cbir.models.heads import ClassHead
from cbir.models.registry import MethodSpec, register_method


def class_code(logits: torch.Tensor, multilabel: bool, nbits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class bits and their confidence from class logits."""
    if multilabel:
        p = torch.sigmoid(logits)
        return p > 0.5, (2 * p - 1).abs()
    p = torch.softmax(logits, 1)
    top2 = p.topk(min(2, p.shape[1]), dim=1).values
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
    bits = binary_of_class(p.argmax(1), nbits)
    return bits, margin[:, None].expand(-1, nbits)


@dataclass
class CEParams:
    """Hyper-parameters of the CE-only baseline."""

    multilabel_loss: str = "bce"  # "bce" or "asl" (asymmetric loss, Ridnik et al. 2021)

    def __post_init__(self):
        if self.multilabel_loss not in ("bce", "asl"):
            raise ValueError("multilabel_loss must be 'bce' or 'asl'")


class CEClassifier(HashingMethod):
    def __init__(self, spec: MethodSpec, params: CEParams):
        nbits = spec.num_classes if spec.multilabel else class_bits_for(spec.num_classes)
        if spec.nbits not in (None, nbits):
            raise ValueError(
                f"the CE-only code has exactly {nbits} class bits for {spec.num_classes} classes; drop --bits"
            )
        layout = CodeLayout(
            nbits=nbits,
            class_bits=nbits,
            depth=0,
            multilabel=spec.multilabel,
            class_names=spec.class_names,
            method="ce",
        )
        super().__init__(spec.make_backbone(), layout)
        self.head = ClassHead(self.backbone.feature_dim, spec.num_classes)
        self.multilabel = spec.multilabel
        self.asl = AsymmetricLoss() if params.multilabel_loss == "asl" else None

    @property
    def class_head(self):
        return self.head

    def head_loss(self, feats, targets):
        logits = self.head(feats)
        loss = classification_loss(logits, targets, self.multilabel, self.asl)
        return loss, {"ce": float(loss.detach())}

    def encode(self, images):
        return class_code(self.head(self.backbone(images)), self.multilabel, self.nbits)


@register_method("ce", params=CEParams, description="CE-only classifier codes (class bits only)")
def ce(spec: MethodSpec, params: CEParams) -> HashingMethod:
    return CEClassifier(spec, params)
