"""Conversions between protobuf messages and cbir types (the one code format)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from cbir.client._common import intify  # the one Struct-number rule, shared with the client
from cbir.codes import CodeLayout, Codes
from cbir.v1 import search_pb2 as pb

__all__ = ["code_to_pb", "codes_to_pb", "pb_to_codes", "to_struct", "from_struct", "layout_to_pb", "json_safe"]


def code_to_pb(codes: Codes, i: int = 0) -> pb.Code:
    return pb.Code(data=codes.packed[i].tobytes(), nbits=codes.nbits)


def codes_to_pb(codes: Codes) -> list[pb.Code]:
    return [pb.Code(data=row.tobytes(), nbits=codes.nbits) for row in codes.packed]


def pb_to_codes(code: pb.Code, expected_nbits: int) -> Codes:
    """Validate a request code against the index bit count; ``ValueError`` says what is wrong."""
    if code.nbits != expected_nbits:
        raise ValueError(f"code has {code.nbits} bits but this index expects {expected_nbits} bits")
    nbytes = (expected_nbits + 7) // 8
    if len(code.data) != nbytes:
        raise ValueError(f"code data has {len(code.data)} bytes; {expected_nbits} bits need exactly {nbytes}")
    # read-only view of the request bytes (queries are never modified); Codes checks pad bits
    return Codes(np.frombuffer(code.data, dtype=np.uint8).reshape(1, nbytes), expected_nbits)


def json_safe(x: Any) -> Any:
    """Plain JSON-like Python data (numpy scalars/arrays, tuples, dataclasses converted)."""
    import dataclasses

    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x)
    if x is None or isinstance(x, str):
        return x
    if isinstance(x, bytes):
        return x.hex()
    if isinstance(x, CodeLayout):
        return x.to_dict()
    if isinstance(x, Codes):
        return x.to_hex()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return json_safe(dataclasses.asdict(x))
    return str(x)


def to_struct(d: dict | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if d:
        s.update(json_safe(d))
    return s


def _from_value(v: struct_pb2.Value, path: str) -> Any:
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        x = v.number_value
        if not math.isfinite(x):
            raise ValueError(f"metadata {path} is {x}: numbers must be finite (NaN and Infinity cannot be stored)")
        return x
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "null_value" or kind is None:
        return None
    if kind == "struct_value":
        return {k: _from_value(x, f"{path}.{k}") for k, x in v.struct_value.fields.items()}
    return [_from_value(x, f"{path}[{i}]") for i, x in enumerate(v.list_value.values)]


def from_struct(s: struct_pb2.Struct) -> dict:
    """A request's metadata as plain JSON data; ``ValueError`` names a non-finite number."""
    return intify({k: _from_value(v, k) for k, v in s.fields.items()})


def layout_to_pb(layout: CodeLayout | None, nbits: int) -> pb.CodeLayout:
    if layout is None:
        return pb.CodeLayout(nbits=nbits)
    return pb.CodeLayout(
        nbits=layout.nbits,
        class_bits=layout.class_bits,
        depth=layout.depth,
        multilabel=layout.multilabel,
        class_names=list(layout.class_names),
        method=layout.method,
        bit_order=layout.bit_order,
    )
