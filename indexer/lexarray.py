"""Lexicographic top-k over a sorted ``head64`` array (codes of <= 64 bits).

The derived base keeps the codes in tree order as big-endian uint64 (``Derived.head64``,
memory-mapped), so the lexicographic top-k of a query is read from it with binary searches
(``searchsorted``) and one small sort: no per-key Python, no byte joins, no LMDB cursor.

Order: ascending ``x = q XOR c`` (unsigned), ties (equal codes) by id; rows of the base are
sorted by (code, id), so among equal ``x`` the row position is the id order.

Algorithm (:func:`topk`): every trie node ``q[:j]`` (the rows sharing the first ``j`` bits with
``q``) is one contiguous run of rows, and rows sharing a longer prefix come first. First a
window of ``WINDOW * k + WINDOW_EXTRA`` rows on each side of ``q``'s position is sorted by
``(x, position)``: its k-th smallest ``x`` names the run ``{x < B}`` (``B`` = 2^bit_length)
that holds the top-k, and when neither edge row of the window is in that run the run lies
inside the window, so the window's first k rows are the answer (the common case: one binary
search and one small sort). Otherwise the runs of all 65 depths are found by two vectorised
``searchsorted`` calls; with ``J`` the deepest depth whose run holds >= k rows, the answer is
the top-k of that run. A run much longer than k (:data:`DIRECT_EXTRA`, :data:`DIRECT_MIN`) is
not sorted whole: the run of depth ``J + 1`` (fewer than k rows) is, then the rings
``cpl == J``, ``cpl == J - 1``, ... (each one contiguous run: the sibling subtree) are searched
by the same procedure with the query's bit flipped, for the rows still needed.

Deleted rows (``alive`` mask) are skipped; a run whose live rows are fewer than k goes on to
the next rings.
"""

from __future__ import annotations

import numpy as np

_ALL = (1 << 64) - 1
#: MASKS[j]: the first j bits set (the trie node of depth j), j = 0..64
MASKS = np.array([_ALL ^ ((1 << (64 - j)) - 1) for j in range(65)], dtype=np.uint64)
NMASKS = ~MASKS
#: runs of at most DIRECT_EXTRA * k + DIRECT_MIN rows are sorted whole (else: the ring recursion)
DIRECT_EXTRA = 3
DIRECT_MIN = 64
#: the window sorted first spans WINDOW * k + WINDOW_EXTRA rows on each side of the query
WINDOW = 1
WINDOW_EXTRA = 32

_EMPTY_POS = np.zeros(0, np.int64)
_EMPTY_X = np.zeros(0, np.uint64)


def _sorted_rows(h: np.ndarray, qn, a: int, z: int, alive: np.ndarray | None):
    """Live rows of ``h[a:z]`` sorted by (x, position): (positions, x)."""
    x = h[a:z] ^ qn
    if alive is None:
        order = x.argsort(kind="stable")
        return order + a, x[order]
    rows = alive[a:z].nonzero()[0]
    x = x[rows]
    order = x.argsort(kind="stable")
    return rows[order] + a, x[order]


def _runs(seg: np.ndarray, lo: int, ml, mh, qn, k: int):
    """Runs of every depth in ``seg`` (row ``lo`` onwards): (starts, ends, deepest with >= k)."""
    los = seg.searchsorted(ml & qn) + lo
    his = seg.searchsorted(mh | qn, side="right") + lo
    return los, his, max(int(np.count_nonzero(his - los >= k)) - 1, 0)


