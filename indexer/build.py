"""Atomic bulk build (:func:`build_index`) and compaction (:func:`compact_index`).

Both write a complete index into a temporary sibling directory (``.<name>.tmp-<pid>-<rand>``)
and publish it with :mod:`cbir.indexer.publish` (an atomic directory exchange where the
system has ``renameat2``), so an interrupted run leaves the previous index (or none), never a
partial one, and cbir never deletes a file it did not write.

A build sorts the keys once and appends every sub-database in key order
(``putmulti(append=True)``); the derived structures (sorted codes, MIH tables, FAISS index)
are built and saved with it, so the first query after opening needs no scan.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from itertools import repeat
from pathlib import Path

import lmdb
import numpy as np

from cbir.codes import CodeLayout, Codes
from cbir.indexer import derived as _derived
from cbir.indexer import derivejob as _derivejob
from cbir.indexer import publish as _publish
from cbir.indexer.derived import Derived, latest_saved
from cbir.indexer.env import (
    DBS,
    acquire_env,
    data_identity,
    info,
    is_sharded,
    new_manifest,
    read_manifest,
    release_env,
    u64,
    write_manifest,
)
from cbir.indexer.publish import DERIVED_DIR, LMDB_DIR
from cbir.indexer.rows import (
    as_ids,
    check_codes,
    conf_rows,
    head64,
    ids_bytes,
    key_order,
    label_keys,
    make_keys,
    meta_bytes,
    rows_bytes,
    stable_argsort_u64,
)

INITIAL_MAP = 64 << 20  # map size of a temporary build environment (it grows as needed)
PUT_CHUNK = 1 << 18
#: write LMDB in a thread while the derived structures are built (False: see OVERLAP_MIN)
PARALLEL = False
#: builds of at least this many items build the MIH tables in a child process while this one
#: appends the LMDB tree (:mod:`cbir.indexer.derivejob`), when a core is free for it
#: (:func:`_spare_cpu`); None: never, they are built after the append
OVERLAP_MIN: int | None = 1 << 21


def _spare_cpu() -> bool:
    """A core is free for the derived-structure child: at least 2 usable cores and a 1-minute
    load average (this build included) below their number less one half. On a saturated
    machine the child only takes time from the append (measured: slower than one after the
    other at load 3-4 on 2 cores)."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        ncpu = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = 0.0
    return ncpu >= 2 and load < ncpu - 0.5


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def _tmp_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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

    Everything is written into a temporary sibling directory, synced, and published, so an
    interrupted build leaves the previous index (or none), never a partial one; the next build
    removes the dead temp directory (a clean restart, no resume).

    ``out_dir`` may be new, an empty directory or an existing cbir index (replaced when
    ``overwrite``); anything else raises :class:`~cbir.indexer.publish.OutputExistsError`
    unless ``force``, and even then only the index's own entries are written there
    (:mod:`cbir.indexer.publish`): cbir never deletes a file it did not write.
    """
    out = Path(out_dir).absolute()
    if layout is None:
        layout = CodeLayout(nbits=codes.nbits)
    codes = check_codes(codes, layout.nbits)
    ids = as_ids(ids, len(codes))
    n = len(ids)
    ids_sorted = bool(n < 2 or (ids[1:] > ids[:-1]).all())
    byid = np.arange(n) if ids_sorted else np.argsort(ids, kind="stable")
    if not ids_sorted and n > 1 and (ids[byid[1:]] == ids[byid[:-1]]).any():
        raise ValueError("ids must be unique")
    meta_b = meta_bytes(meta, n)
    conf_h = conf_rows(conf, n, layout.nbits)
    lab_keys = label_keys(meta_b, ids, tuple(layout.class_names or ()))
    # large builds write one id-keyed sub-db less: id -> code comes from the saved base
    # (``CodeLookup``), the ``codes`` sub-db then holds only later writes
    delta = n >= _derived.PERSIST_MIN
    mode = _publish.check_output(out, force)
    if mode == "index" and not overwrite:
        raise FileExistsError(f"{out} exists (overwrite=False)")
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    _publish.cleanup_stale(parent, out.name, out, _pid_alive)
    tmp = _tmp_dir(out)
    t0 = time.perf_counter()
    bar = _bar(progress, n)
    try:
        tmp.mkdir()
        dbdir = tmp / LMDB_DIR
        dbdir.mkdir()
        nb = codes.nbytes
        est = n * (2 * (nb + 8) + 40 + (2 * layout.nbits if conf_h is not None else 0)) * 2
        if meta_b is not None:
            est += sum(len(m) + 24 for m in meta_b if m is not None) * 2 + sum(map(len, lab_keys)) * 2
        env = lmdb.open(
            str(dbdir),
            map_size=max(INITIAL_MAP, est),
            subdir=True,
            writemap=True,
            max_dbs=len(DBS) + 2,
            sync=False,
            metasync=False,
            readahead=False,
        )
        lmdb_done: list[float] = []
        writer = None
        job: _derivejob.Job | None = None
        early = None  # the child process of the derived structures, before it has its work
        try:
            dbs = {name.decode(): env.open_db(name) for name in DBS}
            if delta and not PARALLEL and OVERLAP_MIN is not None and n >= OVERLAP_MIN and _spare_cpu():
                early = _derivejob.spawn()  # (its start-up runs while this process sorts)
            order, sorted_codes, sorted_ids, sorted_head = _sort_keys(codes.packed, ids, ids_sorted, byid)
            write = functools.partial(
                _write_lmdb, env, dbs, n, sorted_codes, sorted_ids, ids, byid, None if delta else codes.packed,
                meta_b, conf_h, lab_keys, bar, lmdb_done, t0,
            )  # fmt: skip
            if delta and PARALLEL:  # the one sorted append runs while the derived structures are built
                writer = _Writer(write)
                writer.start()
            elif delta:  # MIH + FAISS in a child process (large builds) while the append runs here
                head = sorted_head if sorted_head is not None else head64(sorted_codes)
                job, early = _derivejob.start(tmp / DERIVED_DIR, 1, layout.nbits, sorted_codes, head, early), None
                write()
            else:
                write()
            if delta:  # MIH tables, FAISS index and the id index now, not on the first query
                idx = np.int32 if n < 2**31 else np.int64
                inv = np.empty(n, dtype=idx)
                inv[order] = np.arange(n, dtype=idx)  # row of each input item
                spos = inv if ids_sorted else inv[byid]
                sid = ids if ids_sorted else ids[byid]
                if job is not None:
                    job.finish(sorted_codes, sorted_ids, head, (sid, spos))
                    job = None
                else:
                    d = Derived(1, layout.nbits, sorted_codes, sorted_ids, head64=sorted_head, by_id=(sid, spos))
                    d.save(tmp / DERIVED_DIR)
            if writer is not None:
                writer.finish()
        finally:
            if writer is not None and writer.is_alive():
                writer.join()  # (never close the environment under a running writer)
            if job is not None:  # (the build failed: stop the child before its directory goes)
                job.kill()
            _derivejob.stop(early)
            env.close()
        t_lmdb = lmdb_done[0]
        man = new_manifest(layout, model_hash, build_params)
        man["count"], man["generation"] = n, 1
        man["codes_db"] = "delta" if delta else "full"
        man["build"].setdefault("seconds", round(time.perf_counter() - t0, 3))
        man["build"].setdefault("lmdb_seconds", round(t_lmdb, 3))
        write_manifest(tmp, man)  # the manifest is written last: it marks a complete index
        _publish.fsync_dir(tmp)
        _publish.publish(tmp, out, _publish.check_output(out, force))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return out


def _sort_keys(packed: np.ndarray, ids: np.ndarray, ids_sorted: bool, byid: np.ndarray):
    """(order, sorted packed codes, sorted ids, sorted head64 or None): the one sort of the
    build (tree key order), which feeds the LMDB append and every derived array."""
    n, nb = packed.shape
    if nb > 8:
        order = key_order(packed, ids, ids_sorted)
        return order, packed[order], ids[order], None
    h = head64(packed)
    hv = h >> np.uint64(64 - 8 * nb) if nb < 8 else h  # (pad bytes need no radix pass)
    order = stable_argsort_u64(hv, 8 * nb, order=None if ids_sorted else byid)
    hs = h[order]
    sc = hs.astype(">u8").view(np.uint8).reshape(n, 8)
    # ids 0..n-1 (sorted, unique, first 0, last n-1): the sorted ids are the order itself
    arange = ids_sorted and n and int(ids[0]) == 0 and int(ids[-1]) == n - 1
    sids = order.astype(np.int64, copy=False) if arange else ids[order]
    return order, (sc if nb == 8 else np.ascontiguousarray(sc[:, :nb])), sids, hs


class _Writer(threading.Thread):
    """Runs the LMDB append in a thread (py-lmdb releases the GIL around each put, numpy
    around its loops, so the append and the derived structures share the cores)."""

    def __init__(self, fn) -> None:
        super().__init__(name="cbir-index-lmdb", daemon=True)
        self.fn = fn
        self.exc: BaseException | None = None

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # re-raised in the building thread by finish()
            self.exc = exc

    def finish(self) -> None:
        self.join()
        if self.exc is not None:
            raise self.exc


def _write_lmdb(
    env, dbs, n, sorted_codes, sorted_ids, ids, byid, packed, meta_b, conf_h, lab_keys, bar, done: list, t0: float
) -> None:
    """The sorted append of the whole build: ``tree`` (and, when given, ``codes``, ``meta``,
    ``conf``, ``labels``) in key order, then ``info``; records the elapsed time in ``done``.
    Several transactions are fine: the directory is invisible until it is published."""
    per_id = packed is not None or meta_b is not None or conf_h is not None
    for s in range(0, n, PUT_CHUNK):
        e_ = min(n, s + PUT_CHUNK)
        rows = byid[s:e_] if per_id else None
        _put_retry(
            env,
            functools.partial(
                _bulk_chunk,
                dbs=dbs,
                s_codes=sorted_codes[s:e_],
                s_ids=sorted_ids[s:e_],
                id_sorted_ids=ids[rows] if per_id else None,
                id_sorted_codes=None if packed is None else packed[rows],
                meta_b=meta_b,
                conf_h=conf_h,
                rows=rows,
            ),
        )
        if bar is not None:
            bar.update(e_ - s)
    for s in range(0, len(lab_keys), PUT_CHUNK):
        _put_retry(env, functools.partial(_put_labels, dbs=dbs, keys=lab_keys[s : s + PUT_CHUNK]))
    with env.begin(write=True) as txn:
        txn.put(b"generation", u64(1), db=dbs["info"])
        txn.put(b"count", u64(n), db=dbs["info"])
    env.sync(True)
    done.append(time.perf_counter() - t0)


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


def _put_labels(txn, dbs, keys) -> None:
    txn.cursor(dbs["labels"]).putmulti(zip(keys, repeat(b"")), append=True)


def _bulk_chunk(txn, dbs, s_codes, s_ids, id_sorted_ids, id_sorted_codes, meta_b, conf_h, rows):
    keys = make_keys(s_codes, s_ids)
    txn.cursor(dbs["tree"]).putmulti(zip(rows_bytes(keys), repeat(b"")), append=True)
    if id_sorted_codes is None and meta_b is None and conf_h is None:
        return  # the tree only
    idb = ids_bytes(id_sorted_ids)
    if id_sorted_codes is not None:
        txn.cursor(dbs["codes"]).putmulti(zip(idb, rows_bytes(id_sorted_codes)), append=True)
    if meta_b is not None:
        items = [(b, meta_b[r]) for b, r in zip(idb, rows) if meta_b[r] is not None]
        txn.cursor(dbs["meta"]).putmulti(items, append=True)
    if conf_h is not None:
        cr = rows_bytes(conf_h[rows].view(np.uint8).reshape(len(rows), -1))
        txn.cursor(dbs["conf"]).putmulti(zip(idb, cr), append=True)


# --------------------------------------------------------------------------------------------
# compaction
# --------------------------------------------------------------------------------------------
def compact_index(path) -> dict:
    """Rewrite the index's LMDB file without free pages (``mdb_env_copy2`` with compaction)
    and swap it in atomically; returns ``{"before": bytes, "after": bytes, "generation": g}``.

    The copy is taken while this process holds LMDB's writer lock, so no write can land
    between the copy and the swap; writers and readers that had the old file open notice the
    new one (a new ``data.mdb`` inode) and re-open it: readers on :meth:`refresh`, writers on
    their next write. The persisted derived structures are hard-linked (or copied) along.
    """
    path = Path(path).absolute()
    man = read_manifest(path)
    if is_sharded(man):
        from cbir.indexer.sharded import compact_sharded

        return compact_sharded(path)
    e = acquire_env(path / LMDB_DIR, want_write=True)
    tmp = _tmp_dir(path)
    try:
        before = (path / LMDB_DIR / "data.mdb").stat().st_size
        tmp.mkdir()
        (tmp / LMDB_DIR).mkdir()
        with e.write_lock:
            txn = e.env.begin(write=True)  # holds LMDB's writer lock across copy and swap
            try:
                gen = info(txn, e, b"generation")
                man["count"], man["generation"] = info(txn, e, b"count"), gen
                e.env.copy(str(tmp / LMDB_DIR), compact=True)
                g0 = latest_saved(path / DERIVED_DIR, gen)
                if g0 is not None:
                    _link_tree(path / DERIVED_DIR / f"g{g0}", tmp / DERIVED_DIR / f"g{g0}")
                man["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                man["index_uuid"] = uuid.uuid4().hex
                write_manifest(tmp, man)
                _publish.fsync_dir(tmp)
                _publish.publish(tmp, path, _publish.check_output(path))
            finally:
                txn.abort()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release_env(e)
    after = (path / LMDB_DIR / "data.mdb").stat().st_size
    return {"before": before, "after": after, "generation": gen, "identity": data_identity(path / LMDB_DIR)}


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
