"""Derived, in-memory structures of an index: sorted codes + ids, MIH, FAISS.

A :class:`Derived` is a pure function of the LMDB snapshot it was built from (its
``generation``), persisted under ``derived/g<generation>/`` (numpy files, memory-mapped on load;
MIH tables added when first built; the FAISS flat index is rebuilt from the codes, a copy). A
directory is complete when its ``state.json`` exists (written last, atomically).

A :class:`View` is what searches use: a base :class:`Derived` plus the writes of later
generations, replayed from the LMDB change log (``log`` sub-database). Small writes thus cost
no rebuild; once the delta exceeds a few percent of N (or the log no longer reaches back to the
base) the reader rebuilds the base from LMDB and persists it.
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

log = logging.getLogger(__name__)

#: indexes smaller than this are not persisted (rebuilding them takes milliseconds)
PERSIST_MIN = 50_000
SCAN_CHUNK = 1 << 20


class Derived:
    """Codes of one generation in tree (lexicographic) order.

    ``codes``: uint8 (N, nb); ``ids``: int64 (N,); ``head64``: uint64 (N,) first 8 bytes of
    each code big-endian (non-decreasing); row positions are the labels used by MIH and FAISS.
    """

    def __init__(self, generation: int, nbits: int, codes: np.ndarray, ids: np.ndarray,
                 mih_arrays: dict | None = None, mih_m: int | None = None) -> None:
        self.generation = generation
        self.nbits = nbits
        self.codes = codes
        self.ids = ids
        self.n = len(ids)
        nb = codes.shape[1]
        buf = np.zeros((self.n, 8), dtype=np.uint8)
        buf[:, : min(nb, 8)] = codes[:, :8]
        self.head64 = buf.view(">u8").reshape(-1).astype(np.uint64)
        self._mih = MIH.from_arrays(codes, nbits, mih_m, mih_arrays) if mih_arrays else None
        self._faiss = None
        self._lock = threading.Lock()
        self.saved_dir: Path | None = None

    # lazily built accelerators ----------------------------------------------------------
    @property
    def mih(self) -> MIH:
        with self._lock:
            if self._mih is None:
                self._mih = MIH(self.codes, self.nbits)
                if self.saved_dir is not None:
                    self._save_mih(self.saved_dir)
            self._mih._combined()  # build the combined tables once, not in concurrent queries
            return self._mih

    @property
    def faiss(self):
        with self._lock:
            if self._faiss is None:
                from cbir.indexer.faissidx import FaissBinary

                self._faiss = FaissBinary(self.codes)
            return self._faiss

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
    def from_txn(cls, txn, tree, nbits: int, generation: int, count_hint: int = 0) -> "Derived":
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
        codes = np.ascontiguousarray(keys[:, :nb])
        ids = np.ascontiguousarray(keys[:, nb:]).view(">i8").reshape(-1).astype(np.int64)
        return cls(generation, nbits, codes, ids)

    # persistence --------------------------------------------------------------------------
    def save(self, root: Path) -> None:
        """Persist under ``root/g<generation>`` (atomic: temp dir + rename); best effort."""
        root = Path(root)
        final = root / f"g{self.generation}"
        if (final / "state.json").exists():
            self.saved_dir = final
            return
        tmp = root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            np.save(tmp / "codes.npy", self.codes)
            np.save(tmp / "ids.npy", self.ids)
            state = {"generation": self.generation, "nbits": self.nbits, "n": self.n}
            (tmp / "state.json").write_text(json.dumps(state))
            os.rename(tmp, final)
        except OSError as exc:
            log.debug("could not persist derived structures: %s", exc)
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "state.json").exists():
                return
        self.saved_dir = final
        if self._mih is not None:
            self._save_mih(final)
        for old in root.glob("g*"):  # older generations (mmaps held elsewhere stay valid)
            if old.name != final.name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def _save_mih(self, d: Path) -> None:
        if (d / "mih.json").exists():
            return
        try:
            for name, arr in self._mih.arrays().items():
                tmpf = d / f".{name}.{uuid.uuid4().hex[:8]}.npy"
                np.save(tmpf, arr)
                os.replace(tmpf, d / f"{name}.npy")
            tmpj = d / f".mih.{uuid.uuid4().hex[:8]}.json"
            tmpj.write_text(json.dumps({"m": self._mih.m}))
            os.replace(tmpj, d / "mih.json")
        except OSError as exc:
            log.debug("could not persist MIH tables: %s", exc)

    @classmethod
    def load(cls, root: Path, generation: int, nbits: int) -> "Derived | None":
        d = Path(root) / f"g{generation}"
        try:
            state = json.loads((d / "state.json").read_text())
            if state["generation"] != generation or state["nbits"] != nbits:
                return None
            codes = np.load(d / "codes.npy", mmap_mode="r")
            ids = np.load(d / "ids.npy", mmap_mode="r")
            mih_arrays, m = None, None
            if (d / "mih.json").exists():
                m = json.loads((d / "mih.json").read_text())["m"]
                mih_arrays = {}
                for f in d.glob("mih*_*.npy"):
                    mih_arrays[f.stem] = np.load(f, mmap_mode="r")
        except (OSError, ValueError, KeyError) as exc:
            log.debug("no usable derived structures in %s: %s", d, exc)
            return None
        out = cls(generation, nbits, codes, ids, mih_arrays, m)
        out.saved_dir = d
        return out


class View:
    """Derived structures of one generation = a persisted/built ``base`` generation plus the
    writes made since (replayed from the LMDB change log): ``deleted`` (sorted int64 positions
    of base rows no longer present) and ``added`` (codes uint8 (a, nb), ids int64 (a,)).

    Small write batches therefore never rebuild the accelerators; searches query the base
    (asking for ``k + len(deleted)``, then dropping deleted rows) and scan the few added rows.
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

    @property
    def exact(self) -> bool:
        return len(self.deleted) == 0 and len(self.add_ids) == 0

    @property
    def delta_size(self) -> int:
        return len(self.deleted) + len(self.add_ids)

    def alive(self, pos: np.ndarray) -> np.ndarray:
        """Mask of base positions that are not deleted."""
        if len(self.deleted) == 0 or len(pos) == 0:
            return np.ones(len(pos), dtype=bool)
        i = np.searchsorted(self.deleted, pos)
        i[i == len(self.deleted)] = 0
        return self.deleted[i] != pos

    def materialize(self) -> tuple[np.ndarray, np.ndarray]:
        """All current (codes, ids); base rows first (in code order), then the added rows."""
        b = self.base
        if self.exact:
            return np.asarray(b.codes), np.asarray(b.ids)
        keep = np.ones(b.n, dtype=bool)
        keep[self.deleted] = False
        return (np.concatenate([np.asarray(b.codes)[keep], self.add_codes]),
                np.concatenate([np.asarray(b.ids)[keep], self.add_ids]))

    def replay(self, records, nb: int, max_delta: int) -> "View | None":
        """A new view after applying change-log ``records`` ((generation, adds, dels) with keys
        as (n, nb + 8) uint8 arrays), or None when the delta would exceed ``max_delta``."""
        b = self.base
        added = dict(zip(self.add_ids.tolist(), (r.tobytes() for r in self.add_codes)))
        deleted = set(self.deleted.tolist())
        gen = self.generation
        for gen, adds, dels in records:
            for key in dels:
                i = int.from_bytes(key[nb:].tobytes(), "big")
                if added.pop(i, None) is not None:
                    continue
                p = _base_position(b, key[:nb], i)
                if p is not None:
                    deleted.add(p)
            for key in adds:
                added[int.from_bytes(key[nb:].tobytes(), "big")] = key[:nb].tobytes()
            if len(added) + len(deleted) > max_delta:
                return None
        ids = np.fromiter(added.keys(), dtype=np.int64, count=len(added))
        codes = (np.frombuffer(b"".join(added.values()), dtype=np.uint8).reshape(-1, nb).copy()
                 if added else np.zeros((0, nb), np.uint8))
        return View(b, gen, np.array(sorted(deleted), dtype=np.int64), codes, ids)


def _base_position(b: Derived, code: np.ndarray, i: int) -> int | None:
    """Row of (code, id) in the base (rows sorted by code, then id), or None."""
    nb = b.codes.shape[1]
    head = int.from_bytes(code[:8].tobytes().ljust(8, b"\0"), "big")
    lo = int(np.searchsorted(b.head64, np.uint64(head), side="left"))
    hi = int(np.searchsorted(b.head64, np.uint64(head), side="right"))
    if nb > 8 and hi > lo:
        rows = np.flatnonzero((np.asarray(b.codes[lo:hi]) == code).all(axis=1))
        cand = lo + rows
    else:
        cand = np.arange(lo, hi)
    hit = cand[np.asarray(b.ids[cand]) == i] if len(cand) else cand
    return int(hit[0]) if len(hit) else None


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