def topk(
    h: np.ndarray,
    q: int,
    k: int,
    lo: int = 0,
    hi: int | None = None,
    alive: np.ndarray | None = None,
    depth: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(row positions int64, their ``q XOR h`` uint64) of the top-``k`` live rows of
    ``h[lo:hi]`` (sorted uint64) in the lexicographic order of ``q`` (a Python int < 2^64).
    ``depth``: every row of the range shares its first ``depth`` bits with ``q``."""
    if hi is None:
        hi = len(h)
    if k <= 0 or hi <= lo:
        return _EMPTY_POS, _EMPTY_X
    qn = np.uint64(q)
    # fast path: sort a window around q's position; the k-th smallest x there, xk, names the
    # trie run {x < B}, B = 2^bit_length(xk), holding the top-k; if neither edge row of the
    # window is in that run, the run lies inside the window and its first k rows are the answer
    p = int(h.searchsorted(qn)) if lo == 0 and hi == len(h) else lo + int(h[lo:hi].searchsorted(qn))
    a0, z0 = max(lo, p - WINDOW * k - WINDOW_EXTRA), min(hi, p + WINDOW * k + WINDOW_EXTRA)
    x = h[a0:z0] ^ qn
    rows = None
    if alive is not None:
        rows = alive[a0:z0].nonzero()[0]
        x = x[rows]
    order = x.argsort(kind="stable")
    if len(order) >= k:
        sel = order[:k]
        b = 1 << int(x[sel[-1]]).bit_length()
        if (a0 == lo or int(h[a0]) ^ q >= b) and (z0 == hi or int(h[z0 - 1]) ^ q >= b):
            return (sel if rows is None else rows[sel]) + a0, x[sel]
        # the run reaches past the window: find its ends (two binary searches), sort it whole
        if b < 1 << 64:
            seg = h[lo:hi]
            a = lo + int(seg.searchsorted(np.uint64(q & ~(b - 1))))
            z = lo + int(seg.searchsorted(np.uint64(q | (b - 1)), side="right"))
            if z - a <= DIRECT_EXTRA * k + DIRECT_MIN:
                pos, xr = _sorted_rows(h, qn, a, z, alive)
                return pos[:k], xr[:k]  # (>= k live rows: those of the window already)
    elif a0 == lo and z0 == hi:  # (the whole range, fewer than k live rows)
        return (order if rows is None else rows[order]) + a0, x[order]
    # the trie runs of every depth (two vectorised binary searches over the range)
    ml, mh = MASKS[depth:], NMASKS[depth:]
    seg = h[lo:hi]
    los, his, t = _runs(seg, lo, ml, mh, qn, k)
    a, z = int(los[t]), int(his[t])
    last = len(los) - 1
    if z - a <= DIRECT_EXTRA * k + DIRECT_MIN:
        pos, x = _sorted_rows(h, qn, a, z, alive)
        if len(pos) >= k or t == 0:
            return pos[:k], x[:k]
    elif t == last:  # more than k exact duplicates of q: the first ones by position (= id)
        rows = np.arange(a, z, dtype=np.int64) if alive is None else a + alive[a:z].nonzero()[0]
        if len(rows) >= k:
            return rows[:k], np.zeros(k, np.uint64)
    # the run of depth + t + 1 (fewer than k rows) whole, then the rings depth + t, ..., depth
    if t < last:
        pos, x = _sorted_rows(h, qn, int(los[t + 1]), int(his[t + 1]), alive)
    else:
        pos, x = _sorted_rows(h, qn, a, z, alive)
    parts_p, parts_x = [pos], [x]
    need = k - len(pos)
    for s in range(min(t, last - 1), -1, -1):
        if need <= 0:
            break
        j = depth + s  # the ring: rows whose common prefix with q is exactly j bits
        r_lo, r_hi = (int(los[s]), int(los[s + 1])) if los[s + 1] > los[s] else (int(his[s + 1]), int(his[s]))
        if r_hi <= r_lo:
            continue
        bit = 1 << (63 - j)
        sp, sx = topk(h, q ^ bit, need, r_lo, r_hi, alive, j + 1)
        if len(sp):
            parts_p.append(sp)
            parts_x.append(sx | np.uint64(bit))
            need -= len(sp)
    return np.concatenate(parts_p), np.concatenate(parts_x)


def merge(ids_a, x_a, ids_b, x_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of two lex-ordered candidate lists, by (x, id): (ids, x)."""
    ids = np.concatenate([ids_a, ids_b])
    x = np.concatenate([x_a, x_b])
    perm = np.lexsort((ids, x))[:k]
    return ids[perm], x[perm]
