"""Putting a freshly built index in place without losing anything that cbir did not write.

A build writes a complete index into a temporary sibling directory and then *publishes* it at
the user's ``--out`` path. What may be replaced there is decided here, once:

* nothing there, or an empty directory: the temporary directory is renamed onto it;
* a cbir index (plain or sharded) and nothing else (:func:`foreign_entries` is empty): the two directories are
  exchanged atomically (``renameat2(RENAME_EXCHANGE)``, so there is no moment in which the
  path is absent; a plain two-rename swap where the kernel or file system lacks it) and the
  old index, now in the temporary directory, is removed;
* anything else (a folder of photos, a file, an index with the user's own files in it):
  refused with :class:`OutputExistsError` unless ``force``; with ``force`` only the entries a
  cbir index consists of (``manifest.json``, ``lmdb/``, ``derived/``, ``shards/``) are replaced, the
  manifest last, and every other file stays where it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path

MANIFEST = "manifest.json"
LMDB_DIR = "lmdb"
DERIVED_DIR = "derived"
#: a sharded index (:mod:`cbir.indexer.sharded`): ``shards/<NNNN>/``, each a complete index
SHARDS_DIR = "shards"
FORMAT = "cbir-index"
#: the top-level entries of an index (manifest.json last: it marks a complete index)
INDEX_ENTRIES = (LMDB_DIR, DERIVED_DIR, SHARDS_DIR, MANIFEST)
_LMDB_FILES = {"data.mdb", "lock.mdb"}
_DERIVED_RE = re.compile(r"^(g\d+|\.tmp-\d+-[0-9a-f]+)$")
_MANIFEST_TMP_RE = re.compile(r"^\.manifest\.json\.[0-9a-f]+$")
#: a shard directory, or cbir's temporary/old name of one (build_index inside a sharded build)
_SHARD_RE = re.compile(r"^(\d{4}|\.\d{4}\.(tmp|old)-\d+-[0-9a-f]+)$")


class OutputExistsError(FileExistsError):
    """``--out`` holds something that is not (only) a cbir index."""


def foreign_entries(path: Path) -> list[str]:
    """Entries under the directory ``path`` that are not part of a cbir index (relative paths).

    An index is ``manifest.json`` (format ``cbir-index``), ``lmdb/{data,lock}.mdb`` and
    ``derived/g<N>`` (plus cbir's own temporary names); a sharded index is ``manifest.json``
    and ``shards/<NNNN>/``, each of them an index. Empty list = only index contents.
    """
    out: list[str] = []
    for e in sorted(os.listdir(path)):
        p = path / e
        if e == MANIFEST:
            if not _is_manifest(p):
                out.append(e)
        elif e == LMDB_DIR and p.is_dir() and not p.is_symlink():
            out += [f"{e}/{x}" for x in sorted(os.listdir(p)) if x not in _LMDB_FILES]
        elif e == DERIVED_DIR and p.is_dir() and not p.is_symlink():
            out += [f"{e}/{x}" for x in sorted(os.listdir(p)) if not _DERIVED_RE.match(x)]
        elif e == SHARDS_DIR and p.is_dir() and not p.is_symlink():
            for x in sorted(os.listdir(p)):
                sp = p / x
                if _SHARD_RE.match(x) and sp.is_dir() and not sp.is_symlink():
                    out += [f"{e}/{x}/{y}" for y in foreign_entries(sp)]
                else:
                    out.append(f"{e}/{x}")
        elif not _MANIFEST_TMP_RE.match(e):
            out.append(e)
    return out


def _is_manifest(p: Path) -> bool:
    try:
        return p.is_file() and json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_index(path: Path) -> bool:
    """``path`` is a directory holding a cbir index manifest."""
    return Path(path).is_dir() and _is_manifest(Path(path) / MANIFEST)


def check_output(out: Path, force: bool = False) -> str:
    """How ``publish`` will treat ``out``: ``"new"``, ``"empty"``, ``"index"`` or ``"merge"``.

    Raises :class:`OutputExistsError` when ``out`` holds anything that is not part of a cbir
    index and ``force`` is false, or when even ``force`` could not proceed without removing a
    file cbir did not write (``out`` is a file, or ``out/lmdb`` holds other files).
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return "new"
    if out.is_symlink() or not out.is_dir():
        raise OutputExistsError(
            f"--out {out} exists and is not a directory; cbir will not replace it: choose another --out"
        )
    entries = os.listdir(out)
    if not entries:
        return "empty"
    foreign = foreign_entries(out)
    if not foreign and is_index(out):
        return "index"
    if not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"--out {out} exists and is not a cbir index (it holds {shown}); cbir only replaces "
            "its own indexes. Choose a new or empty directory, or pass --force to write the "
            "index into it (only manifest.json, lmdb/, derived/ and shards/ are then replaced; every "
            "other file stays)"
        )
    blocked = [f for f in foreign if "/" in f or f in INDEX_ENTRIES]
    if blocked:
        raise OutputExistsError(
            f"--out {out}: {', '.join(blocked[:5])} would be overwritten but "
            "was not written by cbir; move it away first"
        )
    return "merge"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directories ``a`` and ``b``; False where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def fsync_dir(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_index(path: Path) -> None:
    """Remove a directory only if it holds nothing but cbir index contents."""
    path = Path(path)
    if not path.exists():
        return
    if foreign_entries(path):
        raise OutputExistsError(f"{path} holds files cbir did not write; not removing it")
    shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, out: Path, mode: str) -> None:
    """Put the complete index in ``tmp`` at ``out`` (``mode`` from :func:`check_output`)."""
    parent = out.parent
    if mode in ("new", "empty"):
        os.rename(tmp, out)  # rename(2) replaces an empty directory atomically
    elif mode == "index":
        if exchange(tmp, out):
            fsync_dir(parent)
            remove_index(tmp)  # tmp now holds the old index
        else:
            old = parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            remove_index(old)
    elif mode == "merge":
        old = parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        old.mkdir()
        if (out / MANIFEST).exists():
            os.rename(out / MANIFEST, old / MANIFEST)  # first: the index is now incomplete
        for name in INDEX_ENTRIES:
            if (out / name).exists():
                os.rename(out / name, old / name)
            if (tmp / name).exists():
                os.rename(tmp / name, out / name)
        fsync_dir(out)
        remove_index(old)
        shutil.rmtree(tmp, ignore_errors=True)  # emptied above: only cbir's temp dir
    else:  # pragma: no cover
        raise ValueError(mode)
    fsync_dir(parent)


def cleanup_stale(parent: Path, name: str, out: Path, pid_alive) -> None:
    """Remove temp dirs of dead builders; restore ``out`` if a two-rename swap was interrupted.

    Only directories with cbir's own temporary names that hold nothing but index contents are
    removed.
    """
    for p in parent.glob(f".{name}.tmp-*"):
        try:
            pid = int(p.name.split(".tmp-")[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if not pid_alive(pid) and p.is_dir() and not foreign_entries(p):
            shutil.rmtree(p, ignore_errors=True)
    for p in parent.glob(f".{name}.old-*"):
        if not p.is_dir() or foreign_entries(p):
            continue
        if not out.exists() and is_index(p):
            os.rename(p, out)  # interrupted between the two renames: put the old index back
        else:
            shutil.rmtree(p, ignore_errors=True)


def inside(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or lies under it (after resolving symlinks)."""
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
        return True
    except ValueError:
        return False
