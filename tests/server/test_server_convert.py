"""Request validation of codes and metadata conversions (unit level)."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.codes import Codes
from cbir.server.convert import from_struct, pb_to_codes, to_struct
from cbir.server.security import split_address
from cbir.v1 import search_pb2 as pb


def test_pb_to_codes_validates_the_one_format():
    c = Codes.from_bits(np.array([[1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]], np.uint8))  # 12 bits
    assert pb_to_codes(pb.Code(data=c.packed[0].tobytes(), nbits=12), 12) == c
    with pytest.raises(ValueError, match="expects 12 bits"):
        pb_to_codes(pb.Code(data=c.packed[0].tobytes(), nbits=16), 12)
    with pytest.raises(ValueError, match="need exactly 2"):
        pb_to_codes(pb.Code(data=b"\x00", nbits=12), 12)
    with pytest.raises(ValueError, match="pad bits"):
        pb_to_codes(pb.Code(data=b"\x00\x01", nbits=12), 12)


def test_struct_round_trip_keeps_integers():
    meta = {"labels": [3, 7], "source": "a/b.png", "score": 0.5, "nested": {"n": 2, "ok": True}, "none": None}
    assert from_struct(to_struct(meta)) == meta
    assert from_struct(to_struct({"x": np.int64(4), "arr": np.arange(3)})) == {"x": 4, "arr": [0, 1, 2]}


def test_split_address():
    assert split_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_address("[::1]:0") == ("::1", 0)
    assert split_address("localhost:1") == ("localhost", 1)
    for bad in ("nohost", ":50051", "h:port", "h:70000", "[::1]"):
        with pytest.raises(ValueError):
            split_address(bad)
