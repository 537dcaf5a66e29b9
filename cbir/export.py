"""Export a trained hasher to run without cbir: TorchScript or ONNX.

The exported graph takes **uint8 images** ``(N, 3, S, S)`` (RGB, ``S`` = the model's
``image_size``, already resized the way :func:`cbir.data.transforms.resize_uint8` does: shorter
side to ``S`` with antialiased bilinear interpolation, then a centre crop) and returns

* ``bits``: uint8 ``(N, B)`` 0/1, bit 0 the most important (pack MSB-first for a
  :class:`cbir.codes.Codes`: ``np.packbits(bits, axis=1)``);
* ``conf``: float32 ``(N, B)`` per-bit confidence in [0, 1].

The float conversion and normalisation of the evaluation transform (``x / 255``, mean 0.5,
std 0.5) are inside the graph, so a user feeds the same pixels cbir would. A ``.json`` written
beside the model records the input contract, the :class:`~cbir.codes.CodeLayout` and the
source model's content hash.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cbir.data.transforms import MEAN, STD

if TYPE_CHECKING:
    from cbir.models.base import HashingMethod

__all__ = ["EncoderGraph", "export_hasher", "FORMATS"]

FORMATS = ("torchscript", "onnx")


class EncoderGraph(nn.Module):
    """uint8 images -> (bits uint8, conf float32): the hasher's encode with its normalisation."""

    mean: torch.Tensor  # buffers (register_buffer)
    std: torch.Tensor

    def __init__(self, method: HashingMethod) -> None:
        super().__init__()
        self.method = method
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor):
        x = (images.float() - self.mean) / self.std
        bits, conf = self.method.encode(x)
        return bits.to(torch.uint8), conf.float()


def export_hasher(hasher, out, fmt: str = "onnx", batch: int = 2) -> dict:
    """Write ``hasher`` (a :class:`cbir.models.hasher.Hasher`) to ``out`` in ``fmt``; returns the
    metadata written to ``<out>.json``. ``batch`` is the example batch used for tracing (the
    batch dimension stays dynamic)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    method = hasher.method.to("cpu").eval()
    graph = EncoderGraph(method).eval()
    s = int(hasher.image_size)
    example = torch.randint(0, 256, (max(2, int(batch)), 3, s, s), dtype=torch.uint8)
    with torch.inference_mode(), warnings.catch_warnings():
        # torch.jit's deprecation notice and the tracer's notes on Python-side shape checks
        # (the shapes are fixed by the layout) are not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if fmt == "torchscript":
            traced = torch.jit.trace(graph, example, check_trace=False)
            traced.save(str(out))
        else:
            try:
                import onnx  # noqa: F401
            except ImportError:
                raise ValueError(
                    "ONNX export needs the onnx and onnxscript packages: pip install 'cbir[export]'"
                ) from None
            for name in ("onnx_ir", "onnxscript"):  # per-pass INFO lines
                logging.getLogger(name).setLevel(logging.WARNING)
            torch.onnx.export(
                graph,
                (example,),
                str(out),
                input_names=["images"],
                output_names=["bits", "conf"],
                dynamic_shapes={"images": {0: "batch"}},
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    meta = {
        "format": fmt,
        "file": out.name,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": ["N", 3, s, s],
            "pixels": f"RGB, shorter side resized to {s} (antialiased bilinear) and centre-cropped",
        },
        "outputs": {
            "bits": {"dtype": "uint8", "shape": ["N", hasher.nbits], "order": "bit 0 first"},
            "conf": {"dtype": "float32", "shape": ["N", hasher.nbits]},
        },
        "layout": hasher.layout.to_dict(),
        "method": hasher.method_name,
        "model_content_hash": hasher.content_hash,
    }
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta
