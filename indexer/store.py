"""On-disk index: one LMDB environment (source of truth) + manifest + derived accelerators.

Directory layout::

    <index>/manifest.json   format version, CodeLayout, model content hash, counts, build params
    <index>/lmdb/           LMDB env: sub-dbs tree, codes, meta, conf, info
    <index>/derived/g<N>/   sorted codes/ids + MIH tables of LMDB generation N (optional)

Sub-databases: ``tree`` key = code bytes || 8-byte big-endian id, value empty (B-tree order =
lexicographic code order); ``codes`` id(8 B BE) -> code bytes; ``meta`` id -> UTF-8 JSON;
``conf`` id -> float16 per-bit confidences; ``info`` ``generation`` / ``count`` (8 B BE);
``log`` generation -> the tree keys added and deleted by that write transaction.
Every write transaction increments ``generation``; derived structures are stamped with it and
catch up with later generations by replaying ``log`` (or are rebuilt when the delta is large).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
import uuid
from itertools import islice, repeat
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Sequence

import lmdb
import numpy as np

from cbir.codes import CodeLayout, Codes
from cbir.indexer import derived as _derived
from cbir.indexer import publish as _publish
from cbir.indexer.publish import DERIVED_DIR, FORMAT, LMDB_DIR, MANIFEST
from cbir.indexer.derived import Derived, View, latest_saved
from cbir.indexer.lexsearch import LexSearcher
from cbir.indexer.mih import MIH
from cbir.indexer.results import Item, PrefixPage, SearchResult, hamming_to, make_result, order_candidates

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DBS = (b"tree", b"codes", b"meta", b"conf", b"info", b"log")
#: change-log records kept (one per write transaction; readers replay them onto their derived
#: structures instead of rebuilding), and the largest batch logged in full
LOG_KEEP = 10_000
LOG_MAX_ITEMS = 100_000
_LOG_TOO_BIG = 0xFFFFFFFF
INITIAL_MAP = 64 << 20  # map size of a temporary build environment (it grows as needed)
#: map size of writable environments: virtual address space only (the file grows with the
#: data). Growing the map later (MapFullError) invalidates this process's open read
#: transactions, which then move to the newest snapshot.
WRITE_MAP = 1 << 36
PUT_CHUNK = 1 << 18

# --------------------------------------------------------------------------------------------
# LMDB environments: one per path per process (LMDB forbids opening an env twice in a process)
# --------------------------------------------------------------------------------------------
_ENVS: dict[str, list] = {}
_ENVS_LOCK = threading.Lock()


class _Env:
    def __init__(self, path: str, env: lmdb.Environment, writable: bool) -> None:
        self.path = path
        self.env = env
        self.writable = writable
        self.dbs = {name.decode(): env.open_db(name, create=writable) for name in DBS}
        self.write_lock = threading.Lock()


def _env_key(dbdir: Path) -> str:
    # the data file's inode is part of the key: an index rebuilt (renamed) in place is a new env
    try:
        st = os.stat(Path(dbdir) / "data.mdb")
        ino = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        ino = "new"
    return f"{os.path.realpath(dbdir)}|{ino}"


def _acquire_env(dbdir: Path, want_write: bool, create: bool = False) -> _Env:
    key = _env_key(dbdir)
    with _ENVS_LOCK:
        ent = _ENVS.get(key)
        if ent is not None:
            if want_write and not ent[0].writable:
                raise PermissionError(f"index {dbdir} is already open read-only in this process")
            ent[1] += 1
            return ent[0]
        if not create and not (Path(dbdir) / "data.mdb").exists():
            raise FileNotFoundError(f"no LMDB environment in {dbdir}")
        writable = want_write or os.access(dbdir, os.W_OK)
        kw = dict(subdir=True, max_dbs=len(DBS) + 2, max_readers=1024, readahead=False)
        if writable:
            size = max(WRITE_MAP, _file_size(Path(dbdir) / "data.mdb") * 2)
            env = lmdb.open(str(dbdir), map_size=size, create=create, **kw)
        else:
            env = lmdb.open(str(dbdir), readonly=True, lock=False, **kw)
        key = _env_key(dbdir)
        e = _Env(key, env, writable)
        _ENVS[key] = [e, 1]
        return e


def _release_env(e: _Env) -> None:
    with _ENVS_LOCK:
        ent = _ENVS.get(e.path)
        if ent is None or ent[0] is not e:
            return
        ent[1] -= 1
        if ent[1] <= 0:
            del _ENVS[e.path]
            e.env.close()


def _file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _u64(v: int) -> bytes:
    return int(v).to_bytes(8, "big")


def _info(txn, e: _Env, name: bytes) -> int:
    v = txn.get(name, db=e.dbs["info"])
    return int.from_bytes(v, "big") if v else 0


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
def read_manifest(path) -> dict:
    p = Path(path) / MANIFEST
    if not p.exists():
        raise FileNotFoundError(f"{path} is not a cbir index (no {MANIFEST})")
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{p}: not a cbir index manifest")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{p}: index format {m['format_version']} is newer than {FORMAT_VERSION}")
    return m


def _write_manifest(path: Path, manifest: dict) -> None:
    tmp = Path(path) / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(path) / MANIFEST)


def _new_manifest(layout: CodeLayout, model_hash: str, build_params: dict | None) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": layout.to_dict(),
        "model_hash": model_hash or "",
        "count": 0,
        "generation": 0,
        "build": dict(build_params or {}),
        "created": now,
        "updated": now,
        "key_format": "code||id_be64",
    }


# --------------------------------------------------------------------------------------------
# input validation / key building
# --------------------------------------------------------------------------------------------
def _as_ids(ids, n: int | None = None) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {a.dtype}")
    a = a.astype(np.int64).reshape(-1)
    if a.size and a.min() < 0:
        raise ValueError("ids must be >= 0")
    if n is not None and len(a) != n:
        raise ValueError(f"got {len(a)} ids for {n} codes")
    return a


def _check_codes(codes, nbits: int) -> Codes:
    if not isinstance(codes, Codes):
        raise ValueError(f"codes must be cbir.codes.Codes, got {type(codes).__name__}")
    if codes.nbits != nbits:
        raise ValueError(f"codes have {codes.nbits} bits, the index has {nbits}")
    return codes


def _make_keys(packed: np.ndarray, ids: np.ndarray) -> np.ndarray:
    n, nb = packed.shape
    keys = np.empty((n, nb + 8), dtype=np.uint8)
    keys[:, :nb] = packed
    keys[:, nb:] = ids.astype(">i8").view(np.uint8).reshape(n, 8)
    return keys


def _key_order(packed: np.ndarray, ids: np.ndarray, ids_sorted: bool = False) -> np.ndarray:
    """Permutation sorting (code, id) ascending = tree key order."""
    nb = packed.shape[1]
    if nb <= 8:
        buf = np.zeros((len(packed), 8), dtype=np.uint8)
        buf[:, :nb] = packed
        head = buf.view(">u8").reshape(-1).astype(np.uint64)
        if ids_sorted:  # a stable sort on the code keeps equal codes in id order
            return np.argsort(head, kind="stable")
        return np.lexsort((ids, head))
    return np.lexsort([ids] + [packed[:, j] for j in range(nb - 1, -1, -1)])


def _rows_bytes(arr: np.ndarray) -> list[bytes]:
    arr = np.ascontiguousarray(arr)
    if arr.shape[1] == 0:
        return [b""] * len(arr)
    return arr.view(f"V{arr.shape[1]}").reshape(-1).tolist()


def _ids_bytes(ids: np.ndarray) -> list[bytes]:
    return _rows_bytes(ids.astype(">i8").view(np.uint8).reshape(-1, 8))


def _meta_bytes(meta, n: int) -> list[bytes | None] | None:
    if meta is None:
        return None
    meta = list(meta)
    if len(meta) != n:
        raise ValueError(f"got {len(meta)} metadata entries for {n} codes")
    out = []
    for m in meta:
        if m is None:
            out.append(None)
        elif isinstance(m, dict):
            out.append(json.dumps(m, separators=(",", ":"), sort_keys=True, default=_json_default).encode())
        else:
            raise ValueError(f"metadata entries must be dicts or None, got {type(m).__name__}")
    return out


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"metadata value of type {type(o).__name__} is not JSON serialisable")


def _conf_rows(conf, n: int, nbits: int) -> np.ndarray | None:
    if conf is None:
        return None
    c = np.asarray(conf, dtype=np.float32)
    if c.shape != (n, nbits):
        raise ValueError(f"conf must have shape ({n}, {nbits}), got {c.shape}")
    return c.astype(np.float16)


# --------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------
class IndexWriter:
    """Writes to an index directory (creating it when ``layout`` is given and it is absent).

    Every ``add``/``delete``/``upsert`` call is one LMDB write transaction (all or nothing) that
    bumps the index generation; readers see it after :meth:`IndexReader.refresh`. The map size
    grows automatically (doubling on ``MapFullError``). Use as a context manager or ``close()``.
    """

    def __init__(self, path, layout: CodeLayout | None = None, model_hash: str = "",
                 build_params: dict | None = None, create: bool = True) -> None:
        self.path = Path(path)
        if (self.path / MANIFEST).exists():
            self.manifest = read_manifest(self.path)
            stored = CodeLayout.from_dict(self.manifest["layout"])
            if layout is not None and layout.nbits != stored.nbits:
                raise ValueError(f"index has {stored.nbits}-bit codes, writer given {layout.nbits}")
            self.layout = stored
            self._env = _acquire_env(self.path / LMDB_DIR, want_write=True)
        else:
            if not create:
                raise FileNotFoundError(f"{path} is not a cbir index (no {MANIFEST})")
            if layout is None:
                raise ValueError("creating an index needs a CodeLayout (layout=...)")
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / LMDB_DIR).mkdir(exist_ok=True)
            self.layout = layout
            self.manifest = _new_manifest(layout, model_hash, build_params)
            self._env = _acquire_env(self.path / LMDB_DIR, want_write=True, create=True)
            _write_manifest(self.path, self.manifest)
        self.nbits = self.layout.nbits
        self.nb = (self.nbits + 7) // 8
        self._closed = False

    # transactions with automatic map growth -----------------------------------------------
    def _write(self, fn):
        e = self._env
        with e.write_lock:
            while True:
                self._txlog: tuple[list, list] = ([], [])
                try:
                    with e.env.begin(write=True) as txn:
                        out = fn(txn)
                        gen = _info(txn, e, b"generation") + 1
                        txn.put(b"generation", _u64(gen), db=e.dbs["info"])
                        self._put_log(txn, gen)
                    return out
                except lmdb.MapFullError:
                    new = e.env.info()["map_size"] * 2
                    log.info("growing LMDB map to %d bytes", new)
                    e.env.set_mapsize(new)

    def _put_log(self, txn, gen: int) -> None:
        adds, dels = self._txlog
        n_add = sum(len(a) for a in adds)
        if n_add + len(dels) > LOG_MAX_ITEMS:
            rec = _LOG_TOO_BIG.to_bytes(4, "big") + (0).to_bytes(4, "big")
        else:
            rec = (n_add.to_bytes(4, "big") + len(dels).to_bytes(4, "big")
                   + b"".join(a.tobytes() for a in adds) + b"".join(dels))
        db = self._env.dbs["log"]
        txn.put(_u64(gen), rec, db=db)
        if gen > LOG_KEEP:
            txn.delete(_u64(gen - LOG_KEEP), db=db)

    @property
    def generation(self) -> int:
        with self._env.env.begin() as txn:
            return _info(txn, self._env, b"generation")

    def count(self) -> int:
        with self._env.env.begin() as txn:
            return _info(txn, self._env, b"count")

    def _put_items(self, txn, ids, codes: Codes, meta_b, conf_h) -> None:
        e = self._env
        order = _key_order(codes.packed, ids)
        keys = _make_keys(codes.packed[order], ids[order])
        self._txlog[0].append(keys)
        tree = txn.cursor(e.dbs["tree"])
        append = not tree.last() or tree.key() < keys[0].tobytes()
        tree.putmulti(zip(_rows_bytes(keys), repeat(b"")), append=append)
        byid = np.argsort(ids, kind="stable")
        idb = _ids_bytes(ids[byid])
        cc = txn.cursor(e.dbs["codes"])
        append = not cc.last() or cc.key() < idb[0]
        cc.putmulti(zip(idb, _rows_bytes(codes.packed[byid])), append=append)
        if meta_b is not None:
            for j, i in enumerate(byid):
                if meta_b[i] is not None:
                    txn.put(idb[j], meta_b[i], db=e.dbs["meta"])
        if conf_h is not None:
            rows = _rows_bytes(conf_h[byid].view(np.uint8).reshape(len(ids), -1))
            txn.cursor(e.dbs["conf"]).putmulti(zip(idb, rows))
        txn.put(b"count", _u64(_info(txn, e, b"count") + len(ids)), db=e.dbs["info"])

    def _delete_items(self, txn, ids: np.ndarray) -> int:
        e = self._env
        n = 0
        for idb in _ids_bytes(ids):
            code = txn.get(idb, db=e.dbs["codes"])
            if code is None:
                continue
            txn.delete(code + idb, db=e.dbs["tree"])
            self._txlog[1].append(code + idb)
            txn.delete(idb, db=e.dbs["codes"])
            txn.delete(idb, db=e.dbs["meta"])
            txn.delete(idb, db=e.dbs["conf"])
            n += 1
        if n:
            txn.put(b"count", _u64(_info(txn, e, b"count") - n), db=e.dbs["info"])
        return n

    def _prepare(self, ids, codes, meta, conf):
        codes = _check_codes(codes, self.nbits)
        ids = _as_ids(ids, len(codes))
        if len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one batch")
        return ids, codes, _meta_bytes(meta, len(ids)), _conf_rows(conf, len(ids), self.nbits)

    def add(self, ids, codes: Codes, meta: Sequence[dict | None] | None = None,
            conf: np.ndarray | None = None) -> int:
        """Add new items (ValueError, nothing written, if any id already exists). Returns count."""
        ids, codes, meta_b, conf_h = self._prepare(ids, codes, meta, conf)
        if not len(ids):
            return 0

        def fn(txn):
            cdb = self._env.dbs["codes"]
            for i, idb in zip(ids, _ids_bytes(ids)):
                if txn.get(idb, db=cdb) is not None:
                    raise ValueError(f"id {int(i)} already exists (use upsert)")
            self._put_items(txn, ids, codes, meta_b, conf_h)
            return len(ids)

        return self._write(fn)

    def upsert(self, ids, codes: Codes, meta: Sequence[dict | None] | None = None,
               conf: np.ndarray | None = None) -> int:
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
        ids = np.unique(_as_ids(ids))
        if not len(ids):
            return 0
        return self._write(lambda txn: self._delete_items(txn, ids))

    def update_meta(self, ids, meta: Sequence[dict | None]) -> int:
        """Replace the metadata of existing items (missing ids ignored)."""
        ids = _as_ids(ids)
        meta_b = _meta_bytes(meta, len(ids))

        def fn(txn):
            e, n = self._env, 0
            for idb, mb in zip(_ids_bytes(ids), meta_b):
                if txn.get(idb, db=e.dbs["codes"]) is None:
                    continue
                if mb is None:
                    txn.delete(idb, db=e.dbs["meta"])
                else:
                    txn.put(idb, mb, db=e.dbs["meta"])
                n += 1
            return n

        return self._write(fn)

    def sync_manifest(self) -> None:
        with self._env.env.begin() as txn:
            self.manifest["count"] = _info(txn, self._env, b"count")
            self.manifest["generation"] = _info(txn, self._env, b"generation")
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_manifest(self.path, self.manifest)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._env.env.sync(True)
            self.sync_manifest()
        finally:
            _release_env(self._env)

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# atomic bulk build
# --------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def build_index(
    out_dir,
    ids,
    codes: Codes,
    meta: Sequence[dict | None] | None = None,
    conf: np.ndarray | None = None,
    layout: CodeLayout | None = None,
    model_hash: str = "",
    build_params: dict | None = None,
    overwrite: bool = True,
    progress: bool = False,
    force: bool = False,
) -> Path:
    """Build a complete index at ``out_dir`` atomically; returns its path.

    Everything is written into a temporary sibling directory (``.<name>.tmp-<pid>-<rand>``),
    synced, and renamed into place, so an interrupted build leaves the previous index (or none),
    never a partial one; the next build removes the dead temp directory (a clean restart, no
    resume). Keys are sorted and appended (``putmulti(append=True)``).

    ``out_dir`` may be new, an empty directory or an existing cbir index (replaced when
    ``overwrite``); anything else raises :class:`~cbir.indexer.publish.OutputExistsError`
    unless ``force``, and even then only the index's own entries are written there
    (:mod:`cbir.indexer.publish`): cbir never deletes a file it did not write.
    """
    out = Path(out_dir).absolute()
    if layout is None:
        layout = CodeLayout(nbits=codes.nbits)
    codes = _check_codes(codes, layout.nbits)
    ids = _as_ids(ids, len(codes))
    n = len(ids)
    ids_sorted = bool(n < 2 or (ids[1:] > ids[:-1]).all())
    byid = np.arange(n) if ids_sorted else np.argsort(ids, kind="stable")
    if not ids_sorted and n > 1 and (ids[byid[1:]] == ids[byid[:-1]]).any():
        raise ValueError("ids must be unique")
    meta_b = _meta_bytes(meta, n)
    conf_h = _conf_rows(conf, n, layout.nbits)
    mode = _publish.check_output(out, force)
    if mode == "index" and not overwrite:
        raise FileExistsError(f"{out} exists (overwrite=False)")
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    _publish.cleanup_stale(parent, out.name, out, _pid_alive)
    tmp = parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    bar = _bar(progress, n)
    try:
        tmp.mkdir()
        dbdir = tmp / LMDB_DIR
        dbdir.mkdir()
        nb = codes.nbytes
        est = n * (2 * (nb + 8) + 40 + (2 * layout.nbits if conf_h is not None else 0)) * 2
        if meta_b is not None:
            est += sum(len(m) + 24 for m in meta_b if m is not None) * 2
        env = lmdb.open(str(dbdir), map_size=max(INITIAL_MAP, est), subdir=True, writemap=True,
                        max_dbs=len(DBS) + 2, sync=False, metasync=False, readahead=False)
        try:
            dbs = {name.decode(): env.open_db(name) for name in DBS}
            order = _key_order(codes.packed, ids, ids_sorted)
            sorted_codes = codes.packed[order]
            sorted_ids = ids[order]
            # several transactions are fine: the directory is invisible until the rename
            for s in range(0, max(n, 1), PUT_CHUNK):
                e_ = min(n, s + PUT_CHUNK)
                if e_ <= s:
                    break
                _put_retry(env, lambda txn: _bulk_chunk(
                    txn, dbs, sorted_codes[s:e_], sorted_ids[s:e_], ids[byid[s:e_]],
                    codes.packed[byid[s:e_]], meta_b, conf_h, byid[s:e_]))
                if bar is not None:
                    bar.update(e_ - s)
            with env.begin(write=True) as txn:
                txn.put(b"generation", _u64(1), db=dbs["info"])
                txn.put(b"count", _u64(n), db=dbs["info"])
            env.sync(True)
        finally:
            env.close()
        man = _new_manifest(layout, model_hash, build_params)
        man["count"], man["generation"] = n, 1
        man["build"].setdefault("seconds", round(time.perf_counter() - t0, 3))
        if n >= _derived.PERSIST_MIN:
            Derived(1, layout.nbits, sorted_codes, sorted_ids).save(tmp / DERIVED_DIR)
        _write_manifest(tmp, man)  # the manifest is written last: it marks a complete index
        _publish.fsync_dir(tmp)
        _publish.publish(tmp, out, _publish.check_output(out, force))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return out


def _bar(progress: bool, total: int):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="index: write LMDB", unit="code", unit_scale=True)


def _put_retry(env, fn) -> None:
    while True:
        try:
            with env.begin(write=True) as txn:
                fn(txn)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def _bulk_chunk(txn, dbs, s_codes, s_ids, id_sorted_ids, id_sorted_codes, meta_b, conf_h, rows):
    keys = _make_keys(s_codes, s_ids)
    txn.cursor(dbs["tree"]).putmulti(zip(_rows_bytes(keys), repeat(b"")), append=True)
    idb = _ids_bytes(id_sorted_ids)
    txn.cursor(dbs["codes"]).putmulti(zip(idb, _rows_bytes(id_sorted_codes)), append=True)
    if meta_b is not None:
        items = [(b, meta_b[r]) for b, r in zip(idb, rows) if meta_b[r] is not None]
        txn.cursor(dbs["meta"]).putmulti(items, append=True)
    if conf_h is not None:
        cr = _rows_bytes(conf_h[rows].view(np.uint8).reshape(len(rows), -1))
        txn.cursor(dbs["conf"]).putmulti(zip(idb, cr), append=True)


# --------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------
def _prefix_mask(codes: np.ndarray, q: np.ndarray, p: int) -> np.ndarray:
    """Rows of packed ``codes`` whose first ``p`` bits equal those of ``q``."""
    if p == 0:
        return np.ones(len(codes), dtype=bool)
    nfull = (p + 7) // 8
    mask = np.full(nfull, 0xFF, dtype=np.uint8)
    if p % 8:
        mask[-1] = (0xFF << (8 - p % 8)) & 0xFF
    return ((codes[:, :nfull] & mask) == (q[:nfull] & mask)).all(axis=1)


def _dir_bytes(p: Path) -> int:
    """Allocated bytes (st_blocks) of all files under ``p``."""
    tot = 0
    for root, _dirs, files in os.walk(p):
        for f in files:
            try:
                st = os.stat(os.path.join(root, f))
                tot += st.st_blocks * 512
            except OSError:
                pass
    return tot


class IndexReader:
    """Searches one consistent snapshot (an LMDB read transaction) of an index.

    ``readonly=False`` also enables ``add``/``delete``/``upsert`` (through an
    :class:`IndexWriter` on the same environment); those refresh the snapshot after writing.
    Otherwise call :meth:`refresh` to see other writers' changes. Thread-safe (searches on the
    shared snapshot are serialised by a lock).
    """

    #: estimated cost of a FAISS flat scan per item (ns, one core); ``method="auto"`` gives MIH
    #: this budget (see MIH.knn cost model) and switches to the flat scan beyond it
    FLAT_NS_PER_ITEM = 1.5

    def __init__(self, path, readonly: bool = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.layout = CodeLayout.from_dict(self.manifest["layout"])
        self.nbits = self.layout.nbits
        self.nb = (self.nbits + 7) // 8
        self.readonly = readonly
        self._writer = None if readonly else IndexWriter(self.path)
        self._env = _acquire_env(self.path / LMDB_DIR, want_write=False) if readonly else self._writer._env
        self._lex = LexSearcher(self.nbits, self._env.dbs["tree"])
        self._lock = threading.RLock()
        self._txn = None
        self.generation = -1
        self._count = 0
        self._derived: Derived | None = None
        self._stats: dict | None = None
        self._auto = {"n": 0, "fail": 0.0}  # MIH-vs-flat choice of method="auto"
        self._closed = False
        self.refresh()

    # snapshot -------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Move to the newest committed snapshot; True when it changed."""
        with self._lock:
            env = self._env.env
            try:
                txn = env.begin(buffers=False)
            except lmdb.MapResizedError:
                env.set_mapsize(0)
                txn = env.begin(buffers=False)
            gen = _info(txn, self._env, b"generation")
            old, self._txn = self._txn, txn
            if old is not None:
                try:
                    old.abort()
                except lmdb.Error:  # already invalidated (map grown in this process)
                    pass
            changed = gen != self.generation
            if changed:
                self.generation = gen
                self._count = _info(txn, self._env, b"count")
                self._stats = None  # derived structures catch up lazily (see derived())
            return changed

    def _with_txn(self, fn):
        """Run ``fn(txn)`` on the snapshot. If a map resize in this process invalidated the
        transaction, move to the newest snapshot and run it again."""
        with self._lock:
            try:
                return fn(self._txn)
            except lmdb.Error as exc:
                if "closed/deleted/dropped" not in str(exc) and not isinstance(exc, lmdb.MapResizedError):
                    raise
                log.info("snapshot invalidated by a map resize; refreshing")
                self.refresh()
                return fn(self._txn)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._txn is not None:
                self._txn.abort()
                self._txn = None
            self._derived = None
            if self._writer is not None:
                self._writer.close()
            else:
                _release_env(self._env)

    def __enter__(self) -> "IndexReader":
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

    #: replay the change log onto the derived structures while the delta stays below
    #: max(DELTA_MIN, DELTA_FRACTION * N) items; beyond, rebuild them from LMDB
    DELTA_MIN = 2_000
    DELTA_FRACTION = 0.02

    def derived(self) -> View:
        """Derived structures of the current snapshot: the newest persisted (or in-memory) base
        generation plus the change log replayed up to the snapshot, or rebuilt from LMDB."""
        with self._lock:
            gen = self.generation
            v = self._derived
            if v is not None and v.generation == gen:
                return v
            root = self.path / DERIVED_DIR
            if v is None or v.generation > gen:
                v = None
                g0 = latest_saved(root, gen)
                base = Derived.load(root, g0, self.nbits) if g0 is not None else None
                if base is not None:
                    v = View(base, g0)
            if v is not None and v.generation < gen:
                recs = self._with_txn(lambda txn: self._read_log(txn, v.generation + 1, gen))
                max_delta = max(self.DELTA_MIN, int(self.DELTA_FRACTION * v.base.n))
                v = v.replay(recs, self.nb, max_delta) if recs is not None else None
            if v is None:
                d = self._with_txn(lambda txn: Derived.from_txn(txn, self._env.dbs["tree"], self.nbits, gen))
                if d.n >= _derived.PERSIST_MIN and os.access(self.path, os.W_OK):
                    d.save(root)
                v = View(d, gen)
            self._derived = v
            return v

    def _read_log(self, txn, g1: int, g2: int):
        """Change-log records g1..g2 as (generation, added keys, deleted keys), or None when
        one is missing (pruned) or was too large to log."""
        if g2 - g1 + 1 > LOG_KEEP:
            return None
        db, ks = self._env.dbs["log"], self.nb + 8
        out = []
        for g in range(g1, g2 + 1):
            rec = txn.get(_u64(g), db=db)
            if rec is None:
                return None
            na, nd = int.from_bytes(rec[:4], "big"), int.from_bytes(rec[4:8], "big")
            if na == _LOG_TOO_BIG:
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

    def _keys_result(self, q: np.ndarray, keys: np.ndarray, order: str) -> SearchResult:
        nb, ks = self.nb, self.nb + 8
        keys = np.ascontiguousarray(keys)
        n = len(keys)
        if n == 0:
            return make_result(q, keys[:, :nb], np.zeros(0, np.int64), self.nbits, order)
        ids = np.ndarray((n,), dtype=">i8", buffer=keys, offset=nb, strides=(ks,)).astype(np.int64)
        codes = Codes(keys[:, :nb].copy(), self.nbits)
        if nb > 8 or n == 0:
            return make_result(q, codes.packed, ids, self.nbits, order)
        # <= 64 bits: XOR as one big-endian uint64 per hit
        head = np.ndarray((n,), dtype=">u8", buffer=keys, strides=(ks,)) & self._lex._mask
        x = head.astype(np.uint64) ^ np.uint64(int.from_bytes(q.tobytes().ljust(8, b"\0"), "big"))
        dist = np.bitwise_count(x).astype(np.int32)
        hi = np.frexp((x >> np.uint64(32)).astype(np.float64))[1]
        lo = np.frexp((x & np.uint64(0xFFFFFFFF)).astype(np.float64))[1]
        cpl = np.minimum(64 - np.where(hi > 0, hi + 32, lo), self.nbits).astype(np.int32)
        return SearchResult(ids, codes, dist, cpl, order)

    # lexicographic ------------------------------------------------------------------------
    def search_lex(self, code, k: int = 10, offset: int = 0, conf: np.ndarray | None = None,
                   conf_threshold: float | None = None, probe_budget: int = 16) -> SearchResult:
        """Top-``k`` in the lexicographic order (after skipping ``offset``).

        Uncertainty-aware probing: with ``conf`` ((B,) per-bit confidence of the query) and
        ``conf_threshold``, up to ``log2(probe_budget)`` least-confident bits below the threshold
        become wildcards: both subtrees are probed and results are ranked by ``q XOR c`` with the
        wildcard bits ignored, then by the full lexicographic order (exact for that order).
        """
        q = self._query(code)
        k, offset = int(k), int(offset)
        if k < 0 or offset < 0:
            raise ValueError("k and offset must be >= 0")
        need = k + offset
        if conf is not None and conf_threshold is not None:
            return self._search_lex_uncertain(q, need, offset, conf, conf_threshold, probe_budget)
        if need == 0 or self._count == 0:
            keys = np.zeros((0, self.nb + 8), dtype=np.uint8)
        else:
            qb = q.tobytes()
            keys = self._with_txn(lambda txn: self._lex.topk(txn, qb, need))
        return self._keys_result(q, keys[offset:], "lex")

    def search_lex_batch(self, codes, k: int = 10, offset: int = 0, conf=None,
                         conf_threshold: float | None = None, probe_budget: int = 16) -> list[SearchResult]:
        Q = self._queries(codes)
        return [self.search_lex(Q[i].tobytes(), k, offset,
                                None if conf is None else np.asarray(conf)[i], conf_threshold,
                                probe_budget) for i in range(len(Q))]

    def _search_lex_uncertain(self, q, need, offset, conf, thr, budget) -> SearchResult:
        conf = np.asarray(conf, dtype=np.float32).reshape(-1)
        if conf.shape[0] != self.nbits:
            raise ValueError(f"conf must have {self.nbits} entries")
        low = np.flatnonzero(conf < thr)
        w = min(len(low), max(0, int(np.log2(max(1, budget)))))
        if w == 0:
            qb = q.tobytes()
            keys = self._with_txn(lambda txn: self._lex.topk(txn, qb, need)) if need and self._count \
                else np.zeros((0, self.nb + 8), np.uint8)
            return self._keys_result(q, keys[offset:], "lex")
        wild = low[np.argsort(conf[low], kind="stable")[:w]]
        flips = np.zeros((w, self.nb), dtype=np.uint8)
        for j, b in enumerate(wild):
            flips[j, b // 8] = 0x80 >> (b % 8)
        def probe_all(txn):
            out = []
            for v in range(1 << w):
                qv = q.copy()
                for j in range(w):
                    if v >> j & 1:
                        qv ^= flips[j]
                if need and self._count:
                    out.append(self._lex.topk(txn, qv.tobytes(), need))
            return out

        allkeys = self._with_txn(probe_all)
        keys = np.unique(np.concatenate(allkeys), axis=0) if allkeys else np.zeros((0, self.nb + 8), np.uint8)
        codes, ids = keys[:, : self.nb], np.ascontiguousarray(keys[:, self.nb:]).view(">i8").reshape(-1)
        mask = np.full(self.nb, 0xFF, dtype=np.uint8)
        mask ^= flips.sum(axis=0).astype(np.uint8)  # flips are distinct bits
        from cbir.indexer.results import xor_sort_keys

        mkeys = xor_sort_keys(q & mask, codes & mask)
        perm = np.lexsort([ids] + xor_sort_keys(q, codes) + mkeys)[offset:need]
        return make_result(q, codes[perm], ids[perm], self.nbits, "lex")

    # prefix ------------------------------------------------------------------------------------
    def _prefix_arg(self, bits) -> tuple[bytes, int]:
        if isinstance(bits, Codes):
            if len(bits) != 1:
                raise ValueError("prefix must be one code")
            p = bits.nbits
            packed = bits.packed[0]
        else:
            if isinstance(bits, str):
                bits = [int(c) for c in bits.strip() if c in "01"]
            arr = np.asarray(list(bits), dtype=np.uint8).reshape(1, -1)
            p = arr.shape[1]
            packed = Codes.from_bits(arr).packed[0] if p else np.zeros(0, np.uint8)
        if p > self.nbits:
            raise ValueError(f"prefix of {p} bits is longer than the {self.nbits}-bit codes")
        return packed.tobytes(), p

    def _cursor_key(self, cursor) -> bytes | None:
        if cursor is None or cursor == b"" or cursor == "":
            return None
        ks = self.nb + 8
        if isinstance(cursor, (bytes, bytearray, memoryview)):
            cursor = bytes(cursor)
            if len(cursor) == ks:
                return cursor
            cursor = cursor.decode("ascii", "replace")
        try:
            key = bytes.fromhex(str(cursor))
        except ValueError:
            raise ValueError("invalid prefix cursor") from None
        if len(key) != ks:
            raise ValueError("invalid prefix cursor")
        return key

    def search_prefix(self, bits, limit: int = 100, cursor: str | bytes | None = None) -> PrefixPage:
        """Items whose code starts with the bit prefix ``bits`` (str of 0/1, sequence of 0/1, or
        a 1-row Codes whose ``nbits`` is the prefix length), ascending code then id, ``limit``
        per page; pass ``page.next_cursor`` back to continue."""
        pb, p = self._prefix_arg(bits)
        limit = int(limit)
        if limit < 0:
            raise ValueError("limit must be >= 0")
        nb, ks = self.nb, self.nb + 8
        nfull = len(pb)
        lo = pb.ljust(nb, b"\0") + b"\0" * 8
        start = self._cursor_key(cursor)
        if start is not None:
            if start < lo:
                raise ValueError("cursor does not belong to this prefix")
        else:
            start = lo
        def read(txn):
            cur = txn.cursor(self._env.dbs["tree"])
            return b"".join(islice(cur.iternext(values=False), limit + 1)) if cur.set_range(start) else b""

        buf = self._with_txn(read)
        keys = np.frombuffer(buf, dtype=np.uint8).reshape(-1, ks)
        if p:
            want = np.frombuffer(pb, dtype=np.uint8)
            mask = np.full(nfull, 0xFF, dtype=np.uint8)
            if p % 8:
                mask[-1] = (0xFF << (8 - p % 8)) & 0xFF
            ok = ((keys[:, :nfull] & mask) == want).all(axis=1)
            n_ok = int(np.argmin(ok)) if not ok.all() else len(ok)
        else:
            n_ok = len(keys)
        nxt = keys[limit].tobytes().hex() if n_ok > limit else None
        sel = keys[: min(n_ok, limit)]
        ids = np.ascontiguousarray(sel[:, nb:]).view(">i8").reshape(-1).astype(np.int64)
        return PrefixPage(ids, Codes(np.ascontiguousarray(sel[:, :nb]), self.nbits), nxt)

    def search_prefix_batch(self, prefixes: Iterable, limit: int = 100) -> list[PrefixPage]:
        return [self.search_prefix(p, limit) for p in prefixes]

    # Hamming -----------------------------------------------------------------------------------
    def search_hamming(self, code, k: int | None = None, radius: int | None = None,
                       method: str = "auto") -> SearchResult:
        """Exact Hamming k-NN (``k``), range (``radius``: all with distance <= radius), or both
        (the ``k`` nearest within ``radius``); ties in the lexicographic order, then id.
        ``method``: ``auto`` (MIH unless its estimated cost exceeds a flat scan's, then FAISS flat),
        ``mih``, ``faiss`` or ``brute`` (numpy); all give identical results."""
        q = self._query(code)
        if k is None and radius is None:
            raise ValueError("search_hamming needs k, radius or both")
        if method not in ("auto", "mih", "faiss", "brute"):
            raise ValueError(f"unknown method {method!r}")
        v = self.derived()
        if v.n == 0 or (k is not None and int(k) <= 0):
            return make_result(q, np.zeros((0, self.nb), np.uint8), np.zeros(0, np.int64), self.nbits, "hamming")
        b = v.base
        kb = None if k is None else min(b.n, int(k) + len(v.deleted))
        if b.n and (kb is None or kb > 0):
            pos, dist = self._hamming_candidates(b, q, kb, radius, method)
        else:
            pos, dist = np.zeros(0, np.int64), np.zeros(0, np.int32)
        if len(v.deleted):
            keep = v.alive(pos)
            pos, dist = pos[keep], dist[keep]
        codes, ids = np.asarray(b.codes[pos]), np.asarray(b.ids[pos])
        if len(v.add_ids):  # rows written since the base generation: scanned directly
            ad = hamming_to(q, v.add_codes)
            sel = np.ones(len(ad), bool) if radius is None else ad <= radius
            codes = np.concatenate([codes, v.add_codes[sel]])
            ids = np.concatenate([ids, v.add_ids[sel]])
            dist = np.concatenate([dist, ad[sel]])
        perm = order_candidates(q, codes, ids, "hamming", dist)
        if k is not None:
            perm = perm[: int(k)]
        return make_result(q, codes[perm], ids[perm], self.nbits, "hamming", dist[perm])

    def _hamming_candidates(self, d: Derived, q, k, radius, method):
        budget = None
        if method == "auto":
            budget = max(2 * MIH.STEP_COST, int(d.n * self.FLAT_NS_PER_ITEM))
        if method == "brute":
            dist = hamming_to(q, d.codes)
            sel = np.ones(d.n, bool) if radius is None else dist <= radius
            if k is not None and sel.sum() > k:
                dk = np.partition(dist[sel], k - 1)[k - 1]
                sel &= dist <= dk
            pos = np.flatnonzero(sel)
            return pos, dist[pos]
        res = None
        try_mih = method == "mih"
        if method == "auto":
            # adaptive: when MIH keeps running over budget on this index (e.g. uniform codes,
            # where exact k-NN needs a large radius), go straight to the flat scan and retry
            # MIH only on every 16th query
            a = self._auto
            a["n"] += 1
            try_mih = a["fail"] < 0.5 or a["n"] % 16 == 0
        if try_mih:
            res = d.mih.range(q, radius, budget) if radius is not None else d.mih.knn(q, k, budget)
            if method == "auto":
                self._auto["fail"] = 0.8 * self._auto["fail"] + 0.2 * (res is None)
        if res is None:
            res = d.faiss.range(q, radius) if radius is not None else d.faiss.knn(q, k)
        return res

    def search_hamming_batch(self, codes, k: int | None = None, radius: int | None = None,
                             method: str = "auto") -> list[SearchResult]:
        Q = self._queries(codes)
        return [self.search_hamming(Q[i].tobytes(), k, radius, method) for i in range(len(Q))]

    # hybrid ------------------------------------------------------------------------------------
    def search_hybrid(self, code, k: int = 10, class_bits: int | None = None) -> SearchResult:
        """Items whose first ``class_bits`` bits (default: the layout's class bits) equal the
        query's, ranked by Hamming distance on the remaining bits, ties in lexicographic order
        then id. Only same-prefix items are returned (fewer than ``k`` if the bucket is small).
        With no class bits this is :meth:`search_hamming`."""
        q = self._query(code)
        cb = self.layout.class_bits if class_bits is None else int(class_bits)
        if not 0 <= cb <= self.nbits:
            raise ValueError(f"class_bits must be in 0..{self.nbits}")
        if cb == 0:
            return self.search_hamming(q.tobytes(), k=k)
        v = self.derived()
        if k <= 0 or v.n == 0:
            return make_result(q, np.zeros((0, self.nb), np.uint8), np.zeros(0, np.int64), self.nbits, "hamming")
        b = v.base
        lo, hi = self._prefix_range(b, q, cb)
        rows = np.arange(lo, hi)
        if len(v.deleted):
            rows = rows[v.alive(rows)]
        sub = np.asarray(b.codes[lo:hi])[rows - lo]
        ids = np.asarray(b.ids[lo:hi])[rows - lo]
        if len(v.add_ids):
            m = _prefix_mask(v.add_codes, q, cb)
            sub = np.concatenate([sub, v.add_codes[m]])
            ids = np.concatenate([ids, v.add_ids[m]])
        if len(ids) == 0:
            return make_result(q, np.zeros((0, self.nb), np.uint8), np.zeros(0, np.int64), self.nbits, "hamming")
        dist = hamming_to(q, sub)
        if len(ids) > k:
            dk = np.partition(dist, k - 1)[k - 1]
            pos = np.flatnonzero(dist <= dk)
        else:
            pos = np.arange(len(ids))
        perm = order_candidates(q, sub[pos], ids[pos], "hamming", dist[pos])[:k]
        pos = pos[perm]
        return make_result(q, sub[pos], ids[pos], self.nbits, "hamming", dist[pos])

    def _prefix_range(self, d: Derived, q: np.ndarray, p: int) -> tuple[int, int]:
        """Positions [lo, hi) of the sorted codes starting with the first ``p`` bits of q."""
        if p <= 64:
            h = int.from_bytes(q[:8].tobytes().ljust(8, b"\0"), "big")
            lo_v = (h >> (64 - p)) << (64 - p)
            hi_v = lo_v + (1 << (64 - p)) - 1
            lo = int(np.searchsorted(d.head64, np.uint64(lo_v), side="left"))
            hi = int(np.searchsorted(d.head64, np.uint64(hi_v), side="right"))
            return lo, hi
        match = np.flatnonzero(_prefix_mask(np.asarray(d.codes), q, p))
        return (int(match[0]), int(match[-1]) + 1) if len(match) else (0, 0)

    def search_hybrid_batch(self, codes, k: int = 10, class_bits: int | None = None) -> list[SearchResult]:
        Q = self._queries(codes)
        return [self.search_hybrid(Q[i].tobytes(), k, class_bits) for i in range(len(Q))]

    # items -------------------------------------------------------------------------------------
    def get(self, id: int) -> Item | None:
        """The stored item ``id`` or None."""
        idb = _u64(int(id)) if int(id) >= 0 else None
        if idb is None:
            return None
        dbs = self._env.dbs

        def read(txn):
            code = txn.get(idb, db=dbs["codes"])
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

    # statistics ----------------------------------------------------------------------------------
    def stats(self, coverage: bool = True) -> dict:
        """Counts, layout, sizes and coverage (``cbir.metrics.coverage``) of this snapshot."""
        with self._lock:
            if self._stats is not None and (not coverage or "coverage" in self._stats):
                return self._stats
            st = {
                "format_version": self.manifest.get("format_version"),
                "count": self._count,
                "n": self._count,
                "nbits": self.nbits,
                "generation": self.generation,
                "model_hash": self.model_hash,
                "layout": self.layout.to_dict(),
                "build": self.manifest.get("build", {}),
                "lmdb_bytes": _dir_bytes(self.path / LMDB_DIR),
                "derived_bytes": _dir_bytes(self.path / DERIVED_DIR),
            }
            st["disk_bytes"] = st["lmdb_bytes"] + st["derived_bytes"] + _file_size(self.path / MANIFEST)
            st["disk_bytes_per_item"] = st["disk_bytes"] / self._count if self._count else None
            if coverage:
                st["coverage"] = self._coverage() if self._count else None
            self._stats = st
            return st

    def _coverage(self) -> dict:
        v = self.derived()
        if not v.exact:
            return self._compute_coverage(v)
        out = v.base.load_json("coverage")  # computed once per generation when persisted
        if out is None:
            out = self._compute_coverage(v)
            v.base.save_json("coverage", out)
        return out

    def _compute_coverage(self, v: View) -> dict:
        from cbir.metrics import coverage as cov

        packed, _ids = v.materialize()
        d = SimpleNamespace(n=len(packed))
        codes = Codes(np.ascontiguousarray(packed), self.nbits)
        if d.n * self.nbits <= (1 << 26):
            return cov.coverage_report(codes)
        # large index: the same figures without the O(N B^2) bit-correlation matrix
        counts = cov.bucket_counts(codes)
        cf = counts.astype(np.float64)
        p = cf / d.n
        sizes, nbk = np.unique(counts, return_counts=True)
        return {
            "n": int(d.n),
            "nbits": self.nbits,
            "unique_codes": int(len(counts)),
            "unique_percent": float(100.0 * len(counts) / d.n),
            "entropy_bits": float(-(p * np.log2(p)).sum() + 0.0),
            "max_entropy_bits": float(min(self.nbits, np.log2(d.n))),
            "average_collision_count": float((cf * cf).sum() / d.n - 1.0),
            "largest_bucket": int(counts.max()),
            "prefix_entropy": [float(v) for v in cov.prefix_entropy(codes)],
            "bucket_size_histogram": {"sizes": [int(v) for v in sizes], "buckets": [int(v) for v in nbk]},
        }

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


def open_index(path, readonly: bool = True) -> IndexReader:
    """Open the index directory ``path`` (see :class:`IndexReader`)."""
    return IndexReader(path, readonly=readonly)
