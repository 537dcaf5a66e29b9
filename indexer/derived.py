"""Derived structures of an index: sorted codes + ids, MIH tables, FAISS flat index.

A :class:`Derived` is a pure function of the LMDB snapshot it was built from (its
``generation``), persisted under ``derived/g<generation>/``: ``codes.npy``, ``ids.npy``,
``head64.npy`` (first 8 bytes of each code, big-endian), the MIH tables (``mih.json`` +
``mih*.npy``) and ``faiss.bin`` (FAISS ``IndexBinaryFlat``). Everything is written at build
time (``build_index``) or by the reader that rebuilt it, into a temporary directory renamed
into place with ``state.json`` written last; a reader memory-maps it all, so opening an index
costs no scan and the first query touches only the pages it needs.

A :class:`View` is what searches use: a base :class:`Derived` plus the writes of later
generations, replayed from the LMDB change log (``log`` sub-database) in a few vectorised
numpy operations. Deleted base rows are dropped *inside* the candidate loops (``View.keep``,
``View.selector``), added rows are scanned directly. Once the delta exceeds a few percent of N
(or the log no longer reaches back to the base) the reader builds a new base from LMDB and
persists it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from itertools import islice
from pathlib import Path

import numpy as np

from cbir.indexer.mih import MIH
from cbir.indexer.rows import head64 as _head64
from cbir.indexer.rows import make_keys, split_keys

log = logging.getLogger(__name__)

#: indexes smaller than this are not persisted (rebuilding them takes milliseconds)
PERSIST_MIN = 50_000
SCAN_CHUNK = 1 << 20
FAISS_FILE = "faiss.bin"


class Derived:
    """Codes of one generation in tree (lexicographic) order.

    ``codes``: uint8 (N, nb); ``ids``: int64 (N,); ``head64``: uint64 (N,) first 8 bytes of
    each code big-endian (non-decreasing); row positions are the labels used by MIH and FAISS.
    """

    def __init__(
        self,
        generation: int,
        nbits: int,
        codes: np.ndarray,
        ids: np.ndarray,
        head64: np.ndarray | None = None,
        mih: MIH | None = None,
        by_id=None,
    ) -> None:
        self.generation = generation
        self.nbits = nbits
        self.codes = codes
        self.ids = ids
        self.n = len(ids)
        self.head64 = _head64(codes) if head64 is None else head64
        self._mih = mih
        self._faiss = None
        self._byid = by_id  # (ids ascending, their rows), computed on first use when None
        self._lock = threading.Lock()
        self.saved_dir: Path | None = None

    # accelerators (loaded with the base, or built on first use) -------------------------
    @property
    def mih(self) -> MIH:
        with self._lock:
            if self._mih is None:
                c64 = self.head64 if self.codes.shape[1] <= 8 else None
                self._mih = MIH(self.codes, self.nbits, codes64=c64)
            return self._mih

    @property
    def faiss(self):
        with self._lock:
            if self._faiss is None:
                from cbir.indexer.faissidx import FaissBinary

                f = self.saved_dir / FAISS_FILE if self.saved_dir is not None else None
                try:
                    self._faiss = FaissBinary(path=f) if f is not None and f.exists() else None
                except RuntimeError as exc:  # unreadable file: build from the codes instead
                    log.debug("could not read %s: %s", f, exc)
                if self._faiss is None:
                    self._faiss = FaissBinary(np.asarray(self.codes))
            return self._faiss

    def by_id(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids ascending, their row positions): the id -> row index (saved with the base)."""
        with self._lock:
            if self._byid is None:
                d = self.saved_dir
                if d is not None and (d / "sid.npy").exists():
                    self._byid = (_mmap(d / "sid.npy"), _mmap(d / "spos.npy"))
                else:
                    spos = np.argsort(np.asarray(self.ids), kind="stable")
                    spos = spos.astype(np.int32 if self.n < 2**31 else np.int64)
                    self._byid = (np.asarray(self.ids)[spos], spos)
            return self._byid

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, packed codes of the found ids) for int64 ``ids``."""
        sid, spos = self.by_id()
        ids = np.asarray(ids, dtype=np.int64)
        if len(sid) == 0 or len(ids) == 0:
            return np.zeros(len(ids), bool), np.zeros((0, self.codes.shape[1]), np.uint8)
        i = np.searchsorted(sid, ids)
        i[i == len(sid)] = 0
        found = sid[i] == ids
        return found, np.asarray(self.codes[spos[i[found]]])

    def preload(self) -> int:
        """Fault in every page of this base's arrays (codes, ids, head64, id index, MIH tables)
        and load its FAISS index, so that no later query reads a page from disk or grows the
        process's resident memory (a server's start-up). Returns the bytes touched."""
        mih = self.mih
        comb = mih._combined()
        parts = [self.codes, self.ids, self.head64, *self.by_id()]
        if comb is not None:
            parts += [a for a in comb if a is not None]
        elif mih.tables is not None:
            parts += [a for tab in mih.tables for a in tab if a is not None]
        _ = self.faiss
        return sum(_touch(a) for a in parts)

    # small JSON side files (e.g. the coverage statistics of this generation) ----------------
    def load_json(self, name: str) -> dict | None:
        if self.saved_dir is None:
            return None
        try:
            return json.loads((self.saved_dir / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None

    def save_json(self, name: str, obj: dict) -> None:
        if self.saved_dir is None:
            return
        try:
            tmp = self.saved_dir / f".{name}.{uuid.uuid4().hex[:8]}.json"
            tmp.write_text(json.dumps(obj))
            os.replace(tmp, self.saved_dir / f"{name}.json")
        except OSError as exc:
            log.debug("could not persist %s: %s", name, exc)

    # construction -----------------------------------------------------------------------
    @classmethod
    def from_txn(cls, txn, tree, nbits: int, generation: int) -> Derived:
        nb = (nbits + 7) // 8
        ks = nb + 8
        cur = txn.cursor(tree)
        chunks = []
        if cur.first():
            it = cur.iternext(values=False)
            while True:
                buf = b"".join(islice(it, SCAN_CHUNK))
                if not buf:
                    break
                chunks.append(np.frombuffer(buf, dtype=np.uint8).reshape(-1, ks))
        keys = np.concatenate(chunks) if chunks else np.zeros((0, ks), dtype=np.uint8)
        codes, ids = split_keys(keys, nb)
        return cls(generation, nbits, np.ascontiguousarray(codes), ids)

    # persistence --------------------------------------------------------------------------
    def save(self, root: Path) -> None:
        """Persist everything (MIH and FAISS built now if they were not) under
        ``root/g<generation>`` atomically (temp dir + rename); best effort, and older
        generations are removed (memory maps held by open readers stay valid)."""
        root = Path(root)
        final = root / f"g{self.generation}"
        if (final / "state.json").exists():
            self.saved_dir = final
            return
        tmp = root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            np.save(tmp / "codes.npy", np.asarray(self.codes))
            np.save(tmp / "ids.npy", np.asarray(self.ids))
            np.save(tmp / "head64.npy", np.asarray(self.head64))
            from cbir.indexer.derivejob import write_accelerators

            write_accelerators(self, tmp)
            sid, spos = self.by_id()
            np.save(tmp / "sid.npy", sid)
            np.save(tmp / "spos.npy", spos)
        except OSError as exc:
            log.debug("could not persist derived structures: %s", exc)
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "state.json").exists():
                return
        got = commit_saved(tmp, root, self.generation, self.nbits, self.n)
        if got is not None:
            self.saved_dir = got

    @classmethod
    def load(cls, root: Path, generation: int, nbits: int) -> Derived | None:
        """Memory-map the persisted generation (no scan, no copy), or None."""
        d = Path(root) / f"g{generation}"
        try:
            state = json.loads((d / "state.json").read_text())
            if state["generation"] != generation or state["nbits"] != nbits:
                return None
            codes = _mmap(d / "codes.npy")
            ids = _mmap(d / "ids.npy")
            head = _mmap(d / "head64.npy") if (d / "head64.npy").exists() else None
            mih = None
            if (d / "mih.json").exists():
                m = json.loads((d / "mih.json").read_text())["m"]
                arrays = {f.stem: _mmap(f) for f in d.glob("mih*.npy")}
                c64 = head if codes.shape[1] <= 8 else None
                mih = MIH.from_arrays(codes, nbits, m, arrays, codes64=c64)
        except (OSError, ValueError, KeyError) as exc:
            log.debug("no usable derived structures in %s: %s", d, exc)
            return None
        out = cls(generation, nbits, codes, ids, head, mih)
        out.saved_dir = d
        return out


def commit_saved(tmp: Path, root: Path, generation: int, nbits: int, n: int) -> Path | None:
    """Publish the complete directory ``tmp`` as ``root/g<generation>`` (``state.json`` written
    last marks it complete; then one rename) and remove older generations (memory maps held
    elsewhere stay valid); best effort: the final path, or None."""
    final = Path(root) / f"g{generation}"
    try:
        if not (final / "state.json").exists():
            state = {"generation": generation, "nbits": nbits, "n": n}
            (tmp / "state.json").write_text(json.dumps(state))  # last: marks a complete dir
            os.rename(tmp, final)
    except OSError as exc:
        log.debug("could not persist derived structures: %s", exc)
        if not (final / "state.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return None
    shutil.rmtree(tmp, ignore_errors=True)  # (gone after the rename; left only if final existed)
    for old in Path(root).glob("g*"):
        if old.name != final.name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_or_scan(root: Path, generation: int, nbits: int, txn, tree) -> Derived:
    """The newest persisted base <= ``generation`` (memory-mapped), else a scan of ``tree``."""
    g0 = latest_saved(root, generation)
    d = Derived.load(root, g0, nbits) if g0 is not None else None
    return d if d is not None else Derived.from_txn(txn, tree, nbits, generation)


class CodeLookup:
    """id -> code of one LMDB transaction.

    Where the build wrote no ``codes`` sub-database (``manifest["codes_db"] == "delta"``: only
    items written after the build are in it), an item missing there is looked up in a base
    (any generation: an item no write has touched since the build is in every base) and
    confirmed by its ``tree`` key in this transaction, so deletes and upserts are exact."""

    def __init__(self, txn, dbs: dict, nb: int, base_fn=None) -> None:
        self.txn, self.dbs, self.nb = txn, dbs, nb
        self.base_fn = base_fn  # () -> Derived, or None ("full" codes db)

    def one(self, idb: bytes) -> bytes | None:
        code = self.txn.get(idb, db=self.dbs["codes"])
        if code is not None or self.base_fn is None:
            return code
        found, codes = self.base_fn().find(np.array([int.from_bytes(idb, "big")], np.int64))
        if not found[0]:
            return None
        code = codes[0].tobytes()
        return code if self.txn.get(code + idb, db=self.dbs["tree"]) is not None else None

    def many(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, packed codes of the found ids, in order)."""
        from cbir.indexer.rows import ids_bytes

        ids = np.asarray(ids, dtype=np.int64)
        idbs = ids_bytes(ids)
        got = [self.txn.get(b, db=self.dbs["codes"]) for b in idbs]
        miss = [j for j, g in enumerate(got) if g is None]
        if miss and self.base_fn is not None:
            found, codes = self.base_fn().find(ids[miss])
            tree = self.dbs["tree"]
            for j, c in zip(np.asarray(miss)[found].tolist(), codes):
                c = c.tobytes()
                if self.txn.get(c + idbs[j], db=tree) is not None:
                    got[j] = c
        ok = np.array([g is not None for g in got], dtype=bool)
        buf = b"".join(g for g in got if g is not None)
        return ok, np.frombuffer(buf, dtype=np.uint8).reshape(-1, self.nb).copy()


