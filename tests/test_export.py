"""`cbir export`: TorchScript and ONNX Runtime give the same codes as PyTorch on 64 images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cbir.cli import main
from cbir.data import eval_transform
from cbir.models.hasher import Hasher
from cbir.models.registry import MethodSpec, create_method, resolve_params

METHODS = ["ddtl", "ce", "dmuh", "hegh", "lsh"]


def _hasher(method, tmp_path):
    torch.manual_seed(0)
    spec = MethodSpec(
        backbone="convnet",
        num_classes=4,
        nbits=None if method in ("ddtl", "ce") else 16,
        depth=12 if method == "ddtl" else None,
        class_names=tuple("abcd"),
        backbone_kwargs=(("width", 8),),
    )
    params = resolve_params(method, None)
    h = Hasher(create_method(method, spec, params), method, spec, params, image_size=32, device="cpu")
    path = h.save(tmp_path / f"{method}.pt")
    return Hasher.load(path, device="cpu"), path


def _images(n=64):
    return torch.from_numpy(np.random.default_rng(7).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_reproduces_every_code(tmp_path, method, fmt):
    h, path = _hasher(method, tmp_path)
    imgs = _images()
    tf = eval_transform(32)
    want_codes, want_conf = h.encode_tensor(torch.stack([tf(x) for x in imgs]))
    out = tmp_path / f"m.{fmt}"
    assert main(["export", "--model", str(path), "--format", fmt, "--out", str(out)]) == 0
    meta = json.loads((tmp_path / f"m.{fmt}.json").read_text())
    assert meta["model_content_hash"] == h.content_hash and meta["layout"]["nbits"] == h.nbits
    if fmt == "torchscript":
        g = torch.jit.load(str(out))
        with torch.no_grad():
            bits, conf = (t.numpy() for t in g(imgs))
    else:
        ort = pytest.importorskip("onnxruntime")
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        bits, conf = sess.run(["bits", "conf"], {"images": imgs.numpy()})
    assert bits.dtype == np.uint8 and bits.shape == (64, h.nbits)
    got = np.packbits(bits.astype(bool), axis=1)
    assert np.array_equal(got, want_codes.packed)  # 100 % of the codes
    np.testing.assert_allclose(conf, want_conf, atol=1e-4)


def test_export_rejects_unknown_format(tmp_path):
    from cbir.export import export_hasher

    h, _ = _hasher("ce", tmp_path)
    with pytest.raises(ValueError, match="--format"):
        export_hasher(h, tmp_path / "x", "tflite")
