"""The one binary-code format of cbir, and the orders defined on it.

Every part of cbir (hashers, index, server, metrics) exchanges codes as :class:`Codes`:

* ``packed`` is a C-contiguous ``uint8`` array of shape ``(N, ceil(B / 8))``;
* bit ``j`` of a code (``0 <= j < B``) is bit ``7 - j % 8`` of byte ``j // 8``, i.e. **bit 0 is
  the most significant bit of byte 0** (``numpy.packbits(..., bitorder="big")``);
* the ``8 * ceil(B / 8) - B`` pad bits at the end of the last byte are always 0.

Bit 0 is the most important bit. For DDTL codes the leading bits are the class bits (most
significant class bit first), followed by the root-to-leaf decision path of the tree.

Orders
------
*Lexicographic order* (Darlow 2022, ch. 3: "sort by bit-wise differences from left to right"):
for a query ``q``, database codes are ranked by the ascending unsigned integer value of
``q XOR c`` read big-endian (bit 0 is the most significant), ties (identical codes) by ascending
id. Equivalently: longer common prefix with the query first; among codes with the same common
prefix, recursively the same rule on the remaining bits. Because the pad bits are zero the
packed bytes can be compared directly with ``memcmp``.

*Hamming order*: ascending Hamming distance, ties by the lexicographic order above (so ties
are broken by bit importance, then id). Every ranking in cbir is one of these two total orders;
no ranking depends on the storage order of the database.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "json_default",
    "Codes",
    "CodeLayout",
    "pack_bits",
    "unpack_bits",
    "hamming_distance",
    "common_prefix_length",
    "xor_prefix_length",
    "xor_keys",
    "rank",
    "lex_order",
    "ORDERS",
]

ORDERS = ("lex", "hamming")

# Number of leading zero bits of each byte value (8 for 0).
_LEADING_ZEROS = np.array([8 - int(v).bit_length() for v in range(256)], dtype=np.int32)


def _nbytes(nbits: int) -> int:
    return (nbits + 7) // 8


def _pad_mask(nbits: int) -> int:
    """Mask of the valid (non-pad) bits of the last byte."""
    rem = nbits % 8
    return 0xFF if rem == 0 else (0xFF << (8 - rem)) & 0xFF


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a ``(N, B)`` array of 0/1 (or bool) values into ``(N, ceil(B/8))`` uint8, MSB first."""
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise ValueError(f"pack_bits expects a 2-D (N, B) array of bits, got shape {bits.shape}")
    if bits.dtype != np.bool_:
        if bits.size and not np.isin(bits, (0, 1)).all():
            raise ValueError("pack_bits expects only 0/1 values; threshold your outputs first")
        bits = bits.astype(np.bool_)
    return np.ascontiguousarray(np.packbits(bits, axis=1, bitorder="big"))


