"""Index benchmark: the targets of issue 13, every ratio measured in the same run.

Synthetic clustered 64-bit codes (like learned codes: C centres, each bit of a member flipped
with probability p; the first ``--class-bits`` bits act as class bits). For each N it builds an
index with :func:`cbir.indexer.build_index` and prints:

* **ingest**: codes/s of the whole ``build_index`` (sort + LMDB + MIH + FAISS + manifest), of
  its LMDB part alone (``manifest["build"]["lmdb_seconds"]``: from the start of the build until
  the sorted ``tree`` append is synced, i.e. validation + the one sort + the append; from
  ``build.OVERLAP_MIN`` = 2^21 items on, when the load average leaves a core free
  (``build._spare_cpu``), the MIH tables are built in a child process during the append and the
  other derived files after it, otherwise all derived structures after it), and
  of a bare py-lmdb sorted append of the same tree keys (one sub-db, already sorted and joined:
  the physical limit of a sorted append); on a 2-core machine the child and the append share
  the cores, so the build's figure depends on the machine's other load;
* **first Hamming query after open**: a fresh process opens the index and runs one exact
  Hamming top-k (derived structures are memory-mapped, nothing is scanned; the files are in
  the page cache, as after a build);
* **Hamming top-k p50** (``method="auto"`` and ``"mih"``) vs plain FAISS ``IndexBinaryFlat``
  top-k with 1 thread on the same queries (ratio = FAISS p50 / ours p50, target >= 50);
* **lex top-k p50** vs a bare py-lmdb cursor read of k keys at the query's position (ratio =
  ours / bare, target <= 3); ours is the default path (<= 64-bit codes: the sorted base,
  :mod:`cbir.indexer.lexarray`); the LMDB tree walk it falls back to is printed beside it;
* **Hamming p50 after deleting 1 %** of the items vs before (target <= 1.2), with the time of
  the delete and of the vectorised change-log replay; measured twice: before and after in
  sequence (as always), and alternately query by query against a second reader left on the
  snapshot before the delete (the load of a shared machine drifts between the first two);
* **hybrid top-k p50** vs lex (target <= 2);
* lex paging: a page at depth ``--deep`` by ``cursor`` vs by ``offset``; batch Hamming through
  one FAISS call vs a loop of single queries (equal when pinned to one core).

The steady-state latencies are measured after ``IndexReader.preload`` (as ``cbir serve`` does
before SERVING: pages faulted in, the compiled search loops loaded) and one warm pass over the
Hamming queries;
``auto`` and ``mih`` are timed alternately query by query (the same cache state for both).

``--shards S``: instead of the above, build one index and an S-shard index
(:func:`cbir.indexer.build_sharded_index`, S a power of two) from the same codes and print lex
top-k and Hamming top-k p50 of both, timed alternately query by query after one warm pass, with
the ratio sharded / one (issue 14's target: lex <= 1.5x on S = 4); the two answer the same ids
(checked on every timed query). FAISS (and torch, if loaded) run 1 thread.

Single-thread latency: run pinned, e.g. ``OMP_NUM_THREADS=1 taskset -c 1 python
benchmarks/bench_index.py --sizes 1e7``; FAISS threads are set by the index itself (1 per
single query), the baseline is called with 1 thread.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import islice, repeat
from pathlib import Path

import numpy as np


def gen_codes(rng, n: int, nbits: int, centres, p: float, chunk=1 << 18):
    """Packed uint8 (n, ceil(B/8)) clustered codes: a random centre, each bit flipped w.p. p."""
    out = np.empty((n, (nbits + 7) // 8), dtype=np.uint8)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        bits = centres[rng.integers(0, len(centres), m)]
        bits ^= (rng.random((m, nbits), dtype=np.float32) < p).astype(np.uint8)
        out[s : s + m] = np.packbits(bits, axis=1, bitorder="big")
    return out


def p50(ts) -> float:
    return float(np.percentile(np.asarray(ts, dtype=np.float64), 50)) / 1e3  # ns -> us


def timeit_pair(fa, fb, qs) -> tuple[list[int], list[int]]:
    """Two methods timed alternately on every query (same cache state for both)."""
    ta, tb = [], []
    pc = time.perf_counter_ns
    for q in qs:
        t0 = pc()
        fa(q)
        t1 = pc()
        fb(q)
        ta.append(t1 - t0)
        tb.append(pc() - t1)
    return ta, tb


def timeit(fn, qs, warm: int = 2) -> list[int]:
    for q in qs[:warm]:
        fn(q)
    ts = []
    pc = time.perf_counter_ns
    for q in qs:
        t0 = pc()
        fn(q)
        ts.append(pc() - t0)
    return ts


def dir_bytes(p: Path) -> int:
    tot = 0
    for root, _d, files in os.walk(p):
        for f in files:
            tot += os.stat(os.path.join(root, f)).st_blocks * 512
    return tot


def bare_append(keys: np.ndarray, path: Path) -> float:
    """Seconds for a bare py-lmdb sorted append of ``keys`` into one sub-db."""
    import lmdb

    path.mkdir()
    env = lmdb.open(
        str(path), map_size=max(64 << 20, keys.size * 4), writemap=True, sync=False, metasync=False, max_dbs=2
    )
    db = env.open_db(b"tree")
    t0 = time.perf_counter()
    rows = np.ascontiguousarray(keys).view(f"V{keys.shape[1]}").reshape(-1)
    for s in range(0, len(rows), 1 << 18):
        with env.begin(write=True) as txn:
            txn.cursor(db).putmulti(zip(rows[s : s + (1 << 18)].tolist(), repeat(b"")), append=True)
    env.sync(True)
    dt = time.perf_counter() - t0
    env.close()
    shutil.rmtree(path, ignore_errors=True)
    return dt


_FIRST_QUERY = r"""
import sys, time, json
import numpy as np
from cbir.indexer import open_index
q = bytes.fromhex(sys.argv[2]); k = int(sys.argv[3])
t0 = time.perf_counter()
r = open_index(sys.argv[1])
t1 = time.perf_counter()
res = r.search_hamming(q, k=k)
t2 = time.perf_counter()
res2 = r.search_hamming(q, k=k)
t3 = time.perf_counter()
print(json.dumps({"open_ms": 1e3 * (t1 - t0), "first_ms": 1e3 * (t2 - t1), "second_ms": 1e3 * (t3 - t2),
                  "n": len(res)}))
