"""DDTL: deep decision tree layer hashing (Darlow 2022, PhD thesis, Edinburgh, ch. 3).

Code = class bits (binary of the argmax class, or one bit per label) followed by the greedy
root-to-leaf decision path of a soft decision tree over the backbone features (eqs. 3.5-3.7,
see :mod:`cbir.models.heads`).

Loss (eqs. 3.15-3.17): ``alpha * CE(class logits of both views) + beta * NT-Xent`` on the
leaf-probability vectors of the two augmented views, computed within each class of the
minibatch and averaged (:class:`cbir.losses.PerClassNTXent`). No quantisation loss is needed:
the code is read off the tree's decisions. Defaults alpha=1, beta=0.1, tau=1, d=12.

More than ``max_tree_depth`` (default 12) path bits are held by a forest of balanced trees whose
paths are concatenated (our extension for long codes, see :mod:`cbir.models.heads`).

Two-stage mode (``two_stage=True``; thesis §3.3.3, "fitting the tree after representation
learning"): stage 1 trains backbone + class head with ``alpha * CE`` (plus ``rep_beta`` times the
per-class NT-Xent on the normalised backbone features of two views when ``rep_beta > 0``); stage 2
freezes both (stop-gradient: the class bits stay the stage-1 classifier's) and fits only the tree
``g1`` with ``beta * NT-Xent`` on cached features of augmented views (``cbir.data.features``),
in class-balanced P x K batches. The engine runs the two stages (``cbir.engine``); a warm start
(``--init-from`` a CE checkpoint) with ``--epochs 0`` skips stage 1.

Optional per-class node balance (``balance > 0``; our addition, Frosst & Hinton 2017 eq. 4 within
each class, :class:`cbir.losses.PerClassNodeBalance`): pushes every node a class reaches to split
that class evenly, so a class spreads over the leaves (hash coverage) even when the contrastive
term alone leaves it piled on a few paths. Under DDP it is computed over the global batch
(:meth:`DDTL.balance_term`); the monitoring statistics below are per rank, averaged over ranks.

Tree initialisation ``tree_init="pca"`` with ``class_bias=True`` (our addition for the two-stage
mode): before the tree stage's gradient steps the tree is set by class-wise median splits along
within-class principal directions of the cached features
(:func:`cbir.models.heads.fit_pca_median_tree`, CrPCA's split rule applied within each class),
so every class starts evenly spread over the leaves; the NT-Xent steps then fine-tune it.

Monitoring (logged per step, averaged per epoch in ``history.jsonl``): ``saturation`` = mean
``|2 sigma(u) - 1|`` over the nodes of the greedy paths, ``paths_per_class`` = mean over the
batch's classes of the number of distinct greedy paths, ``path_spread`` = the same divided by the
class's item count (1 = every item of a class on its own leaf).

Per-bit confidence at encode time: class bits get the class-probability margin (top-1 minus
top-2; ``|2p - 1|`` per label for multi-label), path bits ``|2 sigma(u) - 1|`` of the node
visited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbir.codes import CodeLayout, class_bits_for
from cbir.distributed import ddp
from cbir.losses import AsymmetricLoss, PerClassNodeBalance, PerClassNTXent, classification_loss
from cbir.models.base import HashingMethod
from cbir.models.heads import (
    DDTLHead,
    fit_pca_median_tree,
    forest_greedy_path,
    forest_leaf_probs,
    node_slices,
    split_depth,
)
from cbir.models.methods.ce import class_code
from cbir.models.registry import MethodSpec, register_method

DEFAULT_DEPTH = 12


@dataclass
class DDTLParams:
    """DDTL loss weights (thesis eq. 3.17) and temperature."""

    alpha: float = 1.0
    beta: float = 0.1
    tau: float = 1.0
    multilabel_loss: str = "bce"  # "bce" or "asl"
    max_tree_depth: int = 12  # more path bits -> a forest of trees (cbir.models.heads.split_depth)
    two_stage: bool = False  # thesis §3.3.3: representation first, then the tree on frozen features
    rep_beta: float = 0.0  # stage-1 per-class NT-Xent weight on backbone features (two_stage only)
    balance: float = 0.0  # per-class node balance weight (Frosst & Hinton 2017 eq. 4; our addition)
    balance_decay: float = 0.5  # its per-level weight decay^level (the paper: 0.5)
    class_bias: bool = False  # per-class node offsets chosen by the predicted class (cbir.models.heads.DDTLHead)
    tree_init: str = "random"  # "random" or "pca": class-wise median splits on cached features (two-stage tree stage)

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0 or self.rep_beta < 0 or self.balance < 0:
            raise ValueError("alpha, beta, rep_beta and balance must be >= 0")
        PerClassNodeBalance(decay=self.balance_decay)  # validates balance_decay
        if self.tree_init not in ("random", "pca"):
            raise ValueError("tree_init must be 'random' or 'pca'")
        if self.tau <= 0:
            raise ValueError("tau must be > 0")
        if self.multilabel_loss not in ("bce", "asl"):
            raise ValueError("multilabel_loss must be 'bce' or 'asl'")
        split_depth(1, self.max_tree_depth)  # validates max_tree_depth (1..16)


def ddtl_depth(spec: MethodSpec, class_bits: int) -> int:
    if spec.depth is not None:
        if spec.nbits is not None and spec.nbits != class_bits + spec.depth:
            raise ValueError(
                f"--bits {spec.nbits} disagrees with {class_bits} class bits + --depth {spec.depth}; give one of them"
            )
        return spec.depth
    if spec.nbits is not None:
        depth = spec.nbits - class_bits
        if depth < 1:
            raise ValueError(
                f"DDTL needs more than {class_bits} bits ({class_bits} class bits + >= 1 path bit); got --bits {spec.nbits}"
            )
        return depth
    return DEFAULT_DEPTH


@torch.no_grad()
def tree_stats(node_logits: torch.Tensor, depths: list[int], targets: torch.Tensor) -> dict[str, float]:
    """Saturation of the visited nodes and distinct greedy paths per class (module docstring)."""
    from cbir.losses import group_ids

    bits, nodes = forest_greedy_path(node_logits, depths)
    sat = float((2 * torch.sigmoid(node_logits.gather(1, nodes)) - 1).abs().mean())
    cls = group_ids(targets).cpu()
    w = 1 << torch.arange(min(bits.shape[1], 62) - 1, -1, -1)
    key = (bits[:, : len(w)].long().cpu() * w).sum(1)
    counts, spread = [], []
    for c in torch.unique(cls):
        k = key[cls == c]
        counts.append(len(torch.unique(k)))
        spread.append(counts[-1] / len(k))
    return {"saturation": sat, "paths_per_class": sum(counts) / len(counts), "path_spread": sum(spread) / len(spread)}


class DDTL(HashingMethod):
    #: the per-class NT-Xent needs several images of a class per batch (cbir.data.sampler)
    balanced_batches = True

    def __init__(self, spec: MethodSpec, params: DDTLParams):
        cbits = spec.num_classes if spec.multilabel else class_bits_for(spec.num_classes)
        depth = ddtl_depth(spec, cbits)
        layout = CodeLayout(
            nbits=cbits + depth,
            class_bits=cbits,
            depth=depth,
            multilabel=spec.multilabel,
            class_names=spec.class_names,
            method="ddtl",
        )
        super().__init__(spec.make_backbone(), layout)
        if params.class_bias and spec.multilabel:
            raise ValueError("class_bias needs single-label data (one predicted class per image); drop it")
        self.head = DDTLHead(
            self.backbone.feature_dim, spec.num_classes, depth, params.max_tree_depth, class_bias=params.class_bias
        )
        self.params = params
        self.multilabel = spec.multilabel
        self.contrastive = PerClassNTXent(params.tau)
        self.node_balance = PerClassNodeBalance(decay=params.balance_decay)
        self.asl = AsymmetricLoss() if params.multilabel_loss == "asl" else None
        #: "joint" (end to end, eq. 3.17), or the two-stage mode's "representation" / "tree"
        self.stage = "representation" if params.two_stage else "joint"

    @property
    def class_head(self):
        return self.head.g2

    @property
    def two_views(self) -> bool:
        return self.stage != "representation" or self.params.rep_beta > 0

    def set_stage(self, stage: str) -> None:
        if stage not in ("joint", "representation", "tree"):
            raise ValueError(f"DDTL stage must be joint, representation or tree, got {stage!r}")
        self.stage = stage

    def head_parameters(self) -> list:
        if self.stage == "tree":  # stop-gradient: the class head stays the stage-1 classifier
            return list(self.head.g1.parameters()) + (
                [self.head.class_bias] if self.head.class_bias is not None else []
            )
        return super().head_parameters()

    def before_head_fit(self, feats: torch.Tensor, targets: torch.Tensor) -> dict:
        """Tree stage: with ``tree_init="pca"`` start from class-wise median splits of the features."""
        if self.stage == "tree" and self.params.tree_init == "pca":
            return {"tree_init": "pca", **fit_pca_median_tree(self.head, feats)}
        return {}

    def head_loss(self, feats, targets):
        if self.stage == "representation":
            f = torch.cat(list(feats), 0) if isinstance(feats, (tuple, list)) else feats
            tt = torch.cat([targets] * (f.shape[0] // targets.shape[0]), 0)
            ce = classification_loss(self.head.g2(f), tt, self.multilabel, self.asl)
            logs = {"ce": float(ce.detach())}
            loss = self.params.alpha * ce
            if isinstance(feats, (tuple, list)) and self.params.rep_beta > 0:
                rep = self.contrastive(feats[0], feats[1], targets)
                loss = loss + self.params.rep_beta * rep
                logs["rep_ntxent"] = float(rep.detach())
            return loss, logs
        f1, f2 = feats
        n = f1.shape[0]
        class_logits, node_logits = self.head(torch.cat([f1, f2], 0))
        z = forest_leaf_probs(node_logits, self.head.tree_depths)
        con = self.contrastive(z[:n], z[n:], targets)
        logs = {"ntxent": float(con.detach())}
        logs.update(tree_stats(node_logits[:n], self.head.tree_depths, targets))
        loss = self.params.beta * con
        if self.params.balance > 0:
            bal = self.balance_term(node_logits, targets)
            loss = loss + self.params.balance * bal
            logs["balance"] = float(bal.detach())
        if self.stage == "tree":
            return loss, logs
        ce = classification_loss(class_logits, torch.cat([targets, targets], 0), self.multilabel, self.asl)
        logs["ce"] = float(ce.detach())
        return self.params.alpha * ce + loss, logs

    def balance_term(self, node_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The per-class node balance of both views' node logits (``(2n, nodes)``: view 1 rows,
        then view 2 rows), averaged over the trees of the forest.

        Under DDP (inside :func:`cbir.distributed.ddp.global_batch`) it is the term of the *global*
        batch: each view's node logits and the targets are all-gathered (``ddp.gather_cat``, as the
        per-class NT-Xent gathers its leaf probabilities), so every class's reach-weighted node
        sums and item counts are those of the whole batch; every rank computes the same value and
        DDP's gradient average gives the 1-process gradient."""
        n = targets.shape[0]
        if ddp.is_gathering():
            node_logits = torch.cat([ddp.gather_cat(node_logits[:n]), ddp.gather_cat(node_logits[n:])], 0)
            targets = ddp.gather_cat(targets)
        tt = torch.cat([targets, targets], 0)
        return torch.stack(
            [
                self.node_balance(node_logits[:, sl], d, tt)
                for sl, d in zip(node_slices(self.head.tree_depths), self.head.tree_depths)
            ]
        ).mean()

    @torch.no_grad()
    def monitor_features(self, feats: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Tree statistics over a whole feature set (e.g. the cached training set)."""
        return tree_stats(self.head(feats)[1], self.head.tree_depths, targets)

    def encode(self, images):
        class_logits, node_logits = self.head(self.backbone(images))
        cbits, cconf = class_code(class_logits, self.multilabel, self.layout.class_bits)
        pbits, nodes = forest_greedy_path(node_logits, self.head.tree_depths)
        pconf = (2 * torch.sigmoid(node_logits.gather(1, nodes)) - 1).abs()
        return torch.cat([cbits, pbits], 1), torch.cat([cconf, pconf], 1)


@register_method("ddtl", params=DDTLParams, description="Deep decision tree layer hashing (Darlow 2022, ch. 3)")
def ddtl(spec: MethodSpec, params: DDTLParams) -> HashingMethod:
    return DDTL(spec, params)
