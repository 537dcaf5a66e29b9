"""Exact multi-index hashing (Norouzi, Punjani & Fleet, "Fast exact search in Hamming space
with multi-index hashing", TPAMI 2014) over packed :class:`cbir.codes.Codes`.

The B bits are split into ``m`` contiguous substrings. Each substring table maps a substring
value to the positions of the items holding it (CSR: ``perm`` sorted by value, plus either a
direct ``offsets`` array of 2^s + 1 entries or the sorted values for ``searchsorted``).

k-NN: probe the tables at substring radius r = 0, 1, ... (values at exactly distance r, one
table at a time). After radius r is done in tables 0..i (and r - 1 in the others), every item not
yet seen has full distance >= m*r + i + 1 (pigeonhole), so once >= k seen items lie within
``m*r + i`` the answer (ties included) is complete. An item is counted once: at its first
(radius, table) discovery, decided from its substring distances, so no set is needed.
Range search with radius R probes every table to ``R // m``.

Positions refer to the rows of the ``codes`` array the tables were built from.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations

import numpy as np

from cbir.indexer.rows import RADIX_MIN, stable_argsort_u64

DIRECT_MAX_BITS = 24  # substring tables of at most this many bits are directly addressed


@lru_cache(maxsize=512)
def flip_masks(s: int, r: int) -> np.ndarray:
    """All ``s``-bit integers with exactly ``r`` bits set (uint64)."""
    if r > s:
        return np.zeros(0, dtype=np.uint64)
    if r == 0:
        return np.zeros(1, dtype=np.uint64)
    out = np.fromiter(
        (sum(1 << b for b in c) for c in combinations(range(s), r)),
        dtype=np.uint64,
        count=math.comb(s, r),
    )
    out.setflags(write=False)
    return out


def substring_values(packed: np.ndarray, start: int, s: int) -> np.ndarray:
    """Integer value (uint64) of bits ``start .. start+s-1`` of every packed code (bit 0 = MSB)."""
    b0, b1 = start // 8, (start + s - 1) // 8
    acc = np.zeros(len(packed), dtype=np.uint64)
    for b in range(b0, b1 + 1):
        acc = (acc << np.uint64(8)) | packed[:, b].astype(np.uint64)
    tail = (b1 + 1) * 8 - (start + s)
    return (acc >> np.uint64(tail)) & np.uint64((1 << s) - 1)


def choose_m(nbits: int, n: int) -> int:
    """Number of substrings: about B / log2(N) (Norouzi), each of at most 32 bits."""
    if n <= 1:
        return max(1, math.ceil(nbits / 32))
    m = max(1, round(nbits / max(1.0, math.log2(n))))
    return max(m, math.ceil(nbits / 32))


class MIH:
    """Multi-index hash tables over ``codes`` (packed uint8 (N, nb)) of ``nbits`` bits."""

    def __init__(
        self,
        codes: np.ndarray,
        nbits: int,
        m: int | None = None,
        tables=None,
        codes64: np.ndarray | None = None,
        comb=None,
    ) -> None:
        self.codes = codes
        self.nbits = nbits
        self.n = len(codes)
        self.m = m or choose_m(nbits, self.n)
        base, extra = divmod(nbits, self.m)
        sizes = [base + (1 if i < extra else 0) for i in range(self.m)]
        self.starts = [sum(sizes[:i]) for i in range(self.m)]
        self.sizes = sizes
        self.codes64 = None
        if codes.shape[1] <= 8:  # <= 64-bit codes: one big-endian uint64 per code
            if codes64 is None:
                buf = np.zeros((self.n, 8), dtype=np.uint8)
                buf[:, : codes.shape[1]] = codes
                codes64 = buf.view(">u8").reshape(-1).astype(np.uint64)
            self.codes64 = codes64
        self._comb = comb
        self._identity: set[int] = set()  # tables whose perm is the identity (sorted values)
        self._perm64: dict[int, np.ndarray] = {}  # int64 perms of fresh tables, until combined
        if comb is None and tables is None:
            tables = [self._build_table(i) for i in range(self.m)]
        self.tables = tables  # list of (perm, offsets or None, sorted values or None)
        if comb is None:
            self._combined()  # direct tables: one CSR; the per-table copies are then dropped

    def _subvals(self, i: int, rows=None) -> np.ndarray:
        if rows is None and self.codes64 is not None:  # two passes over the uint64 codes
            sh = np.uint64(64 - self.starts[i] - self.sizes[i])
            return (self.codes64 >> sh) & np.uint64((1 << self.sizes[i]) - 1)
        src = self.codes if rows is None else self.codes[rows]
        return substring_values(src, self.starts[i], self.sizes[i])

    def _build_table(self, i: int):
        s = self.sizes[i]
        vals = self._subvals(i)
        idx = np.int64 if self.n >= 2**31 else np.int32
        if s <= DIRECT_MAX_BITS and (1 << s) <= max(8 * self.n, 1 << 16):
            if self.n >= RADIX_MIN:  # one O(n) counting sort (FAISS bucket_sort) gives both
                import faiss

                if self.n and bool((vals[1:] >= vals[:-1]).all()):  # (the leading bits of sorted codes)
                    self._identity.add(i)
                    perm = np.arange(self.n, dtype=idx)
                    counts = np.bincount(vals.astype(np.int64), minlength=1 << s)
                    offsets = np.zeros((1 << s) + 1, dtype=idx)
                    np.cumsum(counts, out=offsets[1:])
                    return perm, offsets, None
                lims, perm64 = faiss.bucket_sort(vals.view(np.int64), 1 << s, 0)  # (< 2^24: no copy)
                self._perm64[i] = perm64  # (the int64 positions gather the codes in _combined)
                return perm64, lims.astype(idx), None  # (cast once, into the combined CSR)
            perm = np.argsort(vals, kind="stable").astype(idx)
            counts = np.bincount(vals.astype(np.int64), minlength=1 << s)
            offsets = np.zeros((1 << s) + 1, dtype=idx)
            np.cumsum(counts, out=offsets[1:])
            return perm, offsets, None
        perm = stable_argsort_u64(vals, s).astype(idx)
        return perm, None, vals[perm]

    # persistence ----------------------------------------------------------------------------
    def arrays(self) -> dict:
        """Arrays that rebuild this MIH with :meth:`from_arrays` (saved as .npy, mmapped)."""
        comb = self._combined()
        if comb is not None:
            bases, offs, perm, codes_all = comb
            out = {"mihc_bases": bases, "mihc_offs": offs, "mihc_perm": perm}
            if codes_all is not None:
                out["mihc_codes"] = codes_all
            return out
        out = {}
        for i, (perm, offs, svals) in enumerate(self.tables):
            out[f"mih{i}_perm"] = perm
            if offs is not None:
                out[f"mih{i}_offsets"] = offs
            else:
                out[f"mih{i}_values"] = svals
        return out

    @classmethod
    def from_arrays(cls, codes: np.ndarray, nbits: int, m: int, arrays: dict, codes64: np.ndarray | None = None) -> MIH:
        if "mihc_offs" in arrays:
            comb = (arrays["mihc_bases"], arrays["mihc_offs"], arrays["mihc_perm"], arrays.get("mihc_codes"))
            return cls(codes, nbits, m=m, codes64=codes64, comb=comb)
        tables = []
        for i in range(m):
            tables.append((arrays[f"mih{i}_perm"], arrays.get(f"mih{i}_offsets"), arrays.get(f"mih{i}_values")))
        return cls(codes, nbits, m=m, tables=tables, codes64=codes64)

    # lookup ---------------------------------------------------------------------------------
    def _lookup(self, i: int, values: np.ndarray) -> np.ndarray:
        perm, offs, svals = self.tables[i]
        if offs is not None:
            lo = offs[values.astype(np.int64)]
            hi = offs[values.astype(np.int64) + 1]
        else:
            lo = np.searchsorted(svals, values, side="left")
            hi = np.searchsorted(svals, values, side="right")
        ln = (hi - lo).astype(np.int64)
        keep = ln > 0
        if not keep.any():
            return np.zeros(0, dtype=np.int64)
        lo, ln = lo[keep].astype(np.int64), ln[keep]
        tot = int(ln.sum())
        # concatenated ranges perm[lo_j : lo_j + ln_j]
        starts = np.repeat(lo - np.concatenate([[0], np.cumsum(ln)[:-1]]), ln)
        idx = starts + np.arange(tot, dtype=np.int64)
        return perm[idx].astype(np.int64)

    def _full_dist(self, q: np.ndarray, q64, pos: np.ndarray) -> np.ndarray:
        if self.codes64 is not None:
            return np.bitwise_count(self.codes64[pos] ^ q64).astype(np.int32)
        return np.bitwise_count(self.codes[pos] ^ q[None, :]).sum(axis=1, dtype=np.int32)

    def _qsub(self, q: np.ndarray) -> list[int]:
        # substring values of one query with Python ints (a numpy call per table costs more)
        width = 8 * len(q)
        qi = int.from_bytes(q.tobytes(), "big")
        return [(qi >> (width - self.starts[i] - self.sizes[i])) & ((1 << self.sizes[i]) - 1) for i in range(self.m)]

    def _q64(self, q):
        if self.codes64 is None:
            return None
        return np.uint64(int.from_bytes(q.tobytes().ljust(8, b"\0"), "big"))

    def _combined(self):
        """All direct tables as one CSR (values of table t shifted by base[t]), or None."""
        if self._comb is None:
            if any(offs is None for _p, offs, _v in self.tables):
                self._comb = False
                self._perm64.clear()
                idx = np.int32 if self.n < 2**31 else np.int64  # (fresh counting-sort perms are int64)
                self.tables = [(p_.astype(idx, copy=False), o_, v_) for p_, o_, v_ in self.tables]
            else:
                n, m = self.n, self.m
                small = (m + 1) * max(n, 1) < 2**31
                tabs = self.tables
                offs_all = np.empty(sum(len(off) for _p, off, _v in tabs), dtype=np.int32 if small else np.int64)
                perm_all = np.empty(m * n, dtype=np.int32 if n < 2**31 else np.int64)
                # codes stored again in bucket order: candidates of a bucket are then read
                # sequentially instead of gathered at random (<= 64-bit codes)
                codes_all = np.empty(m * n, dtype=np.uint64) if self.codes64 is not None else None
                bases, base = [], 0
                for t, (perm, off, _v) in enumerate(tabs):  # (written in place: no temporaries)
                    bases.append(base)
                    np.add(off, t * n, out=offs_all[base : base + len(off)], casting="unsafe")
                    base += len(off)
                    perm_all[t * n : (t + 1) * n] = perm
                    if codes_all is not None and t in self._identity:  # (a copy, not a gather)
                        codes_all[t * n : (t + 1) * n] = self.codes64
                    elif codes_all is not None:
                        p64 = self._perm64.pop(t, None)
                        p64 = perm.astype(np.intp) if p64 is None else p64
                        np.take(self.codes64, p64, out=codes_all[t * n : (t + 1) * n])
                self._comb = (np.array(bases, dtype=np.uint64), offs_all, perm_all, codes_all)
                self.tables = None
                self._perm64.clear()
        return self._comb or None

    def _probes(self, r_lo: int, r_hi: int, bases):
        """All probes of substring radii ``r_lo..r_hi`` (computed once): flip masks, table of
        each probe, the table's offset in the combined CSR and the probe's radius."""
        cache = self.__dict__.setdefault("_probe_cache", {})
        got = cache.get((r_lo, r_hi))
        if got is None:
            fm, tab, rad = [], [], []
            for r in range(r_lo, r_hi + 1):
                for t in range(self.m):
                    if r <= self.sizes[t]:
                        f = flip_masks(self.sizes[t], r)
                        fm.append(f)
                        tab.append(np.full(len(f), t, dtype=np.int8))
                        rad.append(np.full(len(f), r, dtype=np.uint8))
            tab_a = np.concatenate(tab)
            base_rep = np.asarray(bases, dtype=np.uint64)[tab_a] if bases is not None else None
            got = cache[(r_lo, r_hi)] = (np.concatenate(fm), tab_a, base_rep, np.concatenate(rad))
        return got

    def _step(self, q, q64, qsub, r_lo: int, r_hi: int | None = None):
        """Items first discovered at a substring radius in ``r_lo..r_hi`` (any table):
        (positions, dists).

        An item is reported once, by the first (radius, table) that finds it: found by table i
        at radius r, it is kept iff its substring distance is > r in tables < i and >= r in
        tables > i (and == r in table i)."""
        r_hi = r_lo if r_hi is None else r_hi
        comb = self._combined()
        x = None
        qs = np.array(qsub, dtype=np.uint64)
        if comb is not None:
            bases, offs, perm, codes_all = comb
            fm, tab, base_rep, rad = self._probes(r_lo, r_hi, bases)
            vals = ((fm ^ qs[tab]) + base_rep).astype(np.int64)
            lo = offs[vals].astype(np.int64)
            ln = offs[vals + 1].astype(np.int64) - lo
            hit = ln > 0
            if not hit.any():
                return np.zeros(0, np.int64), np.zeros(0, np.int32)
            lo, ln = lo[hit], ln[hit]
            tot = int(ln.sum())
            idx = np.repeat(lo - (np.cumsum(ln) - ln), ln) + np.arange(tot, dtype=np.int64)
            org = np.repeat(tab[hit], ln)
            orr = np.repeat(rad[hit], ln)
            if codes_all is not None:  # dedupe on the XOR values first, then gather the rest
                x = codes_all[idx] ^ q64
                if self.m > 1:
                    keep = self._first_found(x, None, qs, org, orr)
                    idx, x = idx[keep], x[keep]
                return perm[idx].astype(np.int64), np.bitwise_count(x).astype(np.int32)
            pos = perm[idx].astype(np.int64)
        else:
            fm, tab, _b, rad = self._probes(r_lo, r_hi, None)
            pos_parts, org_parts, orr_parts = [], [], []
            for r in range(r_lo, r_hi + 1):
                for t in range(self.m):
                    sel = (tab == t) & (rad == r)
                    if not sel.any():
                        continue
                    pp = self._lookup(t, qs[t] ^ fm[sel])
                    pos_parts.append(pp)
                    org_parts.append(np.full(len(pp), t, dtype=np.int8))
                    orr_parts.append(np.full(len(pp), r, dtype=np.uint8))
            if not pos_parts or sum(len(p) for p in pos_parts) == 0:
                return np.zeros(0, np.int64), np.zeros(0, np.int32)
            pos, org, orr = np.concatenate(pos_parts), np.concatenate(org_parts), np.concatenate(orr_parts)
        if x is None and self.codes64 is not None:
            x = self.codes64[pos] ^ q64
        if x is not None:
            dist = np.bitwise_count(x).astype(np.int32)
        else:
            dist = self._full_dist(q, q64, pos)
        if self.m == 1:  # one table: an item is found at exactly one radius
            return pos, dist
        keep = self._first_found(x, pos, qs, org, orr)
        return pos[keep], dist[keep]

    def _first_found(self, x, pos, qs, org, orr) -> np.ndarray:
        """Mask of the candidates whose (radius ``orr``, table ``org``) is their first
        discovery: substring distance > r in earlier tables, >= r in later ones."""
        keep: np.ndarray | None = None
        for t in range(self.m):  # (1-D per table: a broadcast (n, m) version is ~4x slower)
            if x is not None:
                sh = np.uint64(64 - self.starts[t] - self.sizes[t])
                dt = np.bitwise_count((x >> sh) & np.uint64((1 << self.sizes[t]) - 1))
            else:
                dt = np.bitwise_count(self._subvals(t, pos) ^ qs[t])
            c = dt >= (org > t) + orr
            keep = c if keep is None else keep & c
        assert keep is not None  # self.m >= 2 here (one table returns before)
        return keep

    #: cost model of the ``budget`` (rough nanoseconds on one CPU core, numpy): per radius
    #: step, per enumerated bucket, per candidate checked
    STEP_COST = 40_000
    PROBE_COST = 40
    CANDIDATE_COST = 150

    def knn(self, q: np.ndarray, k: int, budget: int | None = None, keep=None):
        """Exact candidate set for the k nearest: (positions, distances) of every item with
        distance <= D, where at least min(k, N) items lie within D (ties complete).

        After substring radius r has been probed in all m tables, every unseen item has
        distance >= m (r + 1). Returns None as soon as the estimated cost (STEP_COST etc.)
        would exceed ``budget``.

        ``keep``: optional ``keep(positions) -> bool mask``; candidates it rejects (deleted rows,
        rows outside a prefix range, ids outside a label filter) are dropped inside the loop,
        so the search runs until ``k`` *kept* items are certain."""
        k = min(k, self.n)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        q = np.ascontiguousarray(q, dtype=np.uint8)
        q64 = self._q64(q)
        qsub = self._qsub(q)
        hist = np.zeros(self.nbits + 2, dtype=np.int64)
        P, D = [], []
        cost = 0
        rmax = max(self.sizes)
        # radii 0 and 1 in one step (most answers need both), then one radius per step
        stages = [(0, min(1, rmax))] + [(r, r) for r in range(2, rmax + 1)]
        for r_lo, r_hi in stages:
            step = self.STEP_COST + self.PROBE_COST * sum(
                math.comb(s, r) for r in range(r_lo, r_hi + 1) for s in self.sizes if r <= s
            )
            if step > self._scan_cost():  # the probes would cost more than reading every code
                if budget is not None and cost + self._scan_cost() > budget:
                    return None
                pos, dist = self._scan(q, q64, keep)
                if len(pos) == 0:
                    return pos, dist
                dk = int(np.partition(dist, min(k, len(dist)) - 1)[min(k, len(dist)) - 1])
                sel = dist <= dk
                return pos[sel], dist[sel]
            cost += step
            if budget is not None and cost > budget:
                return None
            pos, dist = self._step(q, q64, qsub, r_lo, r_hi)
            cost += self.CANDIDATE_COST * len(pos)
            if keep is not None and len(pos):
                sel = keep(pos)
                pos, dist = pos[sel], dist[sel]
            if len(pos):
                P.append(pos)
                D.append(dist)
                hist += np.bincount(dist, minlength=self.nbits + 2)[: self.nbits + 2]
            guaranteed = self.m * (r_hi + 1) - 1  # every item with distance <= this has been seen
            if hist[: min(guaranteed, self.nbits) + 1].sum() >= k:
                pos = np.concatenate(P)
                dist = np.concatenate(D)
                # the k-th distance (<= guaranteed): everything within it, ties included
                dk = int(np.searchsorted(np.cumsum(hist), k))
                sel = dist <= dk
                return pos[sel], dist[sel]
        pos = np.concatenate(P) if P else np.zeros(0, np.int64)
        dist = np.concatenate(D) if D else np.zeros(0, np.int32)
        return pos, dist

    def range(self, q: np.ndarray, radius: int, budget: int | None = None, keep=None):
        """(positions, distances) of every item within Hamming distance ``radius`` (pigeonhole:
        some substring is within ``radius // m``); None when the estimated cost exceeds
        ``budget``."""
        if self.n == 0 or radius < 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        q = np.ascontiguousarray(q, dtype=np.uint8)
        q64 = self._q64(q)
        qsub = self._qsub(q)
        rr = radius // self.m
        cost = sum(
            self.STEP_COST + self.PROBE_COST * sum(math.comb(s, r) for s in self.sizes if r <= s)
            for r in range(min(rr, max(self.sizes)) + 1)
        )
        if cost > self._scan_cost():  # the probes would cost more than reading every code
            if budget is not None and self._scan_cost() > budget:
                return None
            pos, dist = self._scan(q, q64, keep)
            sel = dist <= radius
            return pos[sel], dist[sel]
        if budget is not None and cost > budget:
            return None
        pos, dist = self._step(q, q64, qsub, 0, min(rr, max(self.sizes)))  # all radii, one step
        sel = dist <= radius
        if keep is not None and len(pos):
            sel &= keep(pos)
        return pos[sel], dist[sel]

    def _scan_cost(self) -> int:
        return self.STEP_COST + self.CANDIDATE_COST * self.n

    def _scan(self, q: np.ndarray, q64, keep) -> tuple[np.ndarray, np.ndarray]:
        """Every (kept) position with its distance: the exact answer when enumerating the
        substring balls would cost more (few items, long substrings: a table of 32 bits over
        one item would otherwise enumerate C(32, r) probes per radius)."""
        pos = np.arange(self.n, dtype=np.int64)
        if keep is not None and len(pos):
            pos = pos[keep(pos)]
        return pos, self._full_dist(q, q64, pos)
