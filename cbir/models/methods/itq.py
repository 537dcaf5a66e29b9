"""ITQ baseline: iterative quantisation (Gong & Lazebnik, CVPR 2011 / TPAMI 2013) on backbone
features.

Design: the backbone is trained like the ``ce`` method (ClassHead + cross-entropy) unless
``train_backbone=False`` (then the engine skips training: ITQ on a random backbone, an
unsupervised floor). ``finalize`` fits, on the pooled training-set features ``X`` (eval
transform): the mean ``mu``, the top-``B`` principal directions ``W`` (``(F, B)``, by descending
eigenvalue) and an orthogonal rotation ``R`` (``(B, B)``) minimising ``||sign(V R) - V R||_F``
with ``V = (X - mu) W``, by ``iterations`` alternations of ``Bc = sign(V R)`` and the
orthogonal Procrustes step ``U S Vt = svd(V^T Bc)``, ``R = U Vt`` (from a seeded random
orthogonal start). Bit ``k`` = ``((f - mu) W R)_k > 0`` in model order; confidence
``erf(|z_k| / (sigma_k sqrt 2))`` with ``sigma_k`` the training std of ``z_k``. ``B`` must not
exceed the backbone's feature dimension (default ``B = min(32, F)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbir.models.base import HashingMethod
from cbir.models.methods.common import DEFAULT_BITS, CEFeatureMethod, free_bit_layout, gaussian_confidence
from cbir.models.registry import MethodSpec, register_method


@dataclass
class ITQParams:
    """ITQ iterations, rotation seed and whether to train the backbone (CE) first."""

    iterations: int = 50
    seed: int = 0
    train_backbone: bool = True

    def __post_init__(self):
        if self.iterations < 0:
            raise ValueError("iterations must be >= 0")


def itq_rotation(v: torch.Tensor, iterations: int, seed: int) -> torch.Tensor:
    """Orthogonal ``R`` (``(B, B)``) locally minimising ``||sign(V R) - V R||_F``."""
    b = v.shape[1]
    g = torch.Generator().manual_seed(seed)
    r, _ = torch.linalg.qr(torch.randn(b, b, generator=g, dtype=v.dtype))
    for _ in range(iterations):
        codes = torch.where(v @ r > 0, 1.0, -1.0).to(v.dtype)
        u, _, vt = torch.linalg.svd(v.t() @ codes)
        r = u @ vt
    return r


class ITQ(CEFeatureMethod):
    def __init__(self, spec: MethodSpec, params: ITQParams):
        super().__init__(
            spec, lambda dim: free_bit_layout(spec, "itq", default=min(DEFAULT_BITS, dim)), params.train_backbone
        )
        self.params = params
        f, b = self.backbone.feature_dim, self.nbits
        if b > f:
            raise ValueError(
                f"ITQ projects {f}-dimensional {spec.backbone} features onto B principal directions, "
                f"so --bits must be <= {f}; got {b}"
            )
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("pca", torch.zeros(f, b))
        self.register_buffer("rotation", torch.eye(b))
        self.register_buffer("scale", torch.ones(b))

    @torch.no_grad()
    def finalize_features(self, feats) -> None:
        x = feats.to("cpu", torch.float64)
        mu = x.mean(0)
        xc = x - mu
        evals, evecs = torch.linalg.eigh(xc.t() @ xc / max(1, x.shape[0] - 1))
        w = evecs[:, torch.argsort(evals, descending=True)[: self.nbits]]
        v = xc @ w
        r = itq_rotation(v, self.params.iterations, self.params.seed)
        z = v @ r
        sd = z.std(0) if z.shape[0] > 1 else torch.ones(self.nbits, dtype=z.dtype)
        self.mean.copy_(mu)
        self.pca.copy_(w)
        self.rotation.copy_(r)
        self.scale.copy_(torch.where(sd > 0, sd, torch.ones_like(sd)))

    def encode(self, images):
        z = (self.backbone(images).float() - self.mean) @ self.pca @ self.rotation
        return z > 0, gaussian_confidence(z, self.scale)


@register_method(
    "itq", params=ITQParams, description="Iterative quantisation on backbone features (Gong & Lazebnik 2011)"
)
def itq(spec: MethodSpec, params: ITQParams) -> HashingMethod:
    return ITQ(spec, params)
