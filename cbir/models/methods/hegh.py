"""HEGH: hard example guided hashing (Su et al., "Hard Example Guided Hashing for Image
Retrieval").

* Backbone with CBAM (Woo et al. 2018, :mod:`cbir.models.cbam`): ``cbam_blocks`` (default three,
  their Table 2) stacked CBAM blocks placed at ``backbone.post_stage[cbam_stage]`` (default 0:
  after the first stage; the paper puts them after the second layer of an 8-layer CNN, and placing
  them later cost 0.022-0.042 mAP in its Tables 1-2), on that stage's channels (reduction
  ``cbam_reduction``, 7x7 spatial kernel).
* Hard weights once the classifier can classify (the paper's "certain classification ability",
  §3.3(1)): with ``gamma_after_acc = a > 0`` the loss uses ``gamma = 0`` until the EMA
  (``acc_momentum``) of the training-batch accuracy reaches ``a``, then the configured ``gamma``
  (with ``weight_norm="none"``: eq. 4 literally); ``hard_on`` is logged and saved.
* Hash layer: linear -> tanh (relaxed codes ``b`` in (-1, 1)); classification head: linear class
  logits on the same pooled features (``classifier_on="codes"``: on the relaxed codes ``b``).
* Loss: :class:`cbir.losses.HEGHLoss` (eqs. 1-6), all unordered pairs of the minibatch; the
  hard degree uses ``q_{i|j}`` = softmax probability that image ``i`` has image ``j``'s label
  (similar pair: ``P = 1 - p_i[y_i]``; dissimilar: ``P = p_i[y_j]``), detached.
* Codes: bit ``k`` = ``b_k > 0`` in model order; confidence ``|b_k|``.

Observed from a random init (no pretrained backbone): with ``m`` classes ``p ~ 1/m`` at first,
so similar pairs start with weight ``~(1 - 1/m)^2`` and dissimilar ones with ``~1/m^2``; with
``gamma = 1`` and the literal eq. 4 (``weight_norm="none"``) the pairs are then almost only
attracted and the codes collapse (one code for the whole CIFAR subset after 25 steps; digits
likewise). The default ``weight_norm="group"`` normalises the hard weights within the similar
and within the dissimilar pairs (see :class:`cbir.losses.HEGHLoss`). With ``gamma = 0`` the contrastive loss
trains but plateaus in a few antipodal clusters at small budgets (digits, convnet, 16 bits,
6 epochs: mAP@1000 0.11, 1.2 % unique codes; Regu reaches 0.25 in the same budget).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cbir.losses import HEGHLoss
from cbir.models.base import HashingMethod
from cbir.models.cbam import stacked_cbam
from cbir.models.heads import ClassHead
from cbir.models.methods.common import HashLayer, free_bit_layout
from cbir.models.registry import MethodSpec, register_method

log = logging.getLogger(__name__)


@dataclass
class HEGHParams:
    """HEGH eqs. 4-6 weights (gamma=1, lambda=0.01, mu=1) and the CBAM placement."""

    gamma: float = 1.0
    lam: float = 0.01
    mu: float = 1.0
    margin: float = 0.0  # 0 -> m_c = 2k (k = bits)
    squared_hinge: bool = True
    weight_norm: str = "group"  # "group" or "none" (eq. 4 literally), see cbir.losses.HEGHLoss
    cbam_blocks: int = 3
    cbam_reduction: int = 16
    cbam_stage: int = 0  # CBAM after backbone stage i (the paper: after the second layer, i.e. early)
    gamma_after_acc: float = 0.0  # hard weights (gamma) only once the classifier reaches this batch accuracy
    acc_momentum: float = 0.9  # EMA of the training-batch accuracy that gamma_after_acc is compared with
    classifier_on: str = "features"  # the classifier reads the pooled "features" or the relaxed "codes"

    def __post_init__(self):
        if not self.gamma >= 0 or not self.lam >= 0 or not self.mu >= 0:
            raise ValueError("gamma, lam and mu must be >= 0")
        if self.margin < 0:
            raise ValueError("margin must be >= 0 (0 means m_c = 2k)")
        if self.cbam_blocks < 0:
            raise ValueError("cbam_blocks must be >= 0 (0 disables CBAM)")
        if self.cbam_reduction < 1:
            raise ValueError("cbam_reduction must be >= 1")
        if self.cbam_stage < 0:
            raise ValueError("cbam_stage must be >= 0 (index of the backbone stage CBAM follows)")
        if self.classifier_on not in ("features", "codes"):
            raise ValueError(f"classifier_on must be 'features' or 'codes', got {self.classifier_on!r}")
        if not 0 <= self.gamma_after_acc <= 1 or not 0 <= self.acc_momentum < 1:
            raise ValueError("gamma_after_acc must be in [0, 1] and acc_momentum in [0, 1)")
        HEGHLoss(
            self.gamma, self.lam, self.mu, self.margin or None, self.squared_hinge, self.weight_norm
        )  # validates weight_norm


class HEGH(HashingMethod):
    def __init__(self, spec: MethodSpec, params: HEGHParams):
        backbone = spec.make_backbone()
        if params.cbam_blocks > 0:
            i = params.cbam_stage
            if i >= len(backbone.stages):
                raise ValueError(
                    f"cbam_stage={i}: backbone {spec.backbone!r} has {len(backbone.stages)} stage(s); "
                    "choose a smaller cbam_stage or cbam_blocks=0"
                )
            backbone.post_stage[i] = stacked_cbam(backbone.stage_channels[i], params.cbam_blocks, params.cbam_reduction)
        super().__init__(backbone, free_bit_layout(spec, "hegh"))
        self.hash_layer = HashLayer(self.backbone.feature_dim, self.nbits)
        in_dim = self.nbits if params.classifier_on == "codes" else self.backbone.feature_dim
        self.head = ClassHead(in_dim, spec.num_classes)
        self.params = params
        self.criterion = HEGHLoss(
            params.gamma, params.lam, params.mu, params.margin or None, params.squared_hinge, params.weight_norm
        )
        # EMA of the training-batch accuracy; the hard weights switch on once it reaches gamma_after_acc
        self.register_buffer("batch_accuracy", torch.zeros(()))
        self.register_buffer("hard_on", torch.tensor(params.gamma_after_acc <= 0))

    @property
    def class_head(self):
        """The classifier a CE warm start copies (``--init-from``): the hard degrees then come
        from a classifier with the "certain classification ability" of §3.3(1) from step 0."""
        return self.head

    def head_loss(self, feat, targets):
        """Eqs. 1-6 on pooled features: the image stage runs it on ``backbone(images)``; with
        ``--freeze-backbone`` it fits the hash layer and the classifier on cached features
        (give ``cbam_blocks=0`` there: frozen CBAM blocks would stay at their random init)."""
        b = self.hash_layer(feat)
        logits = self.head(b if self.params.classifier_on == "codes" else feat)
        if not bool(self.hard_on) and targets.ndim == 1:
            acc = (logits.detach().argmax(1) == targets).float().mean()
            m = self.params.acc_momentum
            self.batch_accuracy.mul_(m).add_(acc * (1 - m))
            if float(self.batch_accuracy) >= self.params.gamma_after_acc:
                self.hard_on.fill_(True)
        self.criterion.gamma = self.params.gamma if bool(self.hard_on) else 0.0
        loss, logs = self.criterion(b, logits, targets)
        logs["hard_on"] = float(self.hard_on)
        return loss, logs

    def before_head_fit(self, feats, targets):
        if self.params.cbam_blocks > 0:
            log.warning(
                "hegh with a frozen backbone: its %d CBAM block(s) are not trained on cached features "
                "(they keep the weights they were given); pass --param cbam_blocks=0 to fit the head "
                "on the plain backbone features",
                self.params.cbam_blocks,
            )
        return None

    def encode(self, images):
        b = self.hash_layer(self.backbone(images))
        return b > 0, b.abs()


@register_method("hegh", params=HEGHParams, description="Hard example guided hashing with CBAM (Su et al.)")
def hegh(spec: MethodSpec, params: HEGHParams) -> HashingMethod:
    return HEGH(spec, params)