def unpack_bits(packed: np.ndarray, nbits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``(N, ceil(B/8))`` uint8 -> ``(N, B)`` uint8 of 0/1."""
    packed = np.asarray(packed, dtype=np.uint8)
    return np.unpackbits(packed, axis=1, count=nbits, bitorder="big")


@dataclass(frozen=True, eq=False)
class Codes:
    """A batch of ``N`` binary codes of ``nbits`` bits each, packed MSB first (see module doc)."""

    packed: np.ndarray
    nbits: int

    def __post_init__(self) -> None:
        if not isinstance(self.nbits, (int, np.integer)) or self.nbits <= 0:
            raise ValueError(f"nbits must be a positive integer, got {self.nbits!r}")
        packed = np.asarray(self.packed)
        if packed.dtype != np.uint8:
            raise ValueError(f"Codes.packed must be uint8, got {packed.dtype}; use Codes.from_bits")
        if packed.ndim == 1 and packed.size == 0:
            packed = packed.reshape(0, _nbytes(int(self.nbits)))
        if packed.ndim != 2 or packed.shape[1] != _nbytes(int(self.nbits)):
            raise ValueError(
                f"Codes.packed must have shape (N, {_nbytes(int(self.nbits))}) for {self.nbits} bits,"
                f" got {packed.shape}"
            )
        mask = _pad_mask(int(self.nbits))
        if mask != 0xFF and len(packed) and (packed[:, -1] & ~np.uint8(mask)).any():
            raise ValueError("pad bits of the last byte must be zero (bit 0 = MSB of byte 0)")
        object.__setattr__(self, "packed", np.ascontiguousarray(packed))
        object.__setattr__(self, "nbits", int(self.nbits))

    # construction ---------------------------------------------------------------------------
    @classmethod
    def _trusted(cls, packed: np.ndarray, nbits: int) -> "Codes":
        """A ``Codes`` of rows the index itself produced (C-contiguous uint8 of the right width,
        pad bits zero), without re-validating them: the per-query result paths, where the
        checks of ``__post_init__`` cost more than the search."""
        c = object.__new__(cls)
        object.__setattr__(c, "packed", packed)
        object.__setattr__(c, "nbits", nbits)
        return c

    @classmethod
    def from_bits(cls, bits: np.ndarray) -> "Codes":
        bits = np.asarray(bits)
        if bits.ndim != 2:
            raise ValueError(f"expected a (N, B) array of bits, got shape {bits.shape}")
        return cls(pack_bits(bits), bits.shape[1])

    @classmethod
    def from_bytes(cls, data: Iterable[bytes], nbits: int) -> "Codes":
        nb = _nbytes(nbits)
        buf = b"".join(data)
        if len(buf) % nb:
            raise ValueError(f"byte length {len(buf)} is not a multiple of {nb} ({nbits} bits)")
        return cls(np.frombuffer(buf, dtype=np.uint8).reshape(-1, nb).copy(), nbits)

    @classmethod
    def from_hex(cls, hexes: Sequence[str] | str, nbits: int) -> "Codes":
        if isinstance(hexes, str):
            hexes = [hexes]
        nb = _nbytes(nbits)
        out = []
        for h in hexes:
            raw = bytes.fromhex(h)
            if len(raw) != nb:
                raise ValueError(f"hex code {h!r} has {len(raw)} bytes; {nbits} bits need {nb}")
            out.append(raw)
        return cls.from_bytes(out, nbits)

    @classmethod
    def empty(cls, nbits: int) -> "Codes":
        return cls(np.zeros((0, _nbytes(nbits)), dtype=np.uint8), nbits)

    @classmethod
    def concat(cls, parts: Sequence["Codes"]) -> "Codes":
        if not parts:
            raise ValueError("Codes.concat needs at least one Codes")
        nbits = parts[0].nbits
        if any(p.nbits != nbits for p in parts):
            raise ValueError("cannot concatenate codes of different bit counts")
        return cls(np.concatenate([p.packed for p in parts], axis=0), nbits)

    # views ----------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes per code."""
        return self.packed.shape[1]

    def __len__(self) -> int:
        return self.packed.shape[0]

    def __getitem__(self, idx) -> "Codes":
        sel = self.packed[idx]
        if sel.ndim == 1:
            sel = sel[None, :]
        return Codes(sel, self.nbits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codes) and other.nbits == self.nbits and np.array_equal(other.packed, self.packed)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Codes(n={len(self)}, nbits={self.nbits})"

    def to_bits(self) -> np.ndarray:
        return unpack_bits(self.packed, self.nbits)

    def to_bytes_list(self) -> list[bytes]:
        return [row.tobytes() for row in self.packed]

    def to_hex(self) -> list[str]:
        return [row.tobytes().hex() for row in self.packed]

    def prefix(self, nbits: int) -> "Codes":
        """The first ``nbits`` bits of every code (pad bits re-zeroed)."""
        if not 0 < nbits <= self.nbits:
            raise ValueError(f"prefix length must be in 1..{self.nbits}, got {nbits}")
        packed = self.packed[:, : _nbytes(nbits)].copy()
        packed[:, -1] &= np.uint8(_pad_mask(nbits))
        return Codes(packed, nbits)

    def permute_bits(self, order: Sequence[int]) -> "Codes":
        """New codes whose bit ``j`` is this code's bit ``order[j]``."""
        perm = np.asarray(order, dtype=np.int64)
        if sorted(perm.tolist()) != list(range(self.nbits)):
            raise ValueError(f"order must be a permutation of 0..{self.nbits - 1}")
        return Codes.from_bits(self.to_bits()[:, perm])

    def as_uint64(self) -> np.ndarray:
        """Codes of at most 64 bits as big-endian unsigned integers, left-aligned (pad bits 0).

        The integer order of these values is the lexicographic order of the codes.
        """
        if self.nbits > 64:
            raise ValueError(f"as_uint64 needs nbits <= 64, got {self.nbits}")
        buf = np.zeros((len(self), 8), dtype=np.uint8)
        buf[:, : self.nbytes] = self.packed
        return buf.view(">u8").reshape(-1).astype(np.uint64)


def json_default(o):
    """``json.dumps(..., default=json_default)``: numpy scalars as Python numbers, arrays as
    lists, paths as strings, :class:`Codes` as hex strings; anything else is a ``TypeError``
    naming the type (metadata and reports must stay plain JSON)."""
    from pathlib import PurePath

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, PurePath):
        return str(o)
    if isinstance(o, Codes):
        return o.to_hex()
    raise TypeError(f"a value of type {type(o).__name__} is not JSON serialisable")


