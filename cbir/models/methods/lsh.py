"""LSH baseline: random-hyperplane hashing (Charikar 2002) of backbone features.

Design: the backbone is trained like the ``ce`` method (ClassHead + cross-entropy) unless
``train_backbone=False`` (the engine then skips training: LSH on a random backbone, the
unsupervised floor). ``B`` hyperplane normals ``w_k ~ N(0, I)`` (``(F, B)``) are drawn in
``__init__`` from a generator seeded with ``seed`` and stored as a buffer; ``finalize`` centres
them on the training-set feature mean ``mu`` (so bits are balanced-ish rather than constant for
non-negative pooled ReLU features) and records each projection's training std ``sigma_k``.
Bit ``k`` = ``(f - mu) . w_k > 0`` in model order; confidence ``erf(|z_k| / (sigma_k sqrt 2))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbir.models.base import HashingMethod
from cbir.models.methods.common import CEFeatureMethod, free_bit_layout, gaussian_confidence
from cbir.models.registry import MethodSpec, register_method


@dataclass
class LSHParams:
    """Hyperplane seed and whether to train the backbone (CE) first."""

    seed: int = 0
    train_backbone: bool = True


class LSH(CEFeatureMethod):
    def __init__(self, spec: MethodSpec, params: LSHParams):
        super().__init__(spec, free_bit_layout(spec, "lsh"), params.train_backbone)
        self.params = params
        f, b = self.backbone.feature_dim, self.nbits
        g = torch.Generator().manual_seed(params.seed)
        self.register_buffer("planes", torch.randn(f, b, generator=g))
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("scale", torch.ones(b))

    @torch.no_grad()
    def finalize_features(self, feats) -> None:
        x = feats
        mu = x.mean(0)
        z = (x - mu) @ self.planes
        sd = z.std(0) if z.shape[0] > 1 else torch.ones_like(self.scale)
        self.mean.copy_(mu)
        self.scale.copy_(torch.where(sd > 0, sd, torch.ones_like(sd)))

    def encode(self, images):
        z = (self.backbone(images).float() - self.mean) @ self.planes
        return z > 0, gaussian_confidence(z, self.scale)


@register_method("lsh", params=LSHParams, description="Random-hyperplane LSH on backbone features")
def lsh(spec: MethodSpec, params: LSHParams) -> HashingMethod:
    return LSH(spec, params)
