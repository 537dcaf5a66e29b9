"""Crash-safety benchmark: ``kill -9`` during builds and during writes (issue 13's target: every
kill leaves a consistent index).

* **builds** (``--builds`` runs): a child process runs :func:`cbir.indexer.build_index` of
  ``--n`` codes (by default above ``build.OVERLAP_MIN``: its derived-structure child runs
  too) into a directory that holds an older index (every other run) or nothing, and is
  killed with SIGKILL after a random delay drawn uniformly up to 1.2x the time of an
  uninterrupted build (measured first, child start-up included). Consistent: the directory
  holds either the old index or the new one, complete (count, model hash, every item's id and
  code, lex and Hamming top-k of every search method equal brute force), or nothing where there
  was nothing; and the next build succeeds and leaves no temporary entry behind.
* **writes** (``--writes`` runs): a child opens an :class:`cbir.indexer.IndexWriter` on an index
  of ``--write-n`` codes and applies a fixed sequence of add / delete / upsert batches,
  printing the number of each batch once its call returned; it is killed after a random delay up to 1.2x the
  time of the whole sequence. Consistent: the reopened index equals, item for item, the state
  after the last batch it reported or the one after it (a batch can commit before its line is
  printed), and every search method equals brute force over that state.

Each run prints whether the kill landed mid-way (before the new index was published / fewer
batches reported than the sequence has) and the verdict; the summary counts consistent runs
of those killed mid-way. Run with nothing else on the machine:
``OMP_NUM_THREADS=1 python benchmarks/bench_crash.py --builds 20 --writes 20``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_index import gen_codes  # (this directory: the script's own)

HERE = Path(__file__).resolve()


def gen(seed: int, n: int, nbits: int) -> np.ndarray:
    """``n`` clustered codes (packed uint8) of ``nbits`` bits from ``seed`` (bench_index's
    generator: n / 50 centres, each bit flipped with probability 0.06)."""
    rng = np.random.default_rng(seed)
    return gen_codes(rng, n, nbits, rng.integers(0, 2, (max(1, n // 50), nbits), dtype=np.uint8), 0.06)


def as_model(packed: np.ndarray, ids=None) -> dict[int, bytes]:
    """id -> code bytes of the rows of ``packed`` (ids 0..n-1 unless given)."""
    ids = range(len(packed)) if ids is None else ids.tolist()
    return dict(zip(ids, (r.tobytes() for r in packed)))


def batches(seed: int, n0: int, nbits: int, count: int, size: int):
    """The write sequence: ``count`` batches of (op, ids, packed codes or None), cycling add /
    delete / upsert, over an index whose ids are 0..n0-1 at the start (deterministic)."""
    rng = np.random.default_rng(seed + 1)
    alive = np.ones(n0 + count * size, bool)
    alive[n0:] = False
    nxt = n0
    for b in range(count):
        op = ("add", "delete", "upsert")[b % 3]
        if op == "add":
            ids = np.arange(nxt, nxt + size)
            nxt += size
            alive[ids] = True
            yield op, ids, gen(seed * 1000 + b, size, nbits)
        elif op == "delete":
            ids = rng.choice(np.flatnonzero(alive), size=min(size, int(alive.sum())), replace=False)
            alive[ids] = False
            yield op, ids, None
        else:  # existing and deleted ids alike
            ids = rng.choice(nxt, size=size, replace=False)
            alive[ids] = True
            yield op, ids, gen(seed * 1000 + b, size, nbits)


def state_after(seed: int, n0: int, nbits: int, count: int, size: int, upto: int) -> dict[int, bytes]:
    """id -> code bytes after the first ``upto`` batches."""
    model = as_model(gen(seed, n0, nbits))
    for b, (op, ids, packed) in enumerate(batches(seed, n0, nbits, count, size)):
        if b >= upto:
            break
        if op == "delete":
            for i in ids.tolist():
                model.pop(i, None)
        else:
            model.update(as_model(packed, ids))
    return model


# children ---------------------------------------------------------------------------------
def child_build(out: str, seed: int, n: int, nbits: int, tag: str) -> None:
    from cbir.codes import Codes
    from cbir.indexer import build_index

    build_index(out, np.arange(n), Codes(gen(seed, n, nbits), nbits), model_hash=tag)


def child_write(out: str, seed: int, n0: int, nbits: int, count: int, size: int) -> None:
    from cbir.codes import Codes
    from cbir.indexer import IndexWriter

    with IndexWriter(out) as w:
        for b, (op, ids, packed) in enumerate(batches(seed, n0, nbits, count, size)):
            if op == "add":
                w.add(ids, Codes(packed, nbits))
            elif op == "delete":
                w.delete(ids)
            else:
                w.upsert(ids, Codes(packed, nbits))
            print(b, flush=True)


# checks -----------------------------------------------------------------------------------
def check(path: Path, model: dict[int, bytes], nbits: int, tag: str | None, rng) -> str | None:
    """None when the index at ``path`` equals ``model`` and every search path equals brute
    force; otherwise what differs."""
    from cbir.codes import Codes, rank
    from cbir.indexer import open_index

    ids = np.array(sorted(model), dtype=np.int64)
    codes = Codes.from_bytes([model[i] for i in ids.tolist()], nbits)
    with open_index(path) as r:
        if tag is not None and r.model_hash != tag:
            return f"model hash {r.model_hash!r}, expected {tag!r}"
        if r.count() != len(ids):
            return f"count {r.count()}, expected {len(ids)}"
        page = r.search_prefix("", len(ids) + 1)
        got = dict(zip(page.ids.tolist(), page.codes.to_bytes_list()))
        if got != model:
            return f"items differ ({len(set(got) ^ set(model))} ids, {sum(got.get(i) != c for i, c in model.items())} codes)"
        qbits = np.concatenate(
            [rng.integers(0, 2, (3, nbits), dtype=np.uint8), codes.to_bits()[rng.integers(0, len(ids), 3)]]
        )
        for q in Codes.from_bits(qbits):
            want = ids[rank(q, codes, 20, order="lex", ids=ids)[0]]
            if not np.array_equal(r.search_lex(q, 20).ids, want):
                return "lex top-20 differs from brute force"
            want = ids[rank(q, codes, 20, order="hamming", ids=ids)[0]]
            for m in ("mih", "faiss", "auto"):
                if not np.array_equal(r.search_hamming(q, k=20, method=m).ids, want):
                    return f"Hamming top-20 ({m}) differs from brute force"
    return None


def _spawn(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.Popen([sys.executable, str(HERE), *argv], stdout=subprocess.PIPE, text=True, env=env)


def _stale(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".ix"))


def run_builds(args, work: Path, rng) -> list[tuple[bool, str | None]]:
    from cbir.codes import Codes
    from cbir.indexer import build_index

    n, nbits = args.n, args.bits
    t0 = time.perf_counter()
    if _spawn("--_child", "build", str(work / "timing" / "ix"), "1", str(n), str(nbits), "new").wait():
        raise SystemExit("the uninterrupted build failed")
    t_build = time.perf_counter() - t0
    print(
        f"builds: an uninterrupted build of {n:,} x {nbits}-bit codes (child start-up included) takes {t_build:.2f} s"
    )
    old_n, new_seed, old_seed = n // 4, 1, 2
    old_packed, next_packed = gen(old_seed, old_n, nbits), gen(3, 10, nbits)
    new_model, old_model, next_model = as_model(gen(new_seed, n, nbits)), as_model(old_packed), as_model(next_packed)
    out = []
    for i in range(args.builds):
        parent = work / f"b{i}"
        parent.mkdir()
        ix = parent / "ix"
        with_old = i % 2 == 1
        if with_old:
            build_index(ix, np.arange(old_n), Codes(old_packed, nbits), model_hash="old")
        delay = float(rng.uniform(0.0, 1.2 * t_build))
        proc = _spawn("--_child", "build", str(ix), str(new_seed), str(n), str(nbits), "new")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid = _hash(ix) != "new"  # (killed before the new index was published)
        if not ix.exists():
            err = "the old index is gone" if with_old else None
        else:
            tag = _hash(ix)
            model = {"old": old_model, "new": new_model}.get(tag)
            err = f"unknown model hash {tag!r}" if model is None else check(ix, model, nbits, tag, rng)
        if err is None:  # the next build cleans up and succeeds
            build_index(ix, np.arange(10), Codes(next_packed, nbits), model_hash="next")
            left = _stale(parent)
            err = f"left behind after the next build: {left}" if left else check(ix, next_model, nbits, "next", rng)
        print(
            f"  build {i + 1:2d}: {'old index present, ' if with_old else ''}killed after {delay:.2f} s"
            f" ({'mid-build' if mid else 'after it finished'}): {'consistent' if err is None else 'INCONSISTENT: ' + err}",
            flush=True,
        )
        out.append((mid, err))
        shutil.rmtree(parent)
    return out


def _hash(ix: Path) -> str | None:
    from cbir.indexer import read_manifest

    try:
        return read_manifest(ix).get("model_hash")
    except (OSError, ValueError):
        return None


def run_writes(args, work: Path, rng) -> list[tuple[bool, str | None]]:
    from cbir.codes import Codes
    from cbir.indexer import build_index

    n, nbits, count, size = args.write_n, args.bits, args.batches, args.batch_size
    seed = 7
    base = work / "wbase"
    build_index(base, np.arange(n), Codes(gen(seed, n, nbits), nbits))
    timing = work / "wtiming"
    shutil.copytree(base, timing)
    t0 = time.perf_counter()
    if _spawn("--_child", "write", str(timing), str(seed), str(n), str(nbits), str(count), str(size)).wait():
        raise SystemExit("the uninterrupted write sequence failed")
    t_all = time.perf_counter() - t0
    shutil.rmtree(timing)
    print(
        f"writes: {count} batches of {size:,} (add / delete / upsert) on {n:,} codes take {t_all:.2f} s uninterrupted"
    )
    out = []
    for i in range(args.writes):
        ix = work / f"w{i}"
        shutil.copytree(base, ix)
        delay = float(rng.uniform(0.0, 1.2 * t_all))
        proc = _spawn("--_child", "write", str(ix), str(seed), str(n), str(nbits), str(count), str(size))
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True)
        reader.start()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
        done = len([x for x in lines if x.strip()])
        mid = done < count
        errs = []
        for upto in sorted({done, min(done + 1, count)}):
            err = check(ix, state_after(seed, n, nbits, count, size, upto), nbits, None, rng)
            if err is None:
                break
            errs.append(f"after {upto} batches: {err}")
        else:
            err = "; ".join(errs)
        print(
            f"  writes {i + 1:2d}: killed after {delay:.2f} s, {done} of {count} batches reported: "
            f"{'consistent' if err is None else 'INCONSISTENT: ' + err}",
            flush=True,
        )
        out.append((mid, err))
        shutil.rmtree(ix)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--builds", type=int, default=20, help="killed builds (default 20)")
    p.add_argument("--writes", type=int, default=20, help="killed write sequences (default 20)")
    p.add_argument(
        "--n",
        type=int,
        default=2_500_000,
        help="codes per build (default 2500000: above build.OVERLAP_MIN, so the derived-structure child runs too)",
    )
    p.add_argument("--write-n", type=int, default=200_000, help="codes in the written index (default 200000)")
    p.add_argument("--bits", type=int, default=32, help="code bits (default 32)")
    p.add_argument("--batches", type=int, default=12, help="batches per write sequence (default 12)")
    p.add_argument("--batch-size", type=int, default=5000, help="ids per batch (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays and query draws")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new temporary one)")
    p.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        kind, *rest = args._child
        if kind == "build":
            child_build(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), rest[4])
        else:
            child_write(rest[0], *map(int, rest[1:]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="cbir-crash-", dir=args.workdir))
    rng = np.random.default_rng(args.seed)
    try:
        print(f"# cbir crash benchmark: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, seed {args.seed}")
        res = []
        if args.builds:
            res.append(("builds", run_builds(args, work, rng)))
        if args.writes:
            res.append(("writes", run_writes(args, work, rng)))
        bad = 0
        for name, rows in res:
            mid = [e for m, e in rows if m]
            ok_mid = sum(e is None for e in mid)
            ok = sum(e is None for _m, e in rows)
            bad += len(rows) - ok
            print(
                f"{name}: {ok}/{len(rows)} consistent; killed mid-way {len(mid)}, of those {ok_mid}/{len(mid)} consistent"
            )
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
