"""Incremental writes: :class:`IndexWriter` (one LMDB write transaction per call).

Every write bumps ``info/generation`` and appends one record to the ``log`` sub-database
(the tree keys it added and deleted) so readers can bring their derived structures up to date
by replaying it. The log is bounded: at most :data:`LOG_KEEP` records and :data:`LOG_MAX_BYTES`
bytes (oldest records are dropped first; a reader whose base is older than the oldest record
rebuilds instead), and a write of more than :data:`LOG_MAX_ITEMS` keys is logged as "too big"
(readers rebuild). The ``labels`` posting list is kept consistent with ``meta`` by every write.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from itertools import repeat
from pathlib import Path
from typing import Self

import lmdb
import numpy as np

from cbir.codes import CodeLayout, Codes
from cbir.indexer.derived import CodeLookup, load_or_scan
from cbir.indexer.env import (
    acquire_env,
    info,
    is_sharded,
    new_manifest,
    read_manifest,
    release_env,
    u64,
    write_manifest,
)
from cbir.indexer.publish import DERIVED_DIR, LMDB_DIR, MANIFEST
from cbir.indexer.rows import (
    as_ids,
    check_codes,
    conf_rows,
    ids_bytes,
    item_labels,
    key_order,
    label_keys,
    label_prefix,
    make_keys,
    meta_bytes,
    rows_bytes,
)

log = logging.getLogger(__name__)

#: change-log bounds: records kept, total bytes kept, keys logged per write
LOG_KEEP = 10_000
LOG_MAX_BYTES = 64 << 20
LOG_MAX_ITEMS = 100_000
LOG_TOO_BIG = 0xFFFFFFFF


class IndexWriter:
    """Writes to an index directory (creating it when ``layout`` is given and it is absent).

    Every ``add``/``delete``/``upsert``/``update_meta`` call is one LMDB write transaction (all
    or nothing) that bumps the index generation; readers see it after
    :meth:`IndexReader.refresh`. The map size grows automatically (doubling on
    ``MapFullError``). Use as a context manager or ``close()``.
    """

    def __init__(
        self,
        path,
        layout: CodeLayout | None = None,
        model_hash: str = "",
        build_params: dict | None = None,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        if (self.path / MANIFEST).exists():
            self.manifest = read_manifest(self.path)
            if is_sharded(self.manifest):
                from cbir.indexer.sharded import READ_ONLY

                raise ValueError(f"{self.path} {READ_ONLY}")
            stored = CodeLayout.from_dict(self.manifest["layout"])
            if layout is not None and layout.nbits != stored.nbits:
                raise ValueError(f"index has {stored.nbits}-bit codes, writer given {layout.nbits}")
            self.layout = stored
            self._env = acquire_env(self.path / LMDB_DIR, want_write=True)
        else:
            if not create:
                raise FileNotFoundError(f"{path} is not a cbir index (no {MANIFEST})")
            if layout is None:
                raise ValueError("creating an index needs a CodeLayout (layout=...)")
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / LMDB_DIR).mkdir(exist_ok=True)
            self.layout = layout
            self.manifest = new_manifest(layout, model_hash, build_params)
            self._env = acquire_env(self.path / LMDB_DIR, want_write=True, create=True)
            write_manifest(self.path, self.manifest)
        self.nbits = self.layout.nbits
        self.nb = (self.nbits + 7) // 8
        self.class_names = tuple(self.layout.class_names or ())
        self._base = None  # a Derived for id -> code lookups of a "delta" codes db
        self._closed = False
        if not self.manifest.get("labels_db"):
            self._backfill_labels()

    # transactions with automatic map growth -----------------------------------------------
    def _write(self, fn, bump: bool = True):
        while True:
            e = self._env
            with e.write_lock:
                out, done = self._write_once(e, fn, bump)
            if done:
                return out
            # the index was compacted or rebuilt in place: write into the new file
            log.info("%s was replaced; the writer re-opens it", self.path)
            release_env(e)
            self._env = acquire_env(self.path / LMDB_DIR, want_write=True)
            self.manifest = read_manifest(self.path)
            self._base = None

    def _codes(self, txn) -> CodeLookup:
        """id -> code in ``txn`` (see :class:`~cbir.indexer.derived.CodeLookup`)."""
        if self.manifest.get("codes_db") != "delta":
            return CodeLookup(txn, self._env.dbs, self.nb)

        def base():
            if self._base is None:
                gen = info(txn, self._env, b"generation")
                self._base = load_or_scan(self.path / DERIVED_DIR, gen, self.nbits, txn, self._env.dbs["tree"])
            return self._base

        return CodeLookup(txn, self._env.dbs, self.nb, base)

    def _write_once(self, e, fn, bump: bool):
        while True:
            self._txlog: tuple[list, list] = ([], [])
            try:
                txn = e.env.begin(write=True)  # waits for LMDB's writer lock
                try:
                    if e.replaced():
                        txn.abort()
                        return None, False
                    out = fn(txn)
                    if bump:  # a new generation, logged for the readers' replay
                        gen = info(txn, e, b"generation") + 1
                        txn.put(b"generation", u64(gen), db=e.dbs["info"])
                        self._put_log(txn, gen)
                except BaseException:
                    txn.abort()
                    raise
                txn.commit()
                return out, True
            except lmdb.MapFullError:
                new = e.env.info()["map_size"] * 2
                log.info("growing LMDB map to %d bytes", new)
                e.env.set_mapsize(new)

    def _put_log(self, txn, gen: int) -> None:
        adds, dels = self._txlog
        n_add = sum(len(a) for a in adds)
        if n_add + len(dels) > LOG_MAX_ITEMS:
            rec = LOG_TOO_BIG.to_bytes(4, "big") + (0).to_bytes(4, "big")
        else:
            rec = (
                n_add.to_bytes(4, "big")
                + len(dels).to_bytes(4, "big")
                + b"".join(a.tobytes() for a in adds)
                + b"".join(dels)
            )
        e = self._env
        db = e.dbs["log"]
        txn.put(u64(gen), rec, db=db)
        total = info(txn, e, b"log_bytes") + len(rec)
        cur = txn.cursor(db)
        # drop the oldest records beyond LOG_KEEP records or LOG_MAX_BYTES bytes (never the new one)
        while cur.first() and cur.key() != u64(gen):
            g0 = int.from_bytes(cur.key(), "big")
            if gen - g0 < LOG_KEEP and total <= LOG_MAX_BYTES:
                break
            total -= len(cur.value())
            cur.delete()
        txn.put(b"log_bytes", u64(max(total, 0)), db=e.dbs["info"])

    @property
    def generation(self) -> int:
        with self._env.env.begin() as txn:
            return info(txn, self._env, b"generation")

    def count(self) -> int:
        with self._env.env.begin() as txn:
            return info(txn, self._env, b"count")

    # item puts / deletes ------------------------------------------------------------------
    def _put_items(self, txn, ids, codes: Codes, meta_b, conf_h) -> None:
        e = self._env
        order = key_order(codes.packed, ids)
        keys = make_keys(codes.packed[order], ids[order])
        self._txlog[0].append(keys)
        tree = txn.cursor(e.dbs["tree"])
        append = not tree.last() or tree.key() < keys[0].tobytes()
        tree.putmulti(zip(rows_bytes(keys), repeat(b"")), append=append)
        byid = np.argsort(ids, kind="stable")
        idb = ids_bytes(ids[byid])
        cc = txn.cursor(e.dbs["codes"])
        append = not cc.last() or cc.key() < idb[0]
        cc.putmulti(zip(idb, rows_bytes(codes.packed[byid])), append=append)
        if meta_b is not None:
            for j, i in enumerate(byid):
                if meta_b[i] is not None:
                    txn.put(idb[j], meta_b[i], db=e.dbs["meta"])
            lk = label_keys(meta_b, ids, self.class_names)
            if lk:
                txn.cursor(e.dbs["labels"]).putmulti(zip(lk, repeat(b"")))
        if conf_h is not None:
            rows = rows_bytes(conf_h[byid].view(np.uint8).reshape(len(ids), -1))
            txn.cursor(e.dbs["conf"]).putmulti(zip(idb, rows))
        txn.put(b"count", u64(info(txn, e, b"count") + len(ids)), db=e.dbs["info"])

    def _drop_labels(self, txn, idb: bytes, mb: bytes | None) -> None:
        if mb is None:
            return
        for lab in item_labels(json.loads(mb), self.class_names):
            txn.delete(label_prefix(lab) + idb, db=self._env.dbs["labels"])

    def _delete_items(self, txn, ids: np.ndarray) -> int:
        e = self._env
        n = 0
        look = self._codes(txn)
        for idb in ids_bytes(ids):
            code = look.one(idb)
            if code is None:
                continue
            txn.delete(code + idb, db=e.dbs["tree"])
            self._txlog[1].append(code + idb)
            txn.delete(idb, db=e.dbs["codes"])
            self._drop_labels(txn, idb, txn.get(idb, db=e.dbs["meta"]))
            txn.delete(idb, db=e.dbs["meta"])
            txn.delete(idb, db=e.dbs["conf"])
            n += 1
        if n:
            txn.put(b"count", u64(info(txn, e, b"count") - n), db=e.dbs["info"])
        return n

    def _prepare(self, ids, codes, meta, conf):
        codes = check_codes(codes, self.nbits)
        ids = as_ids(ids, len(codes))
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one batch")
        return ids, codes, meta_bytes(meta, len(ids)), conf_rows(conf, len(ids), self.nbits)

    def add(self, ids, codes: Codes, meta: Sequence[dict | None] | None = None, conf: np.ndarray | None = None) -> int:
        """Add new items (ValueError, nothing written, if any id already exists). Returns count."""
        ids, codes, meta_b, conf_h = self._prepare(ids, codes, meta, conf)
        if not len(ids):
            return 0

        def fn(txn):
            found, _c = self._codes(txn).many(ids)
            if found.any():
                raise ValueError(f"id {int(ids[np.argmax(found)])} already exists (use upsert)")
            self._put_items(txn, ids, codes, meta_b, conf_h)
            return len(ids)

        return self._write(fn)

    def upsert(
        self, ids, codes: Codes, meta: Sequence[dict | None] | None = None, conf: np.ndarray | None = None
    ) -> int:
        """Insert or replace items (code, metadata and confidence of a replaced id are all new)."""
        ids, codes, meta_b, conf_h = self._prepare(ids, codes, meta, conf)
        if not len(ids):
            return 0

        def fn(txn):
            self._delete_items(txn, ids)
            self._put_items(txn, ids, codes, meta_b, conf_h)
            return len(ids)

        return self._write(fn)

    def delete(self, ids) -> int:
        """Delete items; unknown ids are ignored. Returns the number deleted."""
        ids = np.unique(as_ids(ids))
        if not len(ids):
            return 0
        return self._write(lambda txn: self._delete_items(txn, ids))

    def update_meta(self, ids, meta: Sequence[dict | None]) -> int:
        """Replace the metadata (and so the labels) of existing items (missing ids ignored)."""
        ids = as_ids(ids)
        meta_b = meta_bytes(meta, len(ids))

        def fn(txn):
            e, n = self._env, 0
            ldb = e.dbs["labels"]
            look = self._codes(txn)
            for idb, mb in zip(ids_bytes(ids), meta_b):
                if look.one(idb) is None:
                    continue
                self._drop_labels(txn, idb, txn.get(idb, db=e.dbs["meta"]))
                if mb is None:
                    txn.delete(idb, db=e.dbs["meta"])
                else:
                    txn.put(idb, mb, db=e.dbs["meta"])
                    for lab in item_labels(json.loads(mb), self.class_names):
                        txn.put(label_prefix(lab) + idb, b"", db=ldb)
                n += 1
            return n

        return self._write(fn)

    def _backfill_labels(self) -> None:
        """Index written before the ``labels`` sub-db existed: derive it from ``meta`` once."""
        e = self._env

        def fn(txn):
            ldb = e.dbs["labels"]
            txn.drop(ldb, delete=False)
            cur = txn.cursor(e.dbs["meta"])
            for idb, mb in cur.iternext():
                for lab in item_labels(json.loads(mb), self.class_names):
                    txn.put(label_prefix(lab) + idb, b"", db=ldb)

        self._write(fn, bump=False)  # no code changes: the same generation
        self.manifest["labels_db"] = True
        write_manifest(self.path, self.manifest)

    def sync_manifest(self) -> None:
        with self._env.env.begin() as txn:
            self.manifest["count"] = info(txn, self._env, b"count")
            self.manifest["generation"] = info(txn, self._env, b"generation")
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_manifest(self.path, self.manifest)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self._env.stale:
                self._env.env.sync(True)
                if not self._env.replaced():
                    self.sync_manifest()  # (not over the manifest of an index built in its place)
        finally:
            release_env(self._env)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