#: bytes between two reads of :func:`_touch` (a page)
PAGE = 4096


def _touch(a) -> int:
    """Read one byte of every page of array ``a`` (faults a memory map's pages in); its bytes."""
    b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # (no copy: the base's arrays are contiguous)
    if b.size == 0:
        return 0
    int(b[::PAGE].max())
    return int(b.nbytes)


def _mmap(p: Path) -> np.ndarray:
    """A read-only memory map of a .npy file as a plain ndarray (indexing a ``np.memmap``
    subclass costs a Python call each time)."""
    return np.asarray(np.load(p, mmap_mode="r"))


class View:
    """Derived structures of one generation = a persisted/built ``base`` generation plus the
    writes made since (replayed from the LMDB change log): ``deleted`` (sorted int64 positions
    of base rows no longer present) and ``added`` (codes uint8 (a, nb), ids int64 (a,)).

    Small write batches therefore never rebuild the accelerators; searches skip deleted rows
    inside their candidate loops (:meth:`keep`, :meth:`selector`) and scan the few added rows.
    """

    def __init__(self, base: Derived, generation: int, deleted=None, add_codes=None, add_ids=None):
        nb = base.codes.shape[1]
        self.base = base
        self.generation = generation
        self.nbits = base.nbits
        self.deleted = np.zeros(0, np.int64) if deleted is None else deleted
        self.add_codes = np.zeros((0, nb), np.uint8) if add_codes is None else add_codes
        self.add_ids = np.zeros(0, np.int64) if add_ids is None else add_ids
        self.n = base.n - len(self.deleted) + len(self.add_ids)
        self._alive_mask: np.ndarray | None = None
        self._selector = None
        self._sorted_adds: tuple[np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    @property
    def exact(self) -> bool:
        return len(self.deleted) == 0 and len(self.add_ids) == 0

    @property
    def delta_size(self) -> int:
        return len(self.deleted) + len(self.add_ids)

    def alive_mask(self) -> np.ndarray | None:
        """Bool (N_base,) mask of live base rows, or None when nothing was deleted."""
        if len(self.deleted) == 0:
            return None
        with self._lock:
            if self._alive_mask is None:
                m = np.ones(self.base.n, dtype=bool)
                m[self.deleted] = False
                self._alive_mask = m
            return self._alive_mask

    def alive(self, pos: np.ndarray) -> np.ndarray:
        """Mask of base positions that are not deleted."""
        m = self.alive_mask()
        return np.ones(len(pos), dtype=bool) if m is None else m[pos]

    def sorted_adds(self) -> tuple[np.ndarray, np.ndarray]:
        """The added rows in tree order (code, then id): (``head64`` uint64, ids int64)."""
        with self._lock:
            if self._sorted_adds is None:
                h = _head64(self.add_codes)
                order = np.lexsort((self.add_ids, h))
                self._sorted_adds = (h[order], self.add_ids[order])
            return self._sorted_adds

    def keep(self):
        """A ``keep(positions) -> mask`` filter for the MIH loop, or None (nothing deleted)."""
        m = self.alive_mask()
        return None if m is None else (lambda pos: m[pos])

    def selector(self):
        """A FAISS selector of the live base rows, or None (nothing deleted)."""
        m = self.alive_mask()
        if m is None:
            return None
        with self._lock:
            if self._selector is None:
                from cbir.indexer.faissidx import Selector

                self._selector = Selector(m)
            return self._selector

    def materialize(self) -> tuple[np.ndarray, np.ndarray]:
        """All current (codes, ids); base rows first (in code order), then the added rows."""
        b = self.base
        if self.exact:
            return np.asarray(b.codes), np.asarray(b.ids)
        m = self.alive_mask()
        codes, ids = np.asarray(b.codes), np.asarray(b.ids)
        if m is not None:
            codes, ids = codes[m], ids[m]
        return np.concatenate([codes, self.add_codes]), np.concatenate([ids, self.add_ids])

    def replay(self, records, nb: int, max_delta: int) -> View | None:
        """A new view after applying change-log ``records`` ((generation, adds, dels) with keys
        as (n, nb + 8) uint8 arrays; within a record the deletes come first), or None when the
        delta would exceed ``max_delta``. Vectorised: the last operation on each key decides."""
        if not records:
            return self
        ks = nb + 8
        parts = [make_keys(self.add_codes, self.add_ids)]
        ops = [np.ones(len(self.add_ids), dtype=bool)]  # True = present after the op
        for _g, adds, dels in records:
            parts += [dels, adds]
            ops += [np.zeros(len(dels), bool), np.ones(len(adds), bool)]
        gen = records[-1][0]
        keys = np.ascontiguousarray(np.concatenate(parts).reshape(-1, ks))
        op = np.concatenate(ops)
        if len(keys) == 0:
            return View(self.base, gen, self.deleted, self.add_codes, self.add_ids)
        # last occurrence of every key
        rev = keys[::-1]
        _u, first = np.unique(np.ascontiguousarray(rev).view(f"V{ks}").reshape(-1), return_index=True)
        last = len(keys) - 1 - first
        keys, op = keys[last], op[last]
        pos = base_positions(self.base, keys, nb)
        in_base = pos >= 0
        deleted = np.union1d(self.deleted, pos[in_base & ~op])
        deleted = np.setdiff1d(deleted, pos[in_base & op], assume_unique=True)
        add = op & ~in_base
        if len(deleted) + int(add.sum()) > max_delta:
            return None
        codes, ids = split_keys(keys[add], nb)
        return View(self.base, gen, deleted.astype(np.int64), np.ascontiguousarray(codes), ids)


#: equal-head64 runs longer than this are searched per key (binary search on the ids)
_EXPAND_MAX = 64


def base_positions(b: Derived, keys: np.ndarray, nb: int) -> np.ndarray:
    """Row of each tree key (code || id) in the base (rows sorted by code, then id), or -1."""
    codes, ids = split_keys(keys, nb)
    out = np.full(len(ids), -1, dtype=np.int64)
    if b.n == 0 or len(ids) == 0:
        return out
    h = _head64(codes)
    head = b.head64
    lo = np.searchsorted(head, h, side="left").astype(np.int64)
    hi = np.searchsorted(head, h, side="right").astype(np.int64)
    ln = hi - lo
    small = np.flatnonzero((ln > 0) & (ln <= _EXPAND_MAX))
    if len(small):  # expand every short run and compare (id, and the code beyond 8 bytes)
        sl = ln[small]
        owner = np.repeat(small, sl)
        idx = np.repeat(lo[small] - (np.cumsum(sl) - sl), sl) + np.arange(int(sl.sum()))
        hit = np.asarray(b.ids[idx]) == ids[owner]
        if nb > 8:
            hit &= (np.asarray(b.codes[idx]) == codes[owner]).all(axis=1)
        out[owner[hit]] = idx[hit]
    for j in np.flatnonzero(ln > _EXPAND_MAX):  # long runs of one head (duplicate codes)
        a, z = int(lo[j]), int(hi[j])
        if nb > 8:
            rows = a + np.flatnonzero((np.asarray(b.codes[a:z]) == codes[j]).all(axis=1))
            a, z = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (a, a)
        p = a + int(np.searchsorted(b.ids[a:z], ids[j]))  # ids ascend within one code
        if p < z and int(b.ids[p]) == int(ids[j]):
            out[j] = p
    return out


def latest_saved(root: Path, generation: int) -> int | None:
    """Newest complete persisted generation <= ``generation`` under ``root``."""
    best = None
    try:
        for p in Path(root).glob("g*"):
            try:
                g = int(p.name[1:])
            except ValueError:
                continue
            if g <= generation and (p / "state.json").exists() and (best is None or g > best):
                best = g
    except OSError:
        return None
    return best