def _check_pair(a: Codes, b: Codes) -> None:
    if a.nbits != b.nbits:
        raise ValueError(f"bit counts differ: {a.nbits} vs {b.nbits}")


def hamming_distance(a: Codes, b: Codes) -> np.ndarray:
    """``(len(a), len(b))`` int32 matrix of Hamming distances."""
    _check_pair(a, b)
    x = a.packed[:, None, :] ^ b.packed[None, :, :]
    return np.bitwise_count(x).sum(axis=2, dtype=np.int32)


def xor_prefix_length(x: np.ndarray, nbits: int) -> np.ndarray:
    """Leading zero bits of packed XOR rows ``x`` (``(..., nbytes)`` uint8, e.g. ``a ^ b``),
    i.e. the common-prefix length of the two XORed codes; ``nbits`` where they are equal.
    int64, shape ``x.shape[:-1]``. The one place that reads bit positions off XOR bytes."""
    x = np.asarray(x, dtype=np.uint8)
    if x.shape[-1] == 0:
        return np.full(x.shape[:-1], nbits, dtype=np.int64)
    nz = x != 0
    first = np.argmax(nz, axis=-1)
    first_byte = np.take_along_axis(x, first[..., None], axis=-1)[..., 0]
    out = first.astype(np.int64) * 8 + _LEADING_ZEROS[first_byte]
    return np.where(nz.any(axis=-1), out, nbits)


def common_prefix_length(a: Codes, b: Codes) -> np.ndarray:
    """``(len(a), len(b))`` int32 matrix: number of leading bits on which the codes agree."""
    _check_pair(a, b)
    return xor_prefix_length(a.packed[:, None, :] ^ b.packed[None, :, :], a.nbits).astype(np.int32)


def xor_keys(query: Codes, db: Codes) -> np.ndarray:
    """``(len(query), len(db), nbytes)`` uint8 XOR of each query with each database code."""
    _check_pair(query, db)
    return query.packed[:, None, :] ^ db.packed[None, :, :]


def _ids_or_default(n: int, ids: np.ndarray | None) -> np.ndarray:
    if ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {ids.shape}")
    return ids


