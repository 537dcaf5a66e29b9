"""Result types of the index and the exact tie-breaking helpers shared by every search path.

All orders are those of :mod:`cbir.codes` (lexicographic: ascending big-endian ``q XOR c``,
ties by ascending id; Hamming: ascending distance, then the lexicographic order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cbir.codes import _LEADING_ZEROS, Codes  # the one table of leading zeros per byte

__all__ = ["Item", "PrefixPage", "SearchResult", "hamming_to", "order_candidates", "prefix_len_to"]


@dataclass(frozen=True, eq=False)
class SearchResult:
    """Ranked hits for one query, best first.

    ``ids``: int64 (n,); ``codes``: :class:`Codes` (n rows); ``distances``: int32 (n,) Hamming
    distance to the query; ``prefix_lengths``: int32 (n,) number of leading bits shared with the
    query; ``order``: ``"lex"`` or ``"hamming"`` (the order the hits are sorted by);
    ``next_cursor``: for lexicographic results, an opaque str that continues the ranking after
    the last hit (``search_lex(code, k, cursor=...)``, O(k)), None when it is complete.
    """

    ids: np.ndarray
    codes: Codes
    distances: np.ndarray
    prefix_lengths: np.ndarray
    order: str = "lex"
    next_cursor: str | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __iter__(self):
        """Yield ``(id, distance, prefix_length)`` tuples."""
        for i in range(len(self)):
            yield int(self.ids[i]), int(self.distances[i]), int(self.prefix_lengths[i])


@dataclass(frozen=True, eq=False)
class PrefixPage:
    """One page of a prefix listing: ``ids``, ``codes`` in ascending code order (ties by id),
    and ``next_cursor`` (opaque str to pass back, ``None`` when the listing is complete)."""

    ids: np.ndarray
    codes: Codes
    next_cursor: str | None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True, eq=False)
class Item:
    """One stored item: ``id``, ``code`` (1-row :class:`Codes`), ``meta`` (dict or None),
    ``conf`` (float32 (B,) per-bit confidence or None)."""

    id: int
    code: Codes
    meta: dict | None = None
    conf: np.ndarray | None = field(default=None)


def hamming_to(q: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """Hamming distances (int32) between one packed query row and packed rows."""
    if len(packed) == 0:
        return np.zeros(0, dtype=np.int32)
    return np.bitwise_count(packed ^ q[None, :]).sum(axis=1, dtype=np.int32)


def prefix_len_to(q: np.ndarray, packed: np.ndarray, nbits: int) -> np.ndarray:
    """Common-prefix lengths (int32) between one packed query row and packed rows."""
    n = len(packed)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    x = packed ^ q[None, :]
    nz = x != 0
    first = np.argmax(nz, axis=1)
    fb = x[np.arange(n), first]
    out = first * 8 + _LEADING_ZEROS[fb]
    return np.where(nz.any(axis=1), out, nbits).astype(np.int32)


#: 2^0 .. 2^63: ``searchsorted(_POW2, x, "right")`` is the bit length of a uint64 ``x``
_POW2 = np.array([1 << b for b in range(64)], dtype=np.uint64)
_CPL_TABLES: dict[int, np.ndarray] = {}


def prefix_len_u64(x: np.ndarray, nbits: int) -> np.ndarray:
    """Common-prefix lengths (int32) from ``q XOR c`` as big-endian uint64 (codes <= 64 bits):
    ``64 - bit_length(x)`` (capped at ``nbits``), by one binary search per value in the 64
    powers of two and a table lookup."""
    table = _CPL_TABLES.get(nbits)
    if table is None:
        table = _CPL_TABLES[nbits] = np.minimum(64 - np.arange(65), nbits).astype(np.int32)
    return table[_POW2.searchsorted(x, side="right")]


def hamming_result_u64(
    packed: np.ndarray, ids: np.ndarray, x: np.ndarray, dist: np.ndarray, nbits: int, k: int | None
) -> SearchResult:
    """Candidates of a <= 64-bit index (``x`` = their ``q XOR c`` as uint64) in the exact
    Hamming order, cut to ``k``: one lexsort, prefix lengths from ``x``."""
    perm = np.lexsort((ids, x, dist))
    if k is not None:
        perm = perm[:k]
    x = x[perm]
    return SearchResult(
        np.asarray(ids[perm], dtype=np.int64),
        Codes._trusted(np.ascontiguousarray(packed[perm]), nbits),
        np.asarray(dist[perm], dtype=np.int32),
        prefix_len_u64(x, nbits),
        "hamming",
    )


def xor_sort_keys(q: np.ndarray, packed: np.ndarray) -> list[np.ndarray]:
    """Keys for ``np.lexsort`` (last = primary) giving ascending big-endian ``q XOR c``."""
    x = packed ^ q[None, :]
    nb = x.shape[1]
    if nb <= 8:
        buf = np.zeros((len(x), 8), dtype=np.uint8)
        buf[:, :nb] = x
        return [buf.view(">u8").reshape(-1)]
    return [x[:, j] for j in range(nb - 1, -1, -1)]


def order_candidates(
    q: np.ndarray,
    packed: np.ndarray,
    ids: np.ndarray,
    order: str,
    dist: np.ndarray | None = None,
) -> np.ndarray:
    """Permutation sorting candidate rows in the exact cbir order (``lex`` or ``hamming``)."""
    keys = [np.asarray(ids, dtype=np.int64)] + xor_sort_keys(q, packed)
    if order == "hamming":
        keys.append(hamming_to(q, packed) if dist is None else dist)
    return np.lexsort(keys)


def make_result(
    q: np.ndarray,
    packed: np.ndarray,
    ids: np.ndarray,
    nbits: int,
    order: str,
    dist: np.ndarray | None = None,
    next_cursor: str | None = None,
) -> SearchResult:
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1, q.shape[0])
    return SearchResult(
        ids=np.asarray(ids, dtype=np.int64),
        codes=Codes(packed, nbits),
        distances=hamming_to(q, packed) if dist is None else np.asarray(dist, dtype=np.int32),
        prefix_lengths=prefix_len_to(q, packed, nbits),
        order=order,
        next_cursor=next_cursor,
    )


def empty_result(q: np.ndarray, nbits: int, order: str) -> SearchResult:
    return make_result(q, np.zeros((0, q.shape[0]), np.uint8), np.zeros(0, np.int64), nbits, order)
