"""The derived structures of a large bulk build, built in a child process while the building
process appends the LMDB ``tree``.

Both halves need the one sort of the build and nothing of each other, but they cannot share
one interpreter: py-lmdb releases the GIL around every single put, so a thread building the
MIH tables next to the append turns every put into a GIL hand-off (measured: slower than one
after the other). So :func:`start` saves the sorted ``head64`` (``codes`` beyond 64 bits), a
file the base needs anyway, into a staging directory under ``derived/`` and starts ``python -m
cbir.indexer.derivejob <staging> <nbits>``, which memory-maps it (page cache: no copy over a
pipe), builds the MIH tables (the longest part: counting sorts and gathers over all rows) and
saves them there. After its append the parent writes the rest (codes, ids, the id index
``sid``/``spos`` from the build's permutations, the FAISS index) while the child still runs,
then :meth:`Job.finish` waits for it and publishes the directory as ``derived/g<generation>``
exactly as :meth:`Derived.save` does (``state.json`` last). If the child fails or cannot start,
the parent builds the MIH tables itself: the same files either way.

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
import tempfile
import uuid
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DONE = ".job-done"


class Job:
    """A started derived-structure build (see :func:`start`)."""

    def __init__(self, root: Path, staging: Path, generation: int, nbits: int, proc) -> None:
        self.root, self.staging, self.generation, self.nbits = root, staging, generation, nbits
        self.proc = proc

    def kill(self) -> None:
        """Stop the child (the build failed); the staging directory goes with the build's
        temporary directory."""
        stop(self.proc)

    def finish(self, codes, ids, head64, by_id) -> Path | None:
        """Write what the child does not (while it runs: codes, head64, ids, the id index, the
        FAISS index), wait for it, build the MIH tables here if it failed, publish
        ``g<generation>`` (its path; None where it could not be written: the index then works
        without it, as after a failed :meth:`Derived.save`)."""
        from cbir.indexer.derived import FAISS_FILE, Derived, commit_saved

        st = self.staging
        d = Derived(self.generation, self.nbits, codes, ids, head64=head64)
        try:
            for name, arr in (("codes", codes), ("head64", head64), ("ids", ids)):
                if not (st / f"{name}.npy").exists():
                    np.save(st / f"{name}.npy", np.asarray(arr))
            sid, spos = by_id
            np.save(st / "sid.npy", sid)
            np.save(st / "spos.npy", spos)
            d.faiss.save(st / FAISS_FILE)
            ok = False
            if self.proc is not None:
                rc = self.proc.wait()
                ok = rc == 0 and (st / DONE).exists()
                if not ok:
                    err = getattr(self.proc, "err", None)
                    msg = b""
                    if err is not None and not err.closed:
                        err.seek(0)
                        msg = err.read()[-2000:]
                    log.debug("derived job exited with %s; building in process: %s", rc, msg.decode(errors="replace"))
                stop(self.proc)  # (closes its error file)
            (st / DONE).unlink(missing_ok=True)
            if not ok:  # the MIH tables here (the same files)
                write_mih(d.mih, st)
        except OSError as exc:  # best effort, as Derived.save: the index works without it
            log.debug("could not persist derived structures: %s", exc)
            self.kill()
            shutil.rmtree(st, ignore_errors=True)
            return None
        return commit_saved(st, self.root, self.generation, self.nbits, len(ids))


def write_mih(mih, out: Path) -> None:
    """The MIH tables: ``mih.json`` + ``mih*.npy``."""
    for name, arr in mih.arrays().items():
        np.save(out / f"{name}.npy", arr)
    (out / "mih.json").write_text(json.dumps({"m": mih.m}))


def write_accelerators(d, out: Path) -> None:
    """MIH tables and ``faiss.bin`` of Derived ``d`` into ``out``."""
    from cbir.indexer.derived import FAISS_FILE

    write_mih(d.mih, out)
    d.faiss.save(out / FAISS_FILE)


def spawn():
    """Start the child now (it imports numpy and the MIH code while the parent sorts); it waits
    on its stdin for the staging directory that :func:`start` sends. None if it cannot start."""
    try:
        err = tempfile.TemporaryFile()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cbir.indexer.derivejob"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            close_fds=True,
        )
        proc.err = err  # (read if the child fails)
        return proc
    except OSError as exc:
        log.debug("could not start the derived job: %s", exc)
        return None


def stop(proc) -> None:
    """Stop the child (if it still runs) and close its error file."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    err = getattr(proc, "err", None)
    if err is not None:
        err.close()


def start(root: Path, generation: int, nbits: int, codes, head64, proc=None) -> Job:
    """Save the sorted array the child reads into a staging directory under ``root`` and hand
    the directory to the child ``proc`` (from :func:`spawn`; None: no child, :meth:`Job.finish`
    builds the MIH tables itself)."""
    root = Path(root)
    staging = root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    # the one array the child reads (the others are written by Job.finish while it runs)
    nb = codes.shape[1]
    np.save(staging / ("head64.npy" if nb <= 8 else "codes.npy"), np.asarray(head64 if nb <= 8 else codes))
    if proc is not None:
        try:
            proc.stdin.write(f"{staging}\n{nbits}\n".encode())
            proc.stdin.close()
        except OSError as exc:  # (the child died: Job.finish finds its exit status)
            log.debug("could not hand the derived job its directory: %s", exc)
            if proc.poll() is None:
                proc.kill()
    return Job(root, staging, generation, nbits, proc)


def _child(staging: Path, nbits: int) -> int:
    from cbir.indexer.derived import _mmap
    from cbir.indexer.mih import MIH

    nb = (nbits + 7) // 8
    if nb <= 8:  # MIH reads the uint64 codes only (the byte rows: a stand-in of their shape)
        head = _mmap(staging / "head64.npy")
        codes = np.broadcast_to(np.zeros(nb, np.uint8), (len(head), nb))
        mih = MIH(codes, nbits, codes64=head)
    else:
        mih = MIH(_mmap(staging / "codes.npy"), nbits)
    write_mih(mih, staging)
    (staging / DONE).write_text("ok")
    return 0


def _main(argv: list[str]) -> int:
    if len(argv) < 2:  # started early: the staging directory comes on stdin (EOF: not needed)
        import cbir.indexer.mih  # noqa: F401  (imported while the parent sorts)

        try:
            import faiss  # noqa: F401  (its counting sort builds the tables)
        except ImportError:  # pragma: no cover
            pass
        argv = sys.stdin.read().split("\n")[:2]
        if len(argv) < 2 or not argv[0]:
            return 0
    return _child(Path(argv[0]), int(argv[1]))


if __name__ == "__main__":  # pragma: no cover (run as a child process)
    sys.exit(_main(sys.argv[1:]))
