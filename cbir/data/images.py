"""Decoding of image files: every format Pillow reads, converted to RGB, with clean errors."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

__all__ = ["CorruptImageError", "decode_image"]


class CorruptImageError(ValueError):
    """An image that cannot be decoded; the message says why."""


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Decode the bytes of an image file into a fully loaded RGB :class:`PIL.Image.Image`.

    * any format Pillow reads; grey, palette, alpha, CMYK, 16-bit ... are converted to RGB
      (transparent pixels are composited as Pillow's ``convert("RGB")`` does);
    * the EXIF orientation of photographs is applied;
    * the whole image is decoded here (``.load()``), so a truncated file fails now and not in
      the middle of a transform;
    * an image with more than ``max_pixels`` pixels (default ``PIL.Image.MAX_IMAGE_PIXELS``)
      is refused as a possible decompression bomb.

    Raises :class:`CorruptImageError` with the reason for anything that cannot be decoded.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise CorruptImageError("empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(bytes(data)))
            except Image.UnidentifiedImageError:
                raise CorruptImageError(
                    f"not a recognised image format ({len(data)} bytes, starts with "
                    f"{bytes(data[:8])!r})"
                ) from None
            w, h = img.size
            if w <= 0 or h <= 0:
                raise CorruptImageError(f"invalid image size {w}x{h}")
            if limit is not None and w * h > limit:
                raise CorruptImageError(
                    f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {limit} "
                    "(possible decompression bomb)"
                )
            img.load()  # decodes everything now: a truncated file fails here
            img = ImageOps.exif_transpose(img) or img
            if img.mode != "RGB":
                if img.mode == "P" and "transparency" in img.info:
                    img = img.convert("RGBA")
                if img.mode.startswith("I;16"):
                    # 16-bit grey: scale to 8 bits instead of clipping.
                    img = img.convert("I").point(lambda v: v * (1.0 / 256.0)).convert("L")
                img = img.convert("RGB")
            return img
    except CorruptImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CorruptImageError(f"decompression bomb refused: {e}") from None
    except MemoryError:
        raise CorruptImageError("out of memory while decoding") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, struct.error, ... on bad data
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            msg = f"truncated file: {msg}"
        raise CorruptImageError(f"cannot decode image: {msg}") from None
