"""The derived structures of a large bulk build, built in a child process while the building
process appends the LMDB ``tree``.

Both halves need the one sort of the build and nothing of each other, but they cannot share
one interpreter: py-lmdb releases the GIL around every single put, so a thread building the
MIH tables next to the append turns every put into a GIL hand-off (measured: slower than one
after the other). So :func:`start` saves the sorted ``codes``/``ids``/``head64`` (files the base
needs anyway) into a staging directory under ``derived/`` and starts ``python -m
cbir.indexer.derivejob <staging> <nbits>``, which memory-maps them (page cache: no copy over a
pipe), builds the MIH tables and the FAISS index and saves them there. :meth:`Job.finish`
waits for it, adds the id index (``sid``/``spos``, from the build's permutations) and publishes
the directory as ``derived/g<generation>`` exactly as :meth:`Derived.save` does (``state.json``
last). If the child fails or cannot start, the parent builds the missing structures itself:
the result is the same files either way.

The staging directory lives inside the build's temporary directory, so an interrupted build
removes (or leaves for the next build to remove) everything the child wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DONE = ".job-done"
LOG = ".job.log"


class Job:
    """A started derived-structure build (see :func:`start`)."""

    def __init__(self, root: Path, staging: Path, generation: int, nbits: int, proc) -> None:
        self.root, self.staging, self.generation, self.nbits = root, staging, generation, nbits
        self.proc = proc

    def kill(self) -> None:
        """Stop the child (the build failed); the staging directory goes with the build's."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def finish(self, codes, ids, head64, by_id) -> Path | None:
        """Wait for the child, complete what it did not write, publish ``g<generation>`` (its
        path; None where it could not be written: the index then works without it)."""
        from cbir.indexer.derived import Derived, commit_saved

        ok = False
        if self.proc is not None:
            rc = self.proc.wait()
            ok = rc == 0 and (self.staging / DONE).exists()
            if not ok:
                err = (self.staging / LOG).read_bytes()[-2000:].decode(errors="replace")
                log.debug("derived job exited with %s; building in process: %s", rc, err)
        try:
            (self.staging / LOG).unlink(missing_ok=True)
            if not ok:  # build MIH + FAISS here (the same files)
                for name, arr in (("codes", codes), ("head64", head64)):
                    if not (self.staging / f"{name}.npy").exists():
                        np.save(self.staging / f"{name}.npy", np.asarray(arr))
                d = Derived(self.generation, self.nbits, codes, ids, head64=head64)
                write_accelerators(d, self.staging)
            (self.staging / DONE).unlink(missing_ok=True)
            np.save(self.staging / "ids.npy", np.asarray(ids))
            sid, spos = by_id
            np.save(self.staging / "sid.npy", sid)
            np.save(self.staging / "spos.npy", spos)
        except OSError as exc:  # best effort, as Derived.save: the index works without it
            log.debug("could not persist derived structures: %s", exc)
            shutil.rmtree(self.staging, ignore_errors=True)
            return None
        return commit_saved(self.staging, self.root, self.generation, self.nbits, len(ids))


def write_accelerators(d, out: Path) -> None:
    """MIH tables (``mih.json`` + ``mih*.npy``) and ``faiss.bin`` of Derived ``d`` into ``out``."""
    from cbir.indexer.derived import FAISS_FILE

    mih = d.mih
    for name, arr in mih.arrays().items():
        np.save(out / f"{name}.npy", arr)
    (out / "mih.json").write_text(json.dumps({"m": mih.m}))
    d.faiss.save(out / FAISS_FILE)


def start(root: Path, generation: int, nbits: int, codes, ids, head64, spawn: bool = True) -> Job:
    """Save the sorted base arrays into a staging directory under ``root`` and start the child
    that builds the accelerators from them (``spawn=False``: no child, :meth:`Job.finish`
    builds them)."""
    root = Path(root)
    staging = root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    # one array for the child (the other is a function of it, written there); the ids later
    nb = codes.shape[1]
    np.save(staging / ("head64.npy" if nb <= 8 else "codes.npy"), np.asarray(head64 if nb <= 8 else codes))
    proc = None
    if spawn:
        try:
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", "1")
            with open(staging / LOG, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "cbir.indexer.derivejob", str(staging), str(nbits)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=env,
                    close_fds=True,
                )
        except OSError as exc:
            log.debug("could not start the derived job: %s", exc)
            proc = None
    return Job(root, staging, generation, nbits, proc)


def _child(staging: Path, nbits: int) -> int:
    from cbir.indexer.derived import Derived, _mmap
    from cbir.indexer.rows import head64 as _head64

    nb = (nbits + 7) // 8
    if nb <= 8:
        head = _mmap(staging / "head64.npy")
        be = head.astype(">u8").view(np.uint8).reshape(len(head), 8)
        codes = be if nb == 8 else np.ascontiguousarray(be[:, :nb])
        np.save(staging / "codes.npy", codes)
    else:
        codes = _mmap(staging / "codes.npy")
        head = _head64(codes)
        np.save(staging / "head64.npy", head)
    ids = np.zeros(len(codes), np.int64)  # (not used by MIH or FAISS; the parent saves the ids)
    write_accelerators(Derived(0, nbits, codes, ids, head64=head), staging)
    (staging / DONE).write_text("ok")
    return 0


if __name__ == "__main__":  # pragma: no cover (run as a child process)
    sys.exit(_child(Path(sys.argv[1]), int(sys.argv[2])))
