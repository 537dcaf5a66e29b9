"""Warm starts: backbone weights from a cbir checkpoint, a ``state_dict`` file or a torchvision
weights name already in the local torch hub cache (never downloaded), and the input
normalisation that comes with them.

cbir's transforms always normalise with :data:`cbir.data.MEAN` / :data:`cbir.data.STD` (0.5 / 0.5,
one preprocessing path for every source). Weights trained with another normalisation (ImageNet's
``mean = (0.485, 0.456, 0.406)``, ``std = (0.229, 0.224, 0.225)``) get an :class:`InputNorm` at the
front of the backbone (``backbone.input_norm``) that maps cbir's input to theirs::

    x_theirs = (x_cbir * STD + MEAN - mean) / std

It is created from the backbone keywords ``input_mean`` / ``input_std``, which are part of the
method spec saved in every checkpoint, so a checkpoint always encodes with the normalisation it
was trained with.

Sources accepted by :func:`resolve_init`:

* a **cbir checkpoint** (``model.pt`` or its run directory): its backbone weights, its class head
  when the new method has one of the same shape (so a two-stage DDTL keeps the CE classifier's
  class bits), and its input normalisation;
* a **state_dict file** (``torch.save(model.state_dict())``, optionally under a ``state_dict`` or
  ``model`` key; ``module.`` / ``backbone.`` prefixes are stripped; torchvision ResNet names
  ``conv1 / bn1 / layerN`` are mapped to ``stem.0 / stem.1 / stages.N-1``, ``fc`` is dropped);
  its normalisation is cbir's unless ``input_norm`` says otherwise;
* a **torchvision weights name** (``ResNet18_Weights.IMAGENET1K_V1``) whose file is already in
  ``torch.hub.get_dir()/checkpoints``; its normalisation is the weights' own.

Tensors are copied where name and shape match; the rest is reported (e.g. the 7x7 ImageNet stem
conv does not fit the 3x3 CIFAR stem). Nothing matching is a ``ValueError``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["InputNorm", "NAMED_NORMS", "parse_input_norm", "InitSource", "resolve_init", "apply_init"]

log = logging.getLogger("cbir.train")

NAMED_NORMS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class InputNorm(nn.Module):
    """Maps images normalised with cbir's MEAN/STD to the normalisation ``(mean, std)``."""

    def __init__(self, mean, std):
        super().__init__()
        from cbir.data.transforms import MEAN, STD

        mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if mean.shape != (3,) or std.shape != (3,) or bool((std <= 0).any()):
            raise ValueError(
                f"input normalisation needs 3 means and 3 positive stds, got {mean.tolist()} / {std.tolist()}"
            )
        scale = torch.tensor(STD) / std
        shift = (torch.tensor(MEAN) - mean) / std
        self.register_buffer("scale", scale.view(1, 3, 1, 1))
        self.register_buffer("shift", shift.view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def parse_input_norm(text: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``None``/``"cbir"`` -> None (cbir's own), ``"imagenet"``, or ``"m1,m2,m3/s1,s2,s3"``."""
    if text is None or text in ("", "cbir", "none"):
        return None
    if text in NAMED_NORMS:
        return NAMED_NORMS[text]
    m = re.fullmatch(r"\s*([^/]+)/([^/]+)\s*", text)
    try:
        mean = tuple(float(v) for v in m.group(1).split(","))
        std = tuple(float(v) for v in m.group(2).split(","))
    except (AttributeError, ValueError):
        mean = std = ()
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"--input-norm {text!r}: use cbir, {', '.join(NAMED_NORMS)} or 'm1,m2,m3/s1,s2,s3' (stds > 0)")
    return mean, std


@dataclass
class InitSource:
    """Resolved warm-start weights: backbone tensors (backbone names), an optional class head
    (``fc.weight`` / ``fc.bias``), the normalisation they expect (None = cbir's) and a description."""

    backbone: dict[str, torch.Tensor]
    class_head: dict[str, torch.Tensor] | None = None
    input_norm: tuple | None = None
    description: str = ""
    report: dict = field(default_factory=dict)


_TV_RESNET = [
    (re.compile(r"^conv1\."), "stem.0."),
    (re.compile(r"^bn1\."), "stem.1."),
    (re.compile(r"^layer([1-4])\."), None),
]


def _rename_plain(key: str) -> str | None:
    for prefix in ("module.", "backbone."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    if key.startswith("fc.") or key.startswith("head."):
        return None
    for pat, repl in _TV_RESNET:
        m = pat.match(key)
        if m:
            return pat.sub(repl if repl is not None else f"stages.{int(m.group(1)) - 1}.", key)
    return key


def _plain_state(sd: dict, description: str, input_norm) -> InitSource:
    for key in ("state_dict", "model"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"{description} holds no tensors: give a state_dict file, a cbir model.pt or a torchvision weights name"
        )
    backbone = {}
    for k, v in tensors.items():
        nk = _rename_plain(k)
        if nk is not None:
            backbone[nk] = v
    return InitSource(backbone, None, input_norm, description)


def _torchvision_file(name: str) -> Path | None:
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def resolve_init(source: str, input_norm=None) -> InitSource:
    """Load the warm-start weights named by ``source`` (see the module docstring)."""
    from cbir.models.hasher import FORMAT, Hasher

    path = Path(source).expanduser()
    if path.is_dir() and (path / "model.pt").exists():
        path = path / "model.pt"
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling error means a bad file
            raise ValueError(f"--init-from {path}: not a readable checkpoint or state_dict ({exc})") from exc
        if not isinstance(payload, dict):
            raise ValueError(
                f"--init-from {path}: expected a state_dict (dict of tensors), got {type(payload).__name__}"
            )
        if payload.get("format") == FORMAT:
            src = Hasher.load(path, device="cpu").method
            head = getattr(src, "class_head", None)
            kw = dict(payload["spec"].get("backbone_kwargs", ()))
            norm = (tuple(kw["input_mean"]), tuple(kw["input_std"])) if "input_mean" in kw else None
            if input_norm is not None and input_norm != norm:
                raise ValueError(
                    f"--init-from {path} was trained with input normalisation {norm or 'cbir'}; "
                    "drop --input-norm (the checkpoint's is used)"
                )
            bb = {k: v for k, v in src.backbone.state_dict().items() if not k.startswith("input_norm.")}
            return InitSource(
                bb,
                head.state_dict() if head is not None else None,
                norm,
                f"cbir checkpoint {path} ({payload['method']}, {payload['spec']['backbone']})",
            )
        return _plain_state(payload, f"state_dict {path}", input_norm)
    tv = _torchvision_file(source)
    if tv is not None:
        if not tv.is_file():
            raise ValueError(
                f"--init-from {source}: torchvision weights file {tv} is not in the local torch hub cache; "
                "cbir never downloads: copy the file there, or pass a state_dict file"
            )
        import torchvision

        t = torchvision.models.get_weight(source).transforms()
        norm = input_norm or (tuple(t.mean), tuple(t.std))
        return _plain_state(torch.load(tv, map_location="cpu", weights_only=True), f"torchvision {source} ({tv})", norm)
    raise ValueError(
        f"--init-from {source!r}: no such file, and not a torchvision weights name "
        "(e.g. ResNet18_Weights.IMAGENET1K_V1)"
    )


def _copy_matching(module: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    own = module.state_dict()
    loaded, mismatched = [], []
    for k, v in tensors.items():
        if k in own and own[k].shape == v.shape:
            own[k] = v.to(own[k].dtype)
            loaded.append(k)
        elif k in own:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
    module.load_state_dict(own)
    missing = [k for k in own if k not in tensors and not k.startswith("input_norm.")]
    return loaded, mismatched, missing


def apply_init(method, init: InitSource) -> dict:
    """Copy the warm-start tensors into ``method``; returns a JSON-able report."""
    loaded, mismatched, missing = _copy_matching(method.backbone, init.backbone)
    if not loaded:
        raise ValueError(
            f"{init.description}: no tensor matches backbone {type(method.backbone).__name__} by name and "
            f"shape (e.g. {sorted(init.backbone)[:3]}); is it the same --backbone?"
        )
    head = getattr(method, "class_head", None)
    head_loaded = False
    if head is not None and init.class_head is not None:
        own = head.state_dict()
        if set(own) == set(init.class_head) and all(own[k].shape == init.class_head[k].shape for k in own):
            head.load_state_dict(init.class_head)
            head_loaded = True
    report = {
        "source": init.description,
        "backbone_tensors_loaded": len(loaded),
        "backbone_tensors_shape_mismatch": mismatched,
        "backbone_tensors_missing": missing,
        "class_head_loaded": head_loaded,
        "input_norm": init.input_norm,
    }
    log.info(
        "warm start from %s: %d backbone tensors, %d shape mismatches, %d missing, class head %s",
        init.description,
        len(loaded),
        len(mismatched),
        len(missing),
        "loaded" if head_loaded else "new",
    )
    return report
