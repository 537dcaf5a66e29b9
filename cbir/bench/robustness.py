"""Hash-code retention under colour jitter and occlusion (thesis §3.3.2): perturbations of raw
``uint8`` images, and the per-depth retention report."""

from __future__ import annotations

from typing import Any

import numpy as np

from cbir.codes import Codes


# ============================================================================================
# robustness perturbations (raw uint8 CHW tensors in, uint8 CHW tensors out)
# ============================================================================================
def _hue_shift(x, shift):
    """Shift the hue of a float ``(n, 3, H, W)`` batch in [0, 1] by ``shift`` (``(n,)``, turns),
    image by image with torchvision's public ``adjust_hue`` (a shift of ``f`` turns in HSV)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    return torch.stack([TF.adjust_hue(im, float(f)) for im, f in zip(x, shift)])


def _by_shape(images: list):
    """Group indices of same-shape images (so perturbations run as batches)."""
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    return groups.values()


def perturb_jitter(images: list, strength: float, rng: np.random.Generator) -> list:
    """Colour jitter of ``strength`` s on a list of ``uint8`` ``(3, H, W)`` tensors: per image,
    brightness, contrast and saturation factors drawn uniformly from ``[max(0, 1 - s), 1 + s]``
    and a hue shift from ``[-s/4, s/4]`` (at most half a turn), applied in that order with
    torchvision's definitions (contrast: blend with the mean grey level; saturation: blend
    with the grey image; hue: shift in HSV), computed in float and rounded back to ``uint8``."""
    import torch

    s = float(strength)
    n = len(images)
    lo, h = max(0.0, 1.0 - s), min(0.5, s / 4.0)
    fb, fc, fs = (torch.from_numpy(rng.uniform(lo, 1.0 + s, n)).float() for _ in range(3))
    fh = torch.from_numpy(rng.uniform(-h, h, n)).float()
    out: list = [None] * n
    if s == 0:
        return [im.clone() for im in images]
    w = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
    for idx in _by_shape(images):
        ii = torch.tensor(idx)
        x = torch.stack([images[i] for i in idx]).float() / 255.0
        v = lambda f, ii=ii: f[ii].view(-1, 1, 1, 1)  # noqa: E731
        x = (x * v(fb)).clamp_(0, 1)
        grey = (x * w).sum(dim=1, keepdim=True)
        x = (v(fc) * x + (1 - v(fc)) * grey.mean(dim=(1, 2, 3), keepdim=True)).clamp_(0, 1)
        grey = (x * w).sum(dim=1, keepdim=True)
        x = (v(fs) * x + (1 - v(fs)) * grey).clamp_(0, 1)
        if h > 0:
            x = _hue_shift(x, fh[ii])
        y = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        for j, i in enumerate(idx):
            out[i] = y[j]
    return out


def perturb_occlusion(images: list, strength: float, rng: np.random.Generator) -> list:
    """Occlusion of ``strength`` a on a list of ``uint8`` ``(3, H, W)`` tensors: per image, a
    black square covering the fraction ``a`` of the image area (side ``round(sqrt(a H W))``,
    clipped to the image) at a uniformly random position."""
    out = []
    for img in images:
        o = img.clone()
        _, hh, ww = o.shape
        side = int(round(np.sqrt(float(strength) * hh * ww)))
        sh, sw = min(side, hh), min(side, ww)
        if sh and sw:
            y = int(rng.integers(0, hh - sh + 1))
            x = int(rng.integers(0, ww - sw + 1))
            o[:, y : y + sh, x : x + sw] = 0
        out.append(o)
    return out


def raw_images(imageset, positions) -> tuple[list, list[int]]:
    """Raw ``uint8`` CHW tensors of the readable items among ``positions``."""
    from torchvision.transforms.v2 import functional as TF

    from cbir.data import CorruptImageError

    imgs, kept = [], []
    for i in positions:
        i = int(i)
        if imageset.in_memory:
            imgs.append(imageset.images[i])
        else:
            try:
                imgs.append(TF.pil_to_tensor(imageset.get_pil(i)))
            except CorruptImageError:
                continue
        kept.append(i)
    return imgs, kept


def encode_raw(hasher, imgs: list, chunk: int = 256) -> Codes:
    parts = [hasher.encode_tensor(hasher.preprocess(imgs[s : s + chunk]))[0] for s in range(0, len(imgs), chunk)]
    return Codes.concat(parts) if parts else Codes.empty(hasher.nbits)


def robustness_report(hasher, imageset, positions, jitter, occlusion, seed: int = 0, progress: bool = True) -> dict:
    """Hash-code retention (:func:`cbir.metrics.code_retention`) per depth for every strength
    of colour jitter and occlusion, on the query images at ``positions``."""
    from tqdm.auto import tqdm

    from cbir.metrics import bit_flip_rate, code_retention

    imgs, kept = raw_images(imageset, positions)
    if not imgs:
        return {"n_images": 0, "jitter": [], "occlusion": []}
    clean = encode_raw(hasher, imgs)
    out: dict[str, Any] = {
        "n_images": len(imgs),
        "seed": seed,
        "definition": "retention[d-1] = fraction of images whose first d bits "
        "are unchanged by the perturbation (cbir.metrics.code_retention)",
    }
    jobs = [("jitter", s, perturb_jitter) for s in jitter] + [("occlusion", s, perturb_occlusion) for s in occlusion]
    bar = tqdm(jobs, desc="robustness", unit="level", disable=not progress, leave=False)
    for li, (kind, s, fn) in enumerate(bar):
        rng = np.random.default_rng([seed, li])
        pert = encode_raw(hasher, fn(imgs, s, rng))
        ret = code_retention(clean, pert)
        out.setdefault(kind, []).append(
            {
                "strength": float(s),
                "retention": [float(v) for v in ret],
                "bit_flip_rate": [float(v) for v in bit_flip_rate(clean, pert)],
            }
        )
    out.setdefault("jitter", [])
    out.setdefault("occlusion", [])
    return out
