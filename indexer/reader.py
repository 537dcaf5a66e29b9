"""IndexReader: one consistent LMDB snapshot of an index and its derived structures.

The search modes live in mixins (:mod:`cbir.indexer.lexmodes`: lexicographic and prefix;
:mod:`cbir.indexer.hamming`: Hamming and hybrid), statistics in :mod:`cbir.indexer.stats`.

Snapshots and swaps: :meth:`IndexReader.refresh` moves to the newest committed snapshot and
notices an index rebuilt or compacted in place (a new ``data.mdb``: its device:inode changed),
in which case it re-opens the new environment. A reader opened before ``fork()`` raises
:class:`~cbir.indexer.env.ForkError` when used in the child (LMDB environments must not cross a
fork: open the index after forking). Derived structures are (re)built *off* the snapshot
lock, on a second read transaction of the same generation, and swapped in atomically: lex
searches and ``get`` never wait behind a rebuild.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Self

import lmdb
import numpy as np

from cbir.codes import CodeLayout, Codes
from cbir.indexer import derived as _derived
from cbir.indexer import writer as _writer
from cbir.indexer.derived import CodeLookup, Derived, View, latest_saved
from cbir.indexer.env import (
    _FORKED,
    Env,
    acquire_env,
    fork_error,
    info,
    is_sharded,
    read_manifest,
    release_env,
    u64,
)
from cbir.indexer.hamming import HammingModes
from cbir.indexer.lexmodes import LexModes
from cbir.indexer.publish import DERIVED_DIR, LMDB_DIR
from cbir.indexer.results import Item
from cbir.indexer.rows import item_labels, label_prefix, normalise_labels
from cbir.indexer.writer import LOG_TOO_BIG, IndexWriter

log = logging.getLogger(__name__)


class IndexReader(LexModes, HammingModes):
    """Searches one consistent snapshot (an LMDB read transaction) of an index.

    ``readonly=False`` also enables ``add``/``delete``/``upsert``/``update_meta`` (through an
    :class:`IndexWriter` on the same environment); those refresh the snapshot after writing.
    Otherwise call :meth:`refresh` to see other writers' changes (a reader that never refreshes
    pins the pages of its snapshot, so the file grows under a busy writer). Thread-safe.
    """

    #: replay the change log onto the derived structures while the delta stays below
    #: max(DELTA_MIN, DELTA_FRACTION * N) items; beyond, rebuild them from LMDB
    DELTA_MIN = 2_000
    DELTA_FRACTION = 0.02
    #: lexicographic top-k of <= 64-bit codes from the memory-mapped sorted base (``head64``)
    #: plus the replayed change log (:mod:`cbir.indexer.lexarray`); False: the LMDB tree walk
    LEX_FROM_BASE = True

    def __init__(self, path, readonly: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()  # the snapshot (read transaction)
        self._build_lock = threading.Lock()  # one rebuild of the derived structures at a time
        self._closed = False
        self._txn: lmdb.Transaction | None = None
        self._writer: IndexWriter | None = None
        self._env: Env | None = None
        self._open()
        HammingModes.__init__(self)

    # opening / snapshots ----------------------------------------------------------------------
    def _open(self) -> None:
        self.manifest = read_manifest(self.path)
        if is_sharded(self.manifest):
            raise ValueError(f"{self.path} is a sharded index: open it with cbir.indexer.open_index (a ShardedReader)")
        self.layout = CodeLayout.from_dict(self.manifest["layout"])
        self.nbits = self.layout.nbits
        self.nb = (self.nbits + 7) // 8
        self._pad_off = 0xFF >> (self.nbits % 8) if self.nbits % 8 else 0  # pad bits of the last byte
        self.class_names = tuple(self.layout.class_names or ())
        if self.readonly:
            self._env = acquire_env(self.path / LMDB_DIR, want_write=False)
        else:
            self._writer = IndexWriter(self.path)
            self.manifest = self._writer.manifest
            self._env = self._writer._env
        self._init_lex()
        self._txn = None
        self.generation = -1
        self._count = 0
        self._derived: View | None = None
        self._stats: dict | None = None
        self.refresh()

    def _release(self) -> None:
        if self._env is not None and self._env.stale:  # fork child: never touch the parent's
            _FORKED.append((self._txn, self._writer, self._env))
        else:
            if self._txn is not None:
                try:
                    self._txn.abort()
                except lmdb.Error:
                    pass
            if self._writer is not None:
                self._writer.close()
            elif self._env is not None:
                release_env(self._env)
        self._txn, self._writer, self._env = None, None, None

    def _check_fork(self) -> None:
        if self._env is not None and self._env.stale:
            raise fork_error(self.path)

    def _replaced(self) -> bool:
        """The index was rebuilt/compacted in place (a new data file)."""
        if not self._live_env.replaced():
            return False  # unchanged (or mid-swap / gone: keep the snapshot we have)
        try:
            read_manifest(self.path)
        except (OSError, ValueError):
            return False
        return True

    def refresh(self) -> bool:
        """Move to the newest committed snapshot (re-opening an index rebuilt or compacted in
        place); True when it changed."""
        with self._lock:
            self._check_fork()
            if self._txn is not None and self._replaced():
                log.info("%s was rebuilt or compacted in place; re-opening", self.path)
                self._release()
                self._open()
                return True
            env = self._live_env.env
            try:
                txn = env.begin(buffers=False)
            except lmdb.MapResizedError:
                env.set_mapsize(0)
                txn = env.begin(buffers=False)
            gen = info(txn, self._live_env, b"generation")
            old, self._txn = self._txn, txn
            if old is not None:
                try:
                    old.abort()
                except lmdb.Error:  # already invalidated (map grown in this process)
                    pass
            changed = gen != self.generation
            if changed:
                self.generation = gen
                self._count = info(txn, self._live_env, b"count")
                self._stats = None  # derived structures catch up lazily (see derived())
            return changed

    def _with_txn(self, fn):
        """Run ``fn(txn)`` on the snapshot. If a map resize in this process invalidated the
        transaction, move to the newest snapshot and run it again."""
        with self._lock:
            if self._closed:
                raise ValueError("index reader is closed")
            self._check_fork()
            try:
                return fn(self._txn)
            except lmdb.Error as exc:
                if "closed/deleted/dropped" not in str(exc) and not isinstance(exc, lmdb.MapResizedError):
                    raise
                log.info("snapshot invalidated by a map resize; refreshing")
                self.refresh()
                return fn(self._txn)

    def _twin_txn(self, gen: int):
        """A second read transaction on generation ``gen`` (for work off the snapshot lock), or
        None when the newest committed generation is already another one."""
        with self._lock:
            env = self._live_env.env
        try:
            txn = env.begin(buffers=False)
        except lmdb.Error:
            return None
        if info(txn, self._live_env, b"generation") != gen:
            txn.abort()
            return None
        return txn

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._derived = None
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self._count

    def count(self) -> int:
        return self._count

    @property
    def model_hash(self) -> str:
        return self.manifest.get("model_hash", "")

    # derived structures ----------------------------------------------------------------------
    def derived(self) -> View:
        """Derived structures of the current snapshot: the newest persisted (or in-memory) base
        generation plus the change log replayed up to the snapshot, or rebuilt from LMDB. The
        work runs off the snapshot lock; the new view is swapped in when done."""
        with self._lock:
            self._check_fork()
            gen, v = self.generation, self._derived
        if v is not None and v.generation == gen:
            return v
        with self._build_lock:
            with self._lock:
                gen, v = self.generation, self._derived
            if v is not None and v.generation == gen:
                return v
            new = self._make_view(gen, v)
            assert new is not None  # (scan=True always gives a view)
            with self._lock:
                if self.generation == gen:
                    self._derived = new
            return new

    def preload(self) -> int:
        """Everything the first queries would otherwise load or build, now: the derived
        structures of the current snapshot with every page of the base's arrays faulted in
        (:meth:`Derived.preload`), and the compiled Hamming / hybrid loops (codes of <= 64
        bits). Returns the bytes touched. The server calls it before it reports SERVING."""
        v = self.derived()
        b = v.base
        got = b.preload()
        if self.nb <= 8 and b.n:
            from cbir.indexer import hybrid

            if hybrid.applies(b.mih):  # (numba: the kernels compiled or loaded from their cache)
                hybrid.warm(b.mih, b.ids, self.nbits, v.alive_mask())
        return got

    def _lex_view(self) -> View | None:
        """The current view for a lexicographic search from the sorted base (codes <= 64 bits),
        or None (answer from the LMDB tree): made here only when that is cheap (a memory-mapped
        base plus the replayed change log, or the scan of a small index), never waiting behind
        a rebuild running in another thread."""
        if not self.LEX_FROM_BASE or self.nb > 8:
            return None
        with self._lock:
            if self._closed:
                raise ValueError("index reader is closed")
            self._check_fork()
            gen, v = self.generation, self._derived
        if v is not None and v.generation == gen:
            return v
        if not self._build_lock.acquire(blocking=False):
            return None
        try:
            with self._lock:
                gen, v = self.generation, self._derived
            if v is not None and v.generation == gen:
                return v
            new = self._make_view(gen, v, scan=self._count < _derived.PERSIST_MIN)
            if new is not None:
                with self._lock:
                    if self.generation == gen:
                        self._derived = new
            return new
        finally:
            self._build_lock.release()

    def _make_view(self, gen: int, v: View | None, scan: bool = True) -> View | None:
        """The view of generation ``gen``: ``v`` or the newest persisted base with the change
        log replayed onto it, else (``scan``) a new base scanned from LMDB, else None."""
        root = self.path / DERIVED_DIR
        if v is None or v.generation > gen:
            v = None
            g0 = latest_saved(root, gen)
            base = Derived.load(root, g0, self.nbits) if g0 is not None else None
            if base is not None and g0 is not None:
                v = View(base, g0)
        if v is not None and v.generation < gen:
            recs = self._with_txn(lambda txn: self._read_log(txn, v.generation + 1, gen))
            max_delta = max(self.DELTA_MIN, int(self.DELTA_FRACTION * v.base.n))
            v = v.replay(recs, self.nb, max_delta) if recs is not None else None
        if v is None and not scan:
            return None
        if v is None:
            tree = self._live_env.dbs["tree"]
            twin = self._twin_txn(gen)
            if twin is not None:  # scan off the snapshot lock
                try:
                    d = Derived.from_txn(twin, tree, self.nbits, gen)
                finally:
                    twin.abort()
            else:
                d = self._with_txn(lambda txn: Derived.from_txn(txn, tree, self.nbits, gen))
            if d.n >= _derived.PERSIST_MIN and os.access(self.path, os.W_OK):
                d.save(root)
            v = View(d, gen)
        return v

    def _read_log(self, txn, g1: int, g2: int):
        """Change-log records g1..g2 as (generation, added keys, deleted keys), or None when
        one is missing (pruned) or was too large to log."""
        if g2 - g1 + 1 > _writer.LOG_KEEP:
            return None
        db, ks = self._live_env.dbs["log"], self.nb + 8
        out = []
        for g in range(g1, g2 + 1):
            rec = txn.get(u64(g), db=db)
            if rec is None:
                return None
            na, nd = int.from_bytes(rec[:4], "big"), int.from_bytes(rec[4:8], "big")
            if na == LOG_TOO_BIG:
                return None
            arr = np.frombuffer(rec, dtype=np.uint8, offset=8).reshape(-1, ks)
            out.append((g, arr[:na], arr[na : na + nd]))
        return out

    # query normalisation --------------------------------------------------------------------
    def _query(self, code) -> np.ndarray:
        if isinstance(code, Codes):
            if code.nbits != self.nbits:
                raise ValueError(f"query has {code.nbits} bits, the index has {self.nbits}")
            if len(code) != 1:
                raise ValueError(f"expected one query code, got {len(code)} (use *_batch)")
            return code.packed[0]
        if type(code) is bytes and len(code) == self.nb and (self.nbits % 8 == 0 or not code[-1] & self._pad_off):
            return np.frombuffer(code, dtype=np.uint8)  # (the common case, checked as Codes would)
        if isinstance(code, (bytes, bytearray, memoryview)):
            return Codes(np.frombuffer(bytes(code), dtype=np.uint8)[None, :], self.nbits).packed[0]
        a = np.asarray(code)
        if a.ndim == 1 and a.shape[0] == self.nbits:
            return Codes.from_bits(a[None, :]).packed[0]
        raise ValueError("query must be a 1-row Codes, packed bytes, or a (B,) array of bits")

    def _queries(self, codes) -> np.ndarray:
        if isinstance(codes, Codes):
            if codes.nbits != self.nbits:
                raise ValueError(f"queries have {codes.nbits} bits, the index has {self.nbits}")
            return codes.packed
        return np.stack([self._query(c) for c in codes]) if len(codes) else np.zeros((0, self.nb), np.uint8)

    # items -------------------------------------------------------------------------------------
    def get(self, id: int) -> Item | None:
        """The stored item ``id`` or None."""
        if int(id) < 0:
            return None
        idb = u64(int(id))
        dbs = self._live_env.dbs
        look = self._code_lookup()

        def read(txn):
            code = look(txn).one(idb)
            if code is None:
                return None, None, None
            return code, txn.get(idb, db=dbs["meta"]), txn.get(idb, db=dbs["conf"])

        code, mb, cb = self._with_txn(read)
        if code is None:
            return None
        meta = json.loads(mb) if mb is not None else None
        conf = np.frombuffer(cb, dtype=np.float16).astype(np.float32) if cb is not None else None
        return Item(int(id), Codes(np.frombuffer(code, np.uint8)[None, :].copy(), self.nbits), meta, conf)

    def get_many(self, ids) -> list[Item | None]:
        return [self.get(int(i)) for i in np.asarray(ids).reshape(-1)]

    def _code_lookup(self):
        """``txn -> CodeLookup``. For a "delta" codes db any base will do (the tree key decides),
        so the current view is used as it is, even while a newer one is being built."""
        if self.manifest.get("codes_db") != "delta":
            return lambda txn: CodeLookup(txn, self._live_env.dbs, self.nb)
        v = self._derived or self.derived()
        return lambda txn: CodeLookup(txn, self._live_env.dbs, self.nb, lambda: v.base)

    def _codes_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids that exist, their packed codes (n, nb)) for sorted int64 ``ids``."""
        look = self._code_lookup()
        found, codes = self._with_txn(lambda txn: look(txn).many(ids))
        return np.asarray(ids)[found], codes

    # labels -------------------------------------------------------------------------------------
    @property
    def has_label_index(self) -> bool:
        """The index has its ``labels`` posting list (older indexes get it from their first
        writer; until then :meth:`ids_with_labels` scans ``meta``, O(N))."""
        return self._live_env.dbs.get("labels") is not None and bool(self.manifest.get("labels_db"))

    def ids_with_labels(self, labels) -> np.ndarray:
        """Sorted unique ids (int64) of the items carrying any of ``labels`` (metadata ``label`` /
        ``labels``, or the class name of an integer label), read from the ``labels`` posting
        list: the cost is proportional to the number of ids returned."""
        wanted = normalise_labels(labels)
        ldb = self._live_env.dbs.get("labels")
        if not self.has_label_index:
            return self._scan_labels(set(wanted))  # index older than the posting list

        def read(txn):
            parts = []
            cur = txn.cursor(ldb)
            for lab in wanted:
                pre = label_prefix(lab)
                n = len(pre)
                if not cur.set_range(pre):
                    continue
                ks = []
                for key in cur.iternext(values=False):
                    if key[:n] != pre:
                        break
                    ks.append(key[n:])
                if ks:
                    parts.append(np.frombuffer(b"".join(ks), dtype=">i8").astype(np.int64))
            return parts

        parts = self._with_txn(read)
        if not parts:
            return np.zeros(0, np.int64)
        return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))

    def _scan_labels(self, wanted: set[str]) -> np.ndarray:
        mdb = self._live_env.dbs["meta"]

        def read(txn):
            return [
                int.from_bytes(k, "big")
                for k, mb in txn.cursor(mdb).iternext()
                if item_labels(json.loads(mb), self.class_names) & wanted
            ]

        return np.asarray(sorted(self._with_txn(read)), dtype=np.int64)

    # statistics ----------------------------------------------------------------------------------
    def stats(self, coverage: bool = True) -> dict:
        """Counts, layout, sizes and coverage (``cbir.metrics.coverage``) of this snapshot."""
        from cbir.indexer.stats import reader_stats

        with self._lock:
            if self._stats is not None and (not coverage or "coverage" in self._stats):
                return self._stats
            self._stats = reader_stats(self, coverage)
            return self._stats

    # writes (readonly=False) ------------------------------------------------------------------
    def _w(self) -> IndexWriter:
        if self._writer is None:
            raise PermissionError("index opened read-only (open_index(path, readonly=False) to write)")
        return self._writer

    def add(self, ids, codes: Codes, meta=None, conf=None) -> int:
        n = self._w().add(ids, codes, meta, conf)
        self.refresh()
        return n

    def upsert(self, ids, codes: Codes, meta=None, conf=None) -> int:
        n = self._w().upsert(ids, codes, meta, conf)
        self.refresh()
        return n

    def delete(self, ids) -> int:
        n = self._w().delete(ids)
        self.refresh()
        return n

    def update_meta(self, ids, meta) -> int:
        n = self._w().update_meta(ids, meta)
        self.refresh()
        return n


def open_index(path, readonly: bool = True):
    """Open the index directory ``path``: an :class:`IndexReader`, or for a sharded index
    (:mod:`cbir.indexer.sharded`, read-only: ``readonly=False`` is a ValueError) a
    :class:`~cbir.indexer.sharded.ShardedReader` with the same search API."""
    from cbir.indexer import sharded

    if is_sharded(read_manifest(path)):
        if not readonly:
            raise ValueError(f"{path} {sharded.READ_ONLY}")
        return sharded.ShardedReader(path)
    return IndexReader(path, readonly=readonly)
