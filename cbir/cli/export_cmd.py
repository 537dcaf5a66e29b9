"""``cbir export``: write a trained hasher as TorchScript or ONNX, to encode images without cbir.

``cbir export --model runs/ddtl/model.pt --format onnx --out ddtl.onnx`` writes the model and
``ddtl.onnx.json`` (input contract, CodeLayout, model content hash). The graph takes uint8 RGB
images ``(N, 3, S, S)`` already resized to the model's image size (shorter side, antialiased
bilinear, centre crop) and returns ``bits`` (uint8 0/1, ``(N, B)``, bit 0 first) and ``conf``
(float32 ``(N, B)``); normalisation is inside the graph. ONNX needs ``pip install 'cbir[export]'``.
"""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a trained hasher (TorchScript / ONNX)", description=__doc__)
    p.add_argument("--model", required=True, type=Path, help="model checkpoint (from `cbir train`)")
    p.add_argument(
        "--format", default="onnx", choices=["onnx", "torchscript"], help="output format (default: %(default)s)"
    )
    p.add_argument("--out", type=Path, default=None, help="output file (default: the model's path with .onnx / .ts.pt)")
    p.set_defaults(func=run)


def run(args) -> int:
    from cbir.export import export_hasher
    from cbir.models.hasher import Hasher

    hasher = Hasher.load(args.model, device="cpu")
    out = args.out or args.model.with_suffix(".onnx" if args.format == "onnx" else ".ts.pt")
    meta = export_hasher(hasher, out, args.format)
    print(
        f"exported {meta['method']} ({hasher.nbits}-bit codes, input uint8 N x 3 x "
        f"{hasher.image_size} x {hasher.image_size}) as {args.format} to {out} (+ {out}.json)"
    )
    return 0