"""


def run_one(args, n: int, workdir: Path) -> dict:
    from cbir.codes import CodeLayout, Codes
    from cbir.indexer import IndexWriter, build_index, open_index
    from cbir.indexer.faissidx import FaissBinary
    from cbir.indexer.rows import key_order, make_keys

    nbits, k = args.bits, args.k
    rng = np.random.default_rng(args.seed)
    centres = rng.integers(0, 2, (args.centres, nbits), dtype=np.uint8)
    packed = gen_codes(rng, n, nbits, centres, args.flip)
    qpacked = gen_codes(rng, args.queries, nbits, centres, args.flip)
    ids = np.arange(n, dtype=np.int64)
    row: dict = {"n": n, "nbits": nbits, "k": k}
    # ingest -------------------------------------------------------------------------------
    order = key_order(packed, ids, ids_sorted=True)
    row["bare_append_codes_per_s"] = n / bare_append(make_keys(packed[order], ids[order]), workdir / "bare")
    del order
    gc.collect()
    out = workdir / f"ix_{n}"
    t0 = time.perf_counter()
    build_index(out, ids, Codes(packed, nbits), layout=CodeLayout(nbits=nbits, class_bits=args.class_bits))
    tb = time.perf_counter() - t0
    man = json.loads((out / "manifest.json").read_text())
    row["build_codes_per_s"] = n / tb
    row["lmdb_codes_per_s"] = n / man["build"]["lmdb_seconds"]
    row["disk_bytes_per_item"] = dir_bytes(out) / n
    row["lmdb_bytes_per_item"] = dir_bytes(out / "lmdb") / n
    # first Hamming query after open (fresh process) -------------------------------------------
    env = dict(os.environ, OMP_NUM_THREADS="1")
    fq = subprocess.run(
        [sys.executable, "-c", _FIRST_QUERY, str(out), qpacked[0].tobytes().hex(), str(k)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    row.update({f"first_{key}": v for key, v in json.loads(fq.stdout.strip().splitlines()[-1]).items()})
    # latencies ----------------------------------------------------------------------------------
    qs = [qpacked[i].tobytes() for i in range(len(qpacked))]
    hq = qs[: args.hamming_queries]
    r = open_index(out)
    r.preload()  # steady state: pages faulted in, the compiled search loops loaded (a server does this)
    v = r.derived()
    fx = FaissBinary(np.asarray(v.base.codes), use_gpu=False)
    qa = [np.frombuffer(q, np.uint8) for q in hq]
    row["faiss1_p50_us"] = p50(timeit(lambda q: fx.knn_raw(q, k, threads=1), qa))
    for q in hq:  # warm: the memory-mapped tables' pages these queries touch are faulted in once
        r.search_hamming(q, k=k, method="mih")
        r.search_hybrid(q, k)
    ta, tm = timeit_pair(lambda q: r.search_hamming(q, k=k), lambda q: r.search_hamming(q, k=k, method="mih"), hq)
    row["ham_auto_p50_us"], row["ham_mih_p50_us"] = p50(ta), p50(tm)
    row["lex_p50_us"] = p50(timeit(lambda q: r.search_lex(q, k), qs))
    r.LEX_FROM_BASE = False  # the LMDB tree walk (B > 64, cursors, no cheap view)
    row["lex_tree_p50_us"] = p50(timeit(lambda q: r.search_lex(q, k), qs))
    r.LEX_FROM_BASE = True
    tree = r._env.dbs["tree"]
    with r._env.env.begin(buffers=False) as txn:

        def bare(q):
            cur = txn.cursor(tree)
            cur.set_range(q + b"\0" * 8)
            return b"".join(islice(cur.iternext(values=False), k))

        row["bare_read_p50_us"] = p50(timeit(bare, qs))
    row["hybrid_p50_us"] = p50(timeit(lambda q: r.search_hybrid(q, k), hq))
    # paging at depth
    deep = row["deep"] = min(args.deep, n - k)
    q0 = qs[0]
    t0 = time.perf_counter()
    cur = ""
    got = 0
    while got < deep:
        res = r.search_lex(q0, min(1000, deep - got), cursor=cur)
        got += len(res)
        cur = res.next_cursor
    row["cursor_walk_to_deep_s"] = time.perf_counter() - t0
    row["lex_cursor_page_p50_us"] = p50(timeit(lambda c: r.search_lex(q0, k, cursor=c), [cur] * 20))
    row["lex_offset_page_p50_us"] = p50(timeit(lambda c: r.search_lex(q0, k, offset=deep), [0] * 5, warm=1))
    # batch: one FAISS call vs a loop
    Q = Codes(qpacked[: args.hamming_queries], nbits)
    t0 = time.perf_counter()
    r.search_hamming_batch(Q, k=k, method="faiss")
    row["batch_faiss_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for q in hq:
        r.search_hamming(q, k=k, method="faiss")
    row["loop_faiss_s"] = time.perf_counter() - t0
    # deletes: 1 % (the "before" figures measured again right here, next to the "after" ones)
    for q in hq:  # the FAISS timings above flushed the caches: warm again
        r.search_hamming(q, k=k, method="mih")
    ta, tm = timeit_pair(lambda q: r.search_hamming(q, k=k), lambda q: r.search_hamming(q, k=k, method="mih"), hq)
    row["ham_auto_pre_p50_us"], row["ham_mih_pre_p50_us"] = p50(ta), p50(tm)
    victims = np.random.default_rng(1).choice(n, size=n // 100, replace=False)
    pre = open_index(out)  # a second reader left on the snapshot before the delete
    pre.preload()  # (its compiled search loops too, as the first reader's)
    t0 = time.perf_counter()
    with IndexWriter(out) as w:
        w.delete(victims)
    row["delete_1pct_s"] = time.perf_counter() - t0
    r.refresh()
    t0 = time.perf_counter()
    v2 = r.derived()
    row["replay_s"] = time.perf_counter() - t0
    row["replayed"] = v2.base.generation == v.base.generation and len(v2.deleted) == len(victims)
    for q in hq:
        r.search_hamming(q, k=k, method="mih")
    ta, tm = timeit_pair(lambda q: r.search_hamming(q, k=k), lambda q: r.search_hamming(q, k=k, method="mih"), hq)
    row["ham_auto_del_p50_us"], row["ham_mih_del_p50_us"] = p50(ta), p50(tm)
    # the same, timed alternately query by query against the reader still on the snapshot
    # before the delete (same moment, same cache state: the machine's load drifts between the
    # two sequential measurements above)
    for q in hq:
        pre.search_hamming(q, k=k)
    tb, ta = timeit_pair(lambda q: pre.search_hamming(q, k=k), lambda q: r.search_hamming(q, k=k), hq)
    row["ham_auto_alt_pre_p50_us"], row["ham_auto_alt_del_p50_us"] = p50(tb), p50(ta)
    pre.close()
    r.close()
    gc.collect()
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def pin_threads() -> None:
    """One thread for FAISS (OpenMP) and torch, whatever the environment says."""
    import faiss

    faiss.omp_set_num_threads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def run_shards(args, n: int, workdir: Path) -> dict:
    """One index vs an ``args.shards``-shard index of the same codes: lex and Hamming top-k p50."""
    from cbir.codes import CodeLayout, Codes
    from cbir.indexer import build_index, build_sharded_index, open_index

    nbits, k, S = args.bits, args.k, args.shards
    rng = np.random.default_rng(args.seed)
    centres = rng.integers(0, 2, (args.centres, nbits), dtype=np.uint8)
    codes = Codes(gen_codes(rng, n, nbits, centres, args.flip), nbits)
    qpacked = gen_codes(rng, args.queries, nbits, centres, args.flip)
    ids = np.arange(n, dtype=np.int64)
    layout = CodeLayout(nbits=nbits, class_bits=args.class_bits)
    row: dict = {"n": n, "nbits": nbits, "k": k, "shards": S}
    one_dir, sh_dir = workdir / f"one_{n}", workdir / f"sharded{S}_{n}"
    t0 = time.perf_counter()
    build_index(one_dir, ids, codes, layout=layout)
    row["build_one_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_sharded_index(sh_dir, ids, codes, S, layout=layout)
    row["build_sharded_s"] = time.perf_counter() - t0
    one, sh = open_index(one_dir), open_index(sh_dir)
    qs = [qpacked[i].tobytes() for i in range(len(qpacked))]
    hq = qs[: args.hamming_queries]
    mismatches = 0
    for q in qs:  # warm pass (pages faulted in, derived structures loaded) and the equality check
        mismatches += not np.array_equal(one.search_lex(q, k).ids, sh.search_lex(q, k).ids)
    for q in hq:
        mismatches += not np.array_equal(one.search_hamming(q, k=k).ids, sh.search_hamming(q, k=k).ids)
    row["mismatches"] = mismatches
    ta, tb = timeit_pair(lambda q: one.search_lex(q, k), lambda q: sh.search_lex(q, k), qs)
    row["lex_one_p50_us"], row["lex_sharded_p50_us"] = p50(ta), p50(tb)
    ta, tb = timeit_pair(lambda q: one.search_hamming(q, k=k), lambda q: sh.search_hamming(q, k=k), hq)
    row["ham_one_p50_us"], row["ham_sharded_p50_us"] = p50(ta), p50(tb)
    one.close()
    sh.close()
    gc.collect()
    if not args.keep:
        shutil.rmtree(one_dir, ignore_errors=True)
        shutil.rmtree(sh_dir, ignore_errors=True)
    return row


def report_shards(row: dict) -> str:
    x, S, k = row, row["shards"], row["k"]
    lex, ham = x["lex_sharded_p50_us"] / x["lex_one_p50_us"], x["ham_sharded_p50_us"] / x["ham_one_p50_us"]
    return "\n".join(
        [
            f"N={x['n']:,} B={x['nbits']} k={k} (clustered codes): one index vs {S} shards "
            f"(build {x['build_one_s']:.1f} s / {x['build_sharded_s']:.1f} s; {x['mismatches']} queries answered differently)",
            (
                f"  lex top-{k} p50: one {x['lex_one_p50_us']:.0f} us, {S} shards {x['lex_sharded_p50_us']:.0f} us -> "
                f"{lex:.2f}x  [target <= 1.5x on S = 4: {'met' if lex <= 1.5 else 'NOT met'}]"
            ),
            (
                f"  Hamming top-{k} p50: one {x['ham_one_p50_us']:.0f} us, {S} shards {x['ham_sharded_p50_us']:.0f} us "
                f"-> {ham:.2f}x"
            ),
        ]
    )


def report(row: dict) -> str:
    x = row
    lines = [
        f"N={x['n']:,} B={x['nbits']} k={x['k']} (clustered codes)",
        (
            f"  ingest: build_index {x['build_codes_per_s'] / 1e6:.2f} M codes/s (all: LMDB + MIH + FAISS), "
            f"LMDB part (sort + append) {x['lmdb_codes_per_s'] / 1e6:.2f} M/s, bare py-lmdb append {x['bare_append_codes_per_s'] / 1e6:.2f} M/s"
            f"  [target >= 3 M/s]"
        ),
        f"  disk: {x['disk_bytes_per_item']:.1f} B/item ({x['lmdb_bytes_per_item']:.1f} LMDB)",
        (
            f"  first Hamming query after open: {x['first_first_ms']:.1f} ms (open {x['first_open_ms']:.1f} ms, "
            f"second query {x['first_second_ms']:.1f} ms)  [target <= 50 ms]"
        ),
        (
            f"  Hamming top-{x['k']} p50: auto {x['ham_auto_p50_us']:.0f} us, mih {x['ham_mih_p50_us']:.0f} us, "
            f"FAISS flat 1 thread {x['faiss1_p50_us']:.0f} us -> {x['faiss1_p50_us'] / x['ham_auto_p50_us']:.1f}x "
            f"(mih {x['faiss1_p50_us'] / x['ham_mih_p50_us']:.1f}x)  [target >= 50x]"
        ),
        (
            f"  lex top-{x['k']} p50: {x['lex_p50_us']:.0f} us vs bare cursor read {x['bare_read_p50_us']:.0f} us -> "
            f"{x['lex_p50_us'] / x['bare_read_p50_us']:.2f}x  [target <= 3x]; the LMDB tree walk "
            f"{x['lex_tree_p50_us']:.0f} us ({x['lex_tree_p50_us'] / x['bare_read_p50_us']:.2f}x)"
        ),
        (
            f"  after deleting 1 % (delete {x['delete_1pct_s']:.2f} s, replay {x['replay_s'] * 1e3:.0f} ms, "
            f"replayed={x['replayed']}): Hamming p50 auto {x['ham_auto_del_p50_us']:.0f} us "
            f"({x['ham_auto_del_p50_us'] / x['ham_auto_pre_p50_us']:.2f}x the {x['ham_auto_pre_p50_us']:.0f} us just "
            f"before), mih {x['ham_mih_del_p50_us']:.0f} us ({x['ham_mih_del_p50_us'] / x['ham_mih_pre_p50_us']:.2f}x)"
            f"  [target <= 1.2x]; timed alternately with a reader on the snapshot before the delete: "
            f"auto {x['ham_auto_alt_del_p50_us']:.0f} us vs {x['ham_auto_alt_pre_p50_us']:.0f} us -> "
            f"{x['ham_auto_alt_del_p50_us'] / x['ham_auto_alt_pre_p50_us']:.2f}x"
        ),
        (
            f"  hybrid top-{x['k']} p50: {x['hybrid_p50_us']:.0f} us -> {x['hybrid_p50_us'] / x['lex_p50_us']:.2f}x lex"
            f"  [target <= 2x]"
        ),
        (
            f"  lex page at depth {x['deep']}: cursor {x['lex_cursor_page_p50_us']:.0f} us vs offset "
            f"{x['lex_offset_page_p50_us']:.0f} us"
        ),
        f"  batch Hamming (FAISS): one call {x['batch_faiss_s'] * 1e3:.0f} ms vs loop {x['loop_faiss_s'] * 1e3:.0f} ms",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6])
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--class-bits", type=int, default=2)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--queries", type=int, default=1000, help="lex queries")
    ap.add_argument("--hamming-queries", type=int, default=200)
    ap.add_argument("--deep", type=int, default=100_000, help="depth of the paging test")
    ap.add_argument("--centres", type=int, default=4096, help="clusters of the codes")
    ap.add_argument("--flip", type=float, default=0.05, help="bit-flip probability")
    ap.add_argument("--workdir", default=None, help="where indexes are built (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the built indexes")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--shards",
        type=int,
        default=None,
        metavar="S",
        help="compare one index with an S-shard index (S a power of two >= 2) instead of the full run",
    )
    args = ap.parse_args(argv)
    if args.shards is not None and (args.shards < 2 or args.shards & (args.shards - 1)):
        ap.error(f"--shards must be a power of two >= 2, got {args.shards}")

    import faiss

    pin_threads()

    sizes = [int(s) for s in args.sizes]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_index_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        aff = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        aff = []
    print(
        f"# cbir index benchmark: cpus allowed {aff}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"FAISS threads {faiss.omp_get_max_threads()}, gpus={faiss.get_num_gpus()}, {args.queries} lex / {args.hamming_queries} Hamming queries",
        flush=True,
    )
    rows = []
    try:
        for n in sizes:
            t0 = time.perf_counter()
            row = run_shards(args, n, workdir) if args.shards else run_one(args, n, workdir)
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            text = report_shards(row) if args.shards else report(row)
            print(text + f"\n  (wall {row['wall_s']:.0f} s)", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