def _sort_keys_one(q: np.ndarray, db: Codes, ids: np.ndarray, order: str) -> list[np.ndarray]:
    """Sort keys for ``np.lexsort`` (last key is primary) for one packed query row."""
    x = db.packed ^ q[None, :]
    if x.shape[1] <= 8:
        buf = np.zeros((len(db), 8), dtype=np.uint8)
        buf[:, : x.shape[1]] = x
        lex = [buf.view(">u8").reshape(-1).astype(np.uint64)]
    else:  # byte columns, most significant last (= primary for lexsort)
        lex = [x[:, j] for j in range(x.shape[1] - 1, -1, -1)]
    keys = [ids] + lex
    if order == "hamming":
        keys.append(np.bitwise_count(x).sum(axis=1, dtype=np.int32))
    return keys


def rank(
    query: Codes,
    db: Codes,
    k: int | None = None,
    order: str = "lex",
    ids: np.ndarray | None = None,
) -> np.ndarray:
    """Brute-force ranking: ``(len(query), min(k, N))`` positions into ``db``, best first.

    ``order="lex"``: ascending ``q XOR c`` (big-endian), ties by ascending id.
    ``order="hamming"``: ascending Hamming distance, then the lexicographic order.
    ``ids`` are the database ids used for tie-breaking (default: position). This is the
    reference implementation that every fast search path is tested against.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    _check_pair(query, db)
    n = len(db)
    ids = _ids_or_default(n, ids)
    kk = n if k is None else max(0, min(int(k), n))
    out = np.empty((len(query), kk), dtype=np.int64)
    for i in range(len(query)):
        perm = np.lexsort(_sort_keys_one(query.packed[i], db, ids, order))
        out[i] = perm[:kk]
    return out


def lex_order(codes: Codes, ids: np.ndarray | None = None) -> np.ndarray:
    """Permutation sorting ``codes`` ascending as big-endian integers, ties by id (tree order)."""
    ids = _ids_or_default(len(codes), ids)
    zero = Codes(np.zeros((1, codes.nbytes), dtype=np.uint8), codes.nbits)
    return np.lexsort(_sort_keys_one(zero.packed[0], codes, ids, "lex"))


@dataclass(frozen=True)
class CodeLayout:
    """What the bits of a model's codes mean; saved with every model and index.

    ``class_bits`` leading bits encode the class (binary of the argmax class, MSB first, or one
    bit per label for multi-label data); the next ``depth`` bits are a root-to-leaf decision
    path (DDTL); any remaining bits are "free" hash bits (e.g. DMUH, HEGH), ordered by
    importance when ``bit_order`` says so.
    """

    nbits: int
    class_bits: int = 0
    depth: int = 0
    multilabel: bool = False
    class_names: tuple[str, ...] = ()
    method: str = ""
    bit_order: str = "model"  # "model" or e.g. "uncertainty" (most certain bits first)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nbits <= 0:
            raise ValueError(f"nbits must be positive, got {self.nbits}")
        if self.class_bits < 0 or self.depth < 0:
            raise ValueError("class_bits and depth must be >= 0")
        if self.class_bits + self.depth > self.nbits:
            raise ValueError(f"class_bits ({self.class_bits}) + depth ({self.depth}) exceed nbits ({self.nbits})")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    @property
    def nbytes(self) -> int:
        return _nbytes(self.nbits)

    @property
    def free_bits(self) -> int:
        return self.nbits - self.class_bits - self.depth

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CodeLayout":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CodeLayout fields {sorted(unknown)}")
        d = dict(d)
        d["class_names"] = tuple(d.get("class_names", ()))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "CodeLayout":
        return cls.from_dict(json.loads(s))


def class_bits_for(num_classes: int) -> int:
    """Bits needed to write a class index 0..m-1 in binary: ceil(log2 m), at least 1."""
    if num_classes < 1:
        raise ValueError("need at least one class")
    return max(1, int(np.ceil(np.log2(num_classes))))
