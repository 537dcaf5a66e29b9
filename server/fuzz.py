"""Hostile requests for ``cbir.v1.SearchService``: seeded, bounded, sent as raw bytes.

Used by the fuzz tests (``tests/server/test_server_fuzz.py``) and ``benchmarks/bench_hostile.py``.
:func:`hostile_requests` yields ``(method, body bytes, kind)``; :func:`raw_caller` sends a body to
a method over a raw channel (identity serializers: the bytes are on the wire as given, nothing
is parsed on the client). Kinds: raw random bytes, mutated valid messages, wrong lengths,
extreme numbers, image bombs / hostile images, huge batches, non-finite metadata.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Iterator, cast

import numpy as np
from google.protobuf.message import Message

from cbir.v1 import search_pb2 as pb

__all__ = ["METHODS", "png_bomb", "hostile_images", "hostile_requests", "raw_caller", "rss_bytes", "BAD_INPUT_OK"]

SERVICE = "cbir.v1.SearchService"
METHODS = ("Search", "BatchSearch", "Add", "Delete", "GetStats", "GetCode", "Ping")
# what a bad request may get: anything but INTERNAL / UNKNOWN (and the server stays up)
BAD_INPUT_OK = frozenset(
    {
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "OUT_OF_RANGE",
    }
)


def _chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def png_bomb(width: int = 4000, height: int = 4000, idat: bytes = b"") -> bytes:
    """A PNG whose header declares ``width x height`` RGB but whose IDAT holds ``idat`` (57 bytes
    when empty): the "decompression bomb" of issue 12."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def hostile_images(rng: np.random.Generator) -> list[bytes]:
    """Image payloads no server should decode (or only within its limits)."""
    small = _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    gif = (
        b"GIF89a"
        + struct.pack("<HH", 65535, 65535)
        + b"\x00\x00\x00"
        + b",\x00\x00\x00\x00"
        + b"\xff\xff\xff\xff\x00\x02\x02D\x01\x00;"
    )
    bmp = (
        b"BM"
        + struct.pack("<IHHI", 70, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0)
    )
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n(/etc/passwd) (r) file pop showpage\n"
    pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    return [
        png_bomb(),  # 4000x4000 declared, empty IDAT
        png_bomb(60000, 60000),  # over any pixel limit
        png_bomb(4000, 4000, zlib.compress(b"\x00" * 20000)),  # a little data, far too little
        png_bomb(0, 10),  # invalid size
        small[: len(small) // 2],  # truncated
        small[:33],  # header only
        gif,
        bmp,
        eps,
        pdf,
        b"\xff\xd8\xff\xe0" + rng.bytes(64),  # JPEG magic, garbage
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + rng.bytes(32),
        b"II*\x00" + rng.bytes(40),  # TIFF magic, garbage
        b"",
    ]


def _valid_messages(rng: np.random.Generator, nbits: int, ids: list[int], image: bytes) -> list[tuple[str, Message]]:
    nbytes = (nbits + 7) // 8
    code = pb.Code(data=rng.bytes(nbytes), nbits=nbits)
    if nbits % 8:
        code.data = code.data[:-1] + bytes([code.data[-1] & (0xFF << (8 - nbits % 8)) & 0xFF])
    item_id = int(rng.choice(ids))
    return [
        ("Search", pb.SearchRequest(code=code, k=10)),
        ("Search", pb.SearchRequest(id=item_id, k=5, mode=pb.HAMMING, return_codes=True, return_metadata=True)),
        ("Search", pb.SearchRequest(code=code, k=5, mode=pb.PREFIX, prefix_bits=min(4, nbits))),
        ("Search", pb.SearchRequest(code=code, k=3, label_filter=["1", "c2"])),
        ("Search", pb.SearchRequest(image=image, k=3)),
        (
            "BatchSearch",
            pb.BatchSearchRequest(
                requests=[pb.SearchRequest(code=code, k=4), pb.SearchRequest(id=item_id, k=2, mode=pb.HYBRID)]
            ),
        ),
        ("Add", pb.AddRequest(items=[pb.Item(id=item_id, code=code)])),
        ("Delete", pb.DeleteRequest(ids=[item_id, 2**63 - 1])),
        ("GetCode", pb.GetCodeRequest(images=[image], return_confidence=True)),
        ("GetStats", pb.GetStatsRequest()),
        ("Ping", pb.PingRequest()),
    ]


def _extreme(rng: np.random.Generator, nbits: int, ids: list[int], image: bytes) -> list[tuple[str, Message]]:
    nbytes = (nbits + 7) // 8
    u32, u64 = 2**32 - 1, 2**64 - 1
    ok = pb.Code(data=bytes(nbytes), nbits=nbits)
    add_nan = pb.AddRequest(items=[pb.Item(id=1, code=ok)])
    add_nan.items[0].metadata.fields["x"].number_value = float(rng.choice([np.nan, np.inf, -np.inf]))
    return [
        ("Search", pb.SearchRequest(code=ok, k=0)),
        ("Search", pb.SearchRequest(code=ok, k=u32)),
        ("Search", pb.SearchRequest(code=ok, k=10, offset=u32)),
        ("Search", pb.SearchRequest(code=ok, k=10_000, offset=1_000_000)),
        ("Search", pb.SearchRequest(code=ok, k=10, mode=pb.PREFIX, prefix_bits=u32)),
        ("Search", pb.SearchRequest(code=ok, k=10, mode=pb.HAMMING, radius=u32)),
        ("Search", pb.SearchRequest(code=ok, k=10, mode=cast(pb.SearchMode, int(rng.integers(4, 2**31 - 1))))),
        ("Search", pb.SearchRequest(id=u64, k=10)),
        (
            "Search",
            pb.SearchRequest(
                code=pb.Code(data=rng.bytes(int(rng.integers(0, 64))), nbits=int(rng.integers(0, u32))), k=10
            ),
        ),
        ("Search", pb.SearchRequest(code=pb.Code(data=bytes(nbytes + 1), nbits=nbits), k=10)),
        ("Search", pb.SearchRequest(code=pb.Code(data=b"\xff" * nbytes, nbits=nbits), k=10)),  # pad bits set (if any)
        ("Search", pb.SearchRequest(code=ok, k=10, mode=pb.PREFIX, prefix_bits=1, cursor=rng.bytes(20))),
        ("Search", pb.SearchRequest(code=ok, k=10, mode=pb.PREFIX, prefix_bits=1, cursor=b"abc:def" * 3)),
        ("Search", pb.SearchRequest(code=ok, k=10, label_filter=["\u0000", "x" * 10_000, "\U0001f600"])),
        ("Search", pb.SearchRequest(code=ok, k=10, cursor=b"x")),  # cursor outside PREFIX
        ("Search", pb.SearchRequest()),
        # search_prediction_set: only for an image query in LEXICOGRAPHIC mode on an ensemble server
        ("Search", pb.SearchRequest(code=ok, k=10, search_prediction_set=True)),
        ("Search", pb.SearchRequest(image=image, k=10, mode=pb.HAMMING, search_prediction_set=True)),
        ("Search", pb.SearchRequest(image=image, k=10, offset=3, label_filter=["1"], search_prediction_set=True)),
        ("Search", pb.SearchRequest(image=image, k=10_000, search_prediction_set=True)),
        (
            "BatchSearch",
            pb.BatchSearchRequest(requests=[pb.SearchRequest(image=image, k=5, search_prediction_set=True)] * 3),
        ),
        ("Add", add_nan),
        ("Add", pb.AddRequest(items=[pb.Item(id=u64, code=ok)])),
        ("Add", pb.AddRequest(items=[pb.Item(id=5, code=ok), pb.Item(id=5, code=ok)])),
        ("Add", pb.AddRequest(items=[pb.Item(id=6)])),
        ("Delete", pb.DeleteRequest(ids=[u64])),
        ("Delete", pb.DeleteRequest(ids=[int(rng.choice(ids))] * 2, must_exist=True)),
        ("Add", pb.AddRequest(items=[pb.Item(id=int(rng.choice(ids)), code=ok)], upsert=bool(rng.random() < 0.5))),
        ("GetCode", pb.GetCodeRequest(images=[b""] * 3)),
    ]


def _huge(rng: np.random.Generator, nbits: int, image: bytes) -> list[tuple[str, Message]]:
    ok = pb.Code(data=bytes((nbits + 7) // 8), nbits=nbits)
    which = int(rng.integers(0, 5))
    if which == 0:
        return [("BatchSearch", pb.BatchSearchRequest(requests=[pb.SearchRequest(code=ok, k=10_000)] * 200))]
    if which == 1:
        return [("BatchSearch", pb.BatchSearchRequest(requests=[pb.SearchRequest(code=ok, k=1)] * 10_001))]
    if which == 2:
        return [("GetCode", pb.GetCodeRequest(images=[png_bomb()] * 64))]
    if which == 3:
        return [("Delete", pb.DeleteRequest(ids=list(range(10_001))))]
    return [("BatchSearch", pb.BatchSearchRequest(requests=[pb.SearchRequest(image=image, k=1)] * 64))]


def _mutate(rng: np.random.Generator, raw: bytes) -> bytes:
    b = bytearray(raw)
    op = int(rng.integers(0, 5))
    if op == 0 and b:  # flip bytes
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
    elif op == 1 and b:  # truncate
        del b[int(rng.integers(0, len(b))) :]
    elif op == 2:  # insert random bytes
        at = int(rng.integers(0, len(b) + 1))
        b[at:at] = rng.bytes(int(rng.integers(1, 8)))
    elif op == 3 and b:  # a length prefix made huge
        at = int(rng.integers(0, len(b)))
        b[at : at + 1] = b"\xff\xff\xff\xff\x0f"
    else:  # bad UTF-8 in a string field / deep nesting
        b += b"\x4a\x02\xc3\x28" if rng.random() < 0.5 else b"\x0a" * 200
    return bytes(b)


def hostile_requests(n: int, seed: int, nbits: int, ids: list[int], image: bytes) -> Iterator[tuple[str, bytes, str]]:
    """``n`` hostile ``(method, body, kind)`` triples, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    imgs = hostile_images(rng)
    for i in range(n):
        r = rng.random()
        method = METHODS[int(rng.integers(0, len(METHODS)))]
        if r < 0.30:
            ln = int(rng.choice([0, 1, 3, 16, 64, 300]))
            body = b"\xff\xff\xff" if ln == 3 else rng.bytes(ln)
            yield method, body, "random"
        elif r < 0.60:
            method, msg = _valid_messages(rng, nbits, ids, image)[int(rng.integers(0, 11))]
            yield method, _mutate(rng, msg.SerializeToString()), "mutated"
        elif r < 0.80:
            cases = _extreme(rng, nbits, ids, image)
            method, msg = cases[int(rng.integers(0, len(cases)))]
            yield method, msg.SerializeToString(), "extreme"
        elif r < 0.97:
            bad = imgs[int(rng.integers(0, len(imgs)))]
            with_bad: list[tuple[str, Message]] = [
                ("Search", pb.SearchRequest(image=bad, k=5)),
                ("GetCode", pb.GetCodeRequest(images=[image, bad])),
                ("Add", pb.AddRequest(items=[pb.Item(id=7, image=bad)])),
                ("BatchSearch", pb.BatchSearchRequest(requests=[pb.SearchRequest(image=bad, k=1)])),
            ]
            method, msg = with_bad[i % 4]
            yield method, msg.SerializeToString(), "image"
        else:
            method, msg = _huge(rng, nbits, image)[0]
            yield method, msg.SerializeToString(), "huge"


def raw_caller(channel, method: str):
    """A callable sending raw bytes to ``method`` and returning raw bytes (identity serializers)."""
    return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None)


def rss_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    """Resident set size of a process (Linux ``/proc``); ``field`` ``RssAnon`` / ``RssFile`` for
    its anonymous (heap) and file-backed (e.g. the LMDB map) parts."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")
