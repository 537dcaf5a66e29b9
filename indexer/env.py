"""LMDB environments (one per data file per process) and the index manifest.

Rules enforced here (LMDB's own rules, see the lmdb(3) caveats):

* **One environment per file per process.** LMDB forbids opening the same data file twice in a
  process, so environments are cached by (real path, device:inode of ``data.mdb``); an index
  rebuilt in place (a new ``data.mdb``) is a new environment.
* **Fork.** An environment must not be used in a child after ``fork()`` (the child would share
  the parent's reader slots and locks), and py-lmdb refuses a second open of the same files in
  the child while the parent's handle exists there. Every cache entry records the pid that
  opened it; in a child, using a reader or writer opened by the parent, or opening an index the
  parent had open, raises :class:`ForkError`. Open indexes *after* forking (pre-fork servers:
  in each worker) or use the ``spawn`` start method. A child's ``close()`` of an inherited
  handle only parks it in :data:`_FORKED` (never aborting the parent's transactions).
* **Reader table.** Read-only opens use LMDB's lock file (reader table) whenever ``lock.mdb``
  is writable, so a concurrent writer never recycles pages a reader still sees. Only where the
  file system is read-only does cbir fall back to ``lock=False`` (safe only when nothing
  writes the index), with a warning.
* **Pinning.** A reader's snapshot pins the pages it can see: a reader that never refreshes
  while a writer keeps upserting makes the file grow. Call ``IndexReader.refresh()`` regularly
  (the server does after each write), or close idle readers.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import lmdb

from cbir.codes import CodeLayout
from cbir.indexer.publish import FORMAT, MANIFEST

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: sub-databases; ``labels`` (label bytes || 0x00 || 8-byte BE id -> b"") is the label posting
#: list (absent in indexes written before it existed: then label filters scan ``meta``)
DBS = (b"tree", b"codes", b"meta", b"conf", b"info", b"log", b"labels")
#: map size of writable environments: virtual address space only (the file grows with the
#: data). Growing the map later (MapFullError) invalidates this process's open read
#: transactions, which then move to the newest snapshot.
WRITE_MAP = 1 << 36

_ENVS: dict[str, list] = {}
_ENVS_LOCK = threading.Lock()
#: environments inherited from a parent process: kept referenced (never closed or freed in the
#: child, which would release the parent's reader slots)
_FORKED: list = []


class ForkError(RuntimeError):
    """An LMDB environment opened before ``fork()`` was used in the child."""


def fork_error(path) -> ForkError:
    return ForkError(
        f"index {path} was opened in process before fork(); LMDB environments cannot "
        "cross a fork. Open the index in the child after forking (or use the 'spawn' "
        "multiprocessing start method)"
    )


class Env:
    """One open LMDB environment: ``env``, sub-db handles ``dbs``, ``write_lock`` (serialises this
    process's writers), ``pid`` (the process that opened it), ``key`` (cache key)."""

    def __init__(self, key: str, env: lmdb.Environment, writable: bool, dbdir: Path) -> None:
        self.key = key
        self.env = env
        self.writable = writable
        self.dbdir = Path(dbdir)
        self.pid = os.getpid()
        self.dbs: dict[str, Any] = {}  # name -> lmdb sub-db handle, None when absent (read-only)
        for name in DBS:
            try:
                self.dbs[name.decode()] = env.open_db(name, create=writable)
            except lmdb.NotFoundError:  # read-only open of an index without this sub-db
                self.dbs[name.decode()] = None
        self.write_lock = threading.Lock()

    def replaced(self) -> bool:
        """The directory now holds another data file (the index was rebuilt or compacted in
        place); False while it is absent (mid-swap)."""
        ident = data_identity(self.dbdir)
        return ident != "new" and not self.key.endswith("|" + ident)

    @property
    def stale(self) -> bool:
        """Opened by another process (we are a fork child): must not be used."""
        return self.pid != os.getpid()


def data_identity(dbdir: Path) -> str:
    """device:inode of ``data.mdb`` (changes when an index is rebuilt or compacted in place)."""
    try:
        st = os.stat(Path(dbdir) / "data.mdb")
        return f"{st.st_dev}:{st.st_ino}"
    except OSError:
        return "new"


def _env_key(dbdir: Path) -> str:
    return f"{os.path.realpath(dbdir)}|{data_identity(dbdir)}"


def acquire_env(dbdir: Path, want_write: bool, create: bool = False) -> Env:
    """The process's environment for ``dbdir`` (opened on first use, reference counted)."""
    key = _env_key(dbdir)
    with _ENVS_LOCK:
        ent = _ENVS.get(key)
        if ent is not None and ent[0].stale:
            raise fork_error(dbdir)  # inherited across fork(): never reuse, never close
        if ent is not None:
            if want_write and not ent[0].writable:
                raise PermissionError(f"index {dbdir} is already open read-only in this process")
            ent[1] += 1
            return ent[0]
        if not create and not (Path(dbdir) / "data.mdb").exists():
            raise FileNotFoundError(f"no LMDB environment in {dbdir}")
        writable = want_write or os.access(dbdir, os.W_OK)
        kw: dict[str, Any] = {"subdir": True, "max_dbs": len(DBS) + 2, "max_readers": 1024, "readahead": False}
        if writable:
            size = max(WRITE_MAP, file_size(Path(dbdir) / "data.mdb") * 2)
            env = lmdb.open(str(dbdir), map_size=size, create=create, **kw)
        else:
            lockf = Path(dbdir) / "lock.mdb"
            use_lock = os.access(lockf, os.W_OK)
            if not use_lock:
                log.warning(
                    "%s: lock.mdb is not writable; opening without a reader table "
                    "(safe only while nothing writes this index)",
                    dbdir,
                )
            env = lmdb.open(str(dbdir), readonly=True, lock=use_lock, **kw)
        key = _env_key(dbdir)
        e = Env(key, env, writable, dbdir)
        _ENVS[key] = [e, 1]
        return e


def release_env(e: Env) -> None:
    with _ENVS_LOCK:
        ent = _ENVS.get(e.key)
        if e.stale:
            return  # a parent's environment seen from a fork child: leave it alone
        if ent is None or ent[0] is not e:
            return
        ent[1] -= 1
        if ent[1] <= 0:
            del _ENVS[e.key]
            e.env.close()


def file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def u64(v: int) -> bytes:
    return int(v).to_bytes(8, "big")


def info(txn, e: Env, name: bytes) -> int:
    v = txn.get(name, db=e.dbs["info"])
    return int.from_bytes(v, "big") if v else 0


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
def read_manifest(path) -> dict:
    p = Path(path) / MANIFEST
    if not p.exists():
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist (no index there)")
        raise FileNotFoundError(f"{path} is not a cbir index (no {MANIFEST})")
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{p}: not a cbir index manifest")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{p}: index format {m['format_version']} is newer than {FORMAT_VERSION}")
    return m


def is_sharded(manifest: dict) -> bool:
    """The manifest is that of a sharded index (:mod:`cbir.indexer.sharded`)."""
    return manifest.get("shards") is not None


def write_manifest(path: Path, manifest: dict) -> None:
    tmp = Path(path) / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(path) / MANIFEST)


def new_manifest(layout: CodeLayout, model_hash: str, build_params: dict | None) -> dict:
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
        "index_uuid": uuid.uuid4().hex,
        "labels_db": True,
    }
