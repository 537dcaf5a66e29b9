"""Decoding of image files: the one decoder of cbir (datasets, index builds and the server).

Every image cbir reads goes through :func:`decode_image`: the header is read first (Pillow's
``Image.open`` is lazy), the format and the declared size are checked against the caller's
limits, and only then are the pixels decoded. Formats whose Pillow opener runs an external
program (EPS/PostScript through Ghostscript) are never opened; the server passes the stricter
allowlist :data:`SAFE_FORMATS`. A failed decode raises :class:`CorruptImageError` carrying only
a message: no traceback, frame or half-decoded image stays reachable from the error, so the
memory of a refused image is released as soon as the call returns.
"""

from __future__ import annotations

import io
import struct
from typing import Sequence

from PIL import Image, ImageOps

__all__ = ["CorruptImageError", "decode_image", "probe_image", "resolve_formats", "SAFE_FORMATS", "NEVER_FORMATS"]

# What a server accepts by default: common raster formats decoded in-process by Pillow's C code.
SAFE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Never opened, whatever the caller asks: Pillow hands these to Ghostscript (attacker PostScript).
NEVER_FORMATS = frozenset({"EPS", "PS", "PDF"})
# zlib cannot expand data by more than ~1032x: a PNG whose IDAT chunks are shorter than
# raw_size / _ZLIB_MAX_RATIO cannot hold its declared pixels (truncated, or a bomb).
_ZLIB_MAX_RATIO = 1100


class CorruptImageError(ValueError):
    """An image that cannot be decoded (or is refused by a limit); the message says why."""


def resolve_formats(formats: Sequence[str] | None) -> tuple[str, ...]:
    """The Pillow format ids to try: ``formats`` (upper-cased) or every registered one, minus
    :data:`NEVER_FORMATS`."""
    Image.init()  # registers every plugin once (cheap afterwards)
    if formats is None:
        wanted = list(Image.OPEN)
    else:
        wanted = [str(f).upper() for f in formats]
        unknown = [f for f in wanted if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown image format(s) {unknown}; Pillow reads {sorted(Image.OPEN)}")
    return tuple(f for f in wanted if f not in NEVER_FORMATS)


def _open(data: bytes, formats: Sequence[str] | None) -> Image.Image:
    """Header only (lazy ``Image.open``); raises :class:`CorruptImageError` with a reason."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise CorruptImageError("empty file (0 bytes)")
    allowed = resolve_formats(formats)
    reason = None
    try:
        return Image.open(io.BytesIO(bytes(data)), formats=list(allowed))
    except Image.UnidentifiedImageError:
        head = bytes(data[:8])
        reason = f"not a recognised image format ({len(data)} bytes, starts with {head!r})"
        if formats is not None:
            reason += f"; accepted formats: {', '.join(allowed)}"
    except Image.DecompressionBombError as e:  # over 2 x PIL.Image.MAX_IMAGE_PIXELS, whatever the caller's limit
        reason = f"image too large (possible decompression bomb): {e}"
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad headers
        reason = f"cannot read image header: {str(e) or type(e).__name__}"
    raise CorruptImageError(reason)


def _check_size(img: Image.Image, data: bytes, limit: int | None) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise CorruptImageError(f"invalid image size {w}x{h}")
    if limit is not None and w * h > limit:
        raise CorruptImageError(
            f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {limit} "
            "(possible decompression bomb); send a smaller image"
        )
    if img.format == "PNG":
        _check_png_data(data, img)


def _check_png_data(data: bytes, img: Image.Image) -> None:
    """Refuse a PNG whose compressed data cannot possibly fill its declared size, before Pillow
    allocates the full image (the 69-byte "4000x4000 with an empty IDAT" bomb)."""
    w, h = img.size
    bits = {"1": 1, "L": 8, "P": 8, "LA": 16, "RGB": 24, "RGBA": 32, "I;16": 16, "I;16B": 16, "I": 32, "RGBX": 32}.get(
        img.mode, 8
    )
    raw = h * (1 + (w * bits + 7) // 8)
    idat, pos, n = 0, 8, len(data)
    while pos + 8 <= n:
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if ctype in (b"IDAT", b"fdAT"):
            idat += length
        if ctype == b"IEND":
            break
        pos += 12 + length
    idat = min(idat, n)
    if raw > _ZLIB_MAX_RATIO * idat + 4096:
        raise CorruptImageError(
            f"truncated file: PNG declares {w}x{h} ({raw} raw bytes) but holds only {idat} bytes "
            "of compressed image data (truncated or a decompression bomb)"
        )


def probe_image(data: bytes, *, formats: Sequence[str] | None = None) -> tuple[int, int, str]:
    """``(width, height, format)`` from the header alone (no pixel is decoded)."""
    img = _open(data, formats)
    try:
        return img.size[0], img.size[1], str(img.format)
    finally:
        img.close()


def decode_image(data: bytes, *, max_pixels: int | None = None, formats: Sequence[str] | None = None) -> Image.Image:
    """Decode the bytes of an image file into a fully loaded RGB :class:`PIL.Image.Image`.

    * ``formats``: the Pillow formats accepted (e.g. :data:`SAFE_FORMATS`); default every format
      Pillow reads except :data:`NEVER_FORMATS` (EPS/PS/PDF are never opened);
    * the header is read first: an image with more than ``max_pixels`` pixels (default
      ``PIL.Image.MAX_IMAGE_PIXELS``) is refused before any pixel is decoded, as is a PNG whose
      compressed data is too short for its declared size;
    * grey, palette, alpha, CMYK, 16-bit ... are converted to RGB (transparent pixels are
      composited as Pillow's ``convert("RGB")`` does); the EXIF orientation is applied;
    * the whole image is decoded here (``.load()``), so a truncated file fails now and not in
      the middle of a transform.

    Raises :class:`CorruptImageError` with the reason for anything that cannot be decoded.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    img = _open(data, formats)
    reason = None
    try:
        _check_size(img, data, limit)
        img.load()  # decodes everything now: a truncated file fails here
        out = ImageOps.exif_transpose(img) or img
        if out.mode != "RGB":
            if out.mode == "P" and "transparency" in out.info:
                out = out.convert("RGBA")
            if out.mode.startswith("I;16"):
                # 16-bit grey: scale to 8 bits instead of clipping.
                out = out.convert("I").point(lambda v: v * (1.0 / 256.0)).convert("L")
            out = out.convert("RGB")
        if out is img:
            img = None  # handed to the caller: not closed below
        return out
    except CorruptImageError as e:
        reason = str(e)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        reason = f"decompression bomb refused: {e}"
    except MemoryError:
        reason = "out of memory while decoding"
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, struct.error, ...
        msg = str(e) or type(e).__name__
        reason = f"truncated file: {msg}" if "truncated" in msg.lower() else f"cannot decode image: {msg}"
    finally:
        if img is not None:
            img.close()  # frees the source (or partly decoded) pixels now, not at the next GC
        img = None
    # raised outside the except blocks: no __context__, no traceback into Pillow's frames
    raise CorruptImageError(reason)
