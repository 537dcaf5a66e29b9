"""``Hasher``: a trained method in inference mode, saved as one checkpoint file.

A checkpoint is a single ``torch.save`` file holding the format tag, the method name, its
:class:`~cbir.models.registry.MethodSpec` and hyper-parameters, the :class:`~cbir.codes.CodeLayout`,
the class names, the input image size, the resolved training config, the ``state_dict`` and a
**content hash**: SHA-256 over the canonical JSON of everything but the weights plus every
tensor of the ``state_dict`` in name order. Two checkpoints with equal content hash encode
every image identically; the index stores the hash of the model that built it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from cbir.codes import CodeLayout, Codes
from cbir.models.base import HashingMethod
from cbir.models.registry import MethodSpec, create_method, resolve_params

__all__ = ["Hasher", "resolve_device", "FORMAT"]

FORMAT = "cbir-hasher/1"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _spec_to_dict(spec: MethodSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["class_names"] = list(spec.class_names)
    d["backbone_kwargs"] = [list(kv) for kv in spec.backbone_kwargs]
    return d


def _spec_from_dict(d: dict) -> MethodSpec:
    d = dict(d)
    d["class_names"] = tuple(d.get("class_names", ()))
    d["backbone_kwargs"] = tuple(tuple(kv) for kv in d.get("backbone_kwargs", ()))
    return MethodSpec(**d)


def batch_images(batches, progress: bool = False, desc: str = "encode"):
    """``(images, dataset indices)`` of every ``cbir.data.Batch`` (the first view of a two-view
    batch), behind a progress bar: the loop every encoder of batches runs."""
    from tqdm.auto import tqdm

    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        images = batch.images[0] if isinstance(batch.images, (tuple, list)) else batch.images
        yield images, batch.indices.numpy()


def eval_loader(imageset, transform, batch_size: int, num_workers: int = 0, skip_log=None):
    """An in-order loader of ``imageset`` in a model's evaluation ``transform``, applied to each
    batch of raw images at once (:func:`cbir.data.transforms.transform_batch`: the same tensors
    as image by image, several times faster)."""
    from cbir.data import make_loader

    return make_loader(
        imageset.with_transform(None),
        batch_size,
        shuffle=False,
        num_workers=num_workers,
        skip_log=skip_log,
        batch_transform=transform,
    )


def _loadable_spec(spec: MethodSpec, where) -> MethodSpec:
    """``spec`` without backbone arguments its backbone never took: checkpoints written before
    the factories refused unknown arguments (e.g. ``width`` for resnet18, silently ignored then)
    still load, with a warning; the saved spec, and so the content hash, stay as written."""
    from cbir.models.backbones import _BACKBONES, backbone_arguments

    if spec.backbone not in _BACKBONES:
        return spec  # create_backbone names the unknown backbone
    accepted = set(backbone_arguments(spec.backbone))
    unknown = [k for k, _ in spec.backbone_kwargs if k not in accepted]
    if not unknown:
        return spec
    import logging

    logging.getLogger(__name__).warning(
        "%s: backbone %r never took the argument(s) %s (ignored when it was trained); ignoring them",
        where,
        spec.backbone,
        ", ".join(unknown),
    )
    kept = tuple((k, v) for k, v in spec.backbone_kwargs if k in accepted)
    return dataclasses.replace(spec, backbone_kwargs=kept)


def _content_hash(header: dict, state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


class Hasher:
    """Encode images to :class:`Codes` with a trained :class:`HashingMethod`."""

    def __init__(
        self,
        method: HashingMethod,
        method_name: str,
        spec: MethodSpec,
        params: Any,
        image_size: int,
        config: dict | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 256,
    ):
        self.method = method
        self.method_name = method_name
        self.spec = spec
        self.params = params
        self.image_size = int(image_size)
        self.config = dict(config or {})
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.method.to(self.device).eval()
        self._eval_transform = None
        self._hash: str | None = None

    # identity -------------------------------------------------------------------------------
    @property
    def layout(self) -> CodeLayout:
        return self.method.layout

    @property
    def nbits(self) -> int:
        return self.layout.nbits

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.layout.class_names

    def _header(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method_name,
            "spec": _spec_to_dict(self.spec),
            "params": dataclasses.asdict(self.params),
            "layout": self.layout.to_dict(),
            "image_size": self.image_size,
        }

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = _content_hash(self._header(), self.method.state_dict())
        return self._hash

    @property
    def eval_transform(self):
        if self._eval_transform is None:
            from cbir.data import eval_transform

            self._eval_transform = eval_transform(self.image_size)
        return self._eval_transform

    # persistence ----------------------------------------------------------------------------
    def payload(self) -> dict:
        """Everything the checkpoint file holds (header, config, weights, content hash)."""
        self._hash = None
        state = {k: v.detach().cpu() for k, v in self.method.state_dict().items()}
        return dict(self._header(), config=self.config, state_dict=state, content_hash=self.content_hash)

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (temp file + rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.payload(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto", batch_size: int = 256) -> "Hasher":
        """Load a checkpoint; an ensemble checkpoint gives a :class:`cbir.ensemble.EnsembleHasher`
        (same encoding interface, every member encodes)."""
        path = Path(path)
        if path.is_dir():
            path = path / "model.pt"
        if not path.exists():
            raise FileNotFoundError(f"no model checkpoint at {path} (train one with `cbir train`)")
        try:
            payload = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling error means a bad file
            raise ValueError(f"{path} is not a readable cbir checkpoint: {exc}") from exc
        from cbir.ensemble import FORMAT as ENSEMBLE_FORMAT

        if isinstance(payload, dict) and payload.get("format") == ENSEMBLE_FORMAT:
            from cbir.ensemble import EnsembleHasher

            return EnsembleHasher.from_payload(payload, path, device=device, batch_size=batch_size)  # type: ignore[return-value]
        return cls.from_payload(payload, path, device=device, batch_size=batch_size)

    @classmethod
    def from_payload(cls, payload, where, device: str | torch.device = "auto", batch_size: int = 256) -> "Hasher":
        """A Hasher from a checkpoint dict (:meth:`payload`); ``where`` names it in errors."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{where} is not a cbir checkpoint (format {FORMAT!r} expected)")
        spec = _spec_from_dict(payload["spec"])
        params = resolve_params(payload["method"], payload["params"])
        method = create_method(payload["method"], _loadable_spec(spec, where), params)
        method.load_state_dict(payload["state_dict"])
        layout = CodeLayout.from_dict(payload["layout"])
        if layout != method.layout:
            method._layout = layout  # e.g. a bit order chosen in finalize()
        hasher = cls(
            method,
            payload["method"],
            spec,
            params,
            payload["image_size"],
            payload.get("config"),
            device=device,
            batch_size=batch_size,
        )
        if hasher.content_hash != payload["content_hash"]:
            raise ValueError(f"{where}: content hash mismatch (file corrupted or edited)")
        return hasher

    # encoding -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_tensor(self, images: torch.Tensor) -> tuple[Codes, np.ndarray]:
        """Encode a float batch ``(N, 3, H, W)`` already in the evaluation transform."""
        if images.ndim != 4:
            raise ValueError(f"expected a (N, 3, H, W) batch, got shape {tuple(images.shape)}")
        self.method.eval()
        bits_out, conf_out = [], []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start : start + self.batch_size].to(self.device, non_blocking=True)
            bits, conf = self.method.encode(x)
            bits_out.append(bits.cpu().numpy())
            conf_out.append(conf.float().cpu().numpy())
        if not bits_out:
            return Codes.empty(self.nbits), np.zeros((0, self.nbits), np.float32)
        return Codes.from_bits(np.concatenate(bits_out)), np.concatenate(conf_out).astype(np.float32)

    def preprocess(self, images: Iterable) -> torch.Tensor:
        """PIL images / uint8 CHW tensors -> one float batch in the evaluation transform.

        Images of the same size are stacked and transformed as one batch (one resize / normalise
        call instead of one per image); the rows keep the input order and equal the per-image
        transform (tested).
        """
        from torchvision.transforms.v2 import functional as TF

        from cbir.data.transforms import transform_batch

        raw = [img if isinstance(img, torch.Tensor) else TF.pil_to_tensor(img.convert("RGB")) for img in images]
        if not raw:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        out = transform_batch(raw, self.eval_transform)
        if out.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"the eval transform gave {tuple(out.shape[1:])}, expected {(3, self.image_size, self.image_size)}"
                " (images must have 3 channels)"
            )
        return out

    def encode_batches(
        self, batches: Iterable, progress: bool = False, desc: str = "encode"
    ) -> tuple[Codes, np.ndarray, np.ndarray]:
        """Encode an iterable of ``cbir.data.Batch``; returns (codes, conf, dataset indices)."""
        codes, confs, idx = [], [], []
        for images, ix in batch_images(batches, progress, desc):
            c, f = self.encode_tensor(images)
            codes.append(c)
            confs.append(f)
            idx.append(ix)
        if not codes:
            return Codes.empty(self.nbits), np.zeros((0, self.nbits), np.float32), np.zeros(0, np.int64)
        return Codes.concat(codes), np.concatenate(confs), np.concatenate(idx).astype(np.int64)

    def encode_imageset(
        self,
        imageset,
        batch_size: int | None = None,
        num_workers: int = 0,
        progress: bool = False,
        skip_log=None,
        desc: str = "encode",
    ) -> tuple[Codes, np.ndarray, np.ndarray]:
        """Encode every readable image of an ``ImageSet``; returns (codes, conf, indices)."""
        loader = eval_loader(imageset, self.eval_transform, batch_size or self.batch_size, num_workers, skip_log)
        return self.encode_batches(loader, progress=progress, desc=desc)

    def encode(self, x) -> tuple[Codes, np.ndarray]:
        """Encode a tensor batch, a list of PIL images, an ``ImageSet`` or an iterable of Batches.

        Returns ``(Codes, conf)`` with ``conf`` the per-bit confidence, float32 ``(N, B)``.
        For sources that may skip unreadable images use :meth:`encode_imageset`, which also
        returns the indices that were encoded.
        """
        if isinstance(x, torch.Tensor):
            return self.encode_tensor(x)
        if isinstance(x, (list, tuple)):
            return self.encode_tensor(self.preprocess(x))
        if hasattr(x, "with_transform"):
            codes, conf, _ = self.encode_imageset(x)
            return codes, conf
        codes, conf, _ = self.encode_batches(x)
        return codes, conf
