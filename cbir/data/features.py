"""Feature cache: backbone features of a training set, computed once, for fitting heads in seconds.

With a frozen backbone (``--freeze-backbone``, DDTL's two-stage mode) a head never needs the
images again: :func:`build_feature_cache` runs the backbone (in eval mode, no gradient) over the
training set once in the evaluation transform (view 0) and ``views`` more times under the
training augmentation (views 1..V), and :class:`FeatureCache` serves minibatches of those
features. For two-view (contrastive) heads a batch gets two *different* augmented views of each
image (positives as in image training); for one-view heads a random view per item (view 0
included). The view draw is seeded (numpy PCG64 of ``seed`` and the step).

Unreadable images are skipped (reported to the ``SkipLog``) and simply absent from the cache.

The last cache built is kept in memory, keyed by a SHA-256 of the backbone's weights, the image
set (labels, pixels or paths), the transforms and the seed: fitting several heads on
one frozen backbone in one process (a hyper-parameter selection, a benchmark) computes the
features once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FeatureCache", "build_feature_cache"]

_LAST: dict = {}


@dataclass
class FeatureCache:
    """``features``: float32 ``(1 + V, N, F)`` (view 0 = eval transform); ``labels``: the ``N``
    items' labels (numpy, as in the ImageSet); ``indices``: their positions in the ImageSet."""

    features: torch.Tensor
    labels: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.features.shape[1])

    @property
    def views(self) -> int:
        return int(self.features.shape[0]) - 1

    def targets(self, rows) -> torch.Tensor:
        lab = self.labels[np.asarray(rows)]
        return torch.from_numpy(lab.astype(np.float32)) if lab.ndim == 2 else torch.from_numpy(lab.astype(np.int64))

    def batch(self, rows, two_views: bool, rng: np.random.Generator):
        """Features of cache rows ``rows``: a tensor, or a pair of tensors (two distinct augmented views)."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        r = torch.from_numpy(rows)
        if two_views:
            if self.views >= 2:
                a = rng.integers(1, self.views + 1, size=n)
                b = (a - 1 + rng.integers(1, self.views, size=n)) % self.views + 1  # != a
            else:  # one augmented view: eval view vs augmented view
                a, b = np.zeros(n, np.int64), np.full(n, self.views, np.int64)
            return (self.features[torch.from_numpy(a), r], self.features[torch.from_numpy(b), r])
        v = rng.integers(0, self.views + 1, size=n)
        return self.features[torch.from_numpy(v), r]


@torch.no_grad()
def build_feature_cache(
    backbone,
    imageset,
    eval_tf,
    aug_tf,
    views: int,
    device,
    batch_size: int = 256,
    seed: int = 0,
    num_workers: int = 0,
    skip_log=None,
) -> FeatureCache:
    """Run ``backbone`` over ``imageset`` once in ``eval_tf`` and ``views`` times in ``aug_tf``."""
    from cbir.data.imageset import make_loader

    if views < 0:
        raise ValueError(f"feature views must be >= 0, got {views}")
    key = _cache_key(backbone, imageset, eval_tf, aug_tf, views, seed)
    if _LAST.get("key") == key:
        return _LAST["cache"]
    was_training = backbone.training
    backbone.eval()
    out, idx = [], None
    for v in range(views + 1):
        torch.manual_seed(seed * 7919 + v)
        loader = make_loader(
            imageset.with_transform(eval_tf if v == 0 else aug_tf),
            batch_size,
            num_workers=num_workers,
            skip_log=skip_log,
        )
        feats, ids = [], []
        for batch in loader:
            feats.append(backbone(batch.images.to(device, non_blocking=True)).float().cpu())
            ids.append(batch.indices.numpy())
        if not feats:
            raise ValueError("no readable image in the training set: nothing to cache features of")
        ids = np.concatenate(ids)
        if idx is not None and not np.array_equal(ids, idx):
            raise ValueError("the readable images changed between feature views (files modified during training?)")
        idx = ids
        out.append(torch.cat(feats))
    backbone.train(was_training)
    cache = FeatureCache(torch.stack(out), imageset.labels[idx], idx.astype(np.int64))
    _LAST.clear()
    _LAST.update(key=key, cache=cache)
    return cache


def _cache_key(backbone, imageset, eval_tf, aug_tf, views, seed) -> str:
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(imageset.labels).tobytes())
    if imageset.images is not None:
        h.update(imageset.images.contiguous().numpy().tobytes())
        h.update(str(tuple(imageset.images.shape)).encode())
    else:
        h.update("\n".join(imageset.paths).encode())
    h.update(f"{eval_tf!r}|{aug_tf!r}|{views}|{seed}".encode())
    return h.hexdigest()
