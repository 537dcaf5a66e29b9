"""Index benchmark: ingest rate, search_lex / exact Hamming latency vs FAISS flat, disk bytes.

Synthetic codes, uniform or clustered (like learned codes: C centres, each bit of a member
flipped with probability p), at N = 1e5, 1e6, 1e7 (``--max-n`` limits) and B = 16, 64. For
every (distribution, B, N) it builds an index with :func:`cbir.indexer.build_index` and
measures, on the same queries drawn from the data distribution:

* ingest rate: codes / second of ``build_index`` (sort + LMDB append + manifest + derived);
* ``search_lex`` top-k p50/p99 (public API, results included);
* exact Hamming top-k through ``search_hamming(method="mih")`` and ``method="auto"``;
* FAISS ``IndexBinaryFlat`` top-k p50/p99 (plain FAISS search, no tie completion), measured
  in the same run, and the ratios FAISS p50 / ours p50;
* disk bytes per item (allocated blocks of LMDB, and LMDB + persisted derived arrays).

Example: ``python benchmarks/bench_index.py --max-n 1000000 --out runs/bench_index.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def gen_codes(rng, n: int, nbits: int, dist: str, centres=None, p: float = 0.05, chunk=1 << 18):
    """Packed uint8 (n, ceil(B/8)) codes; clustered codes flip each bit of a centre w.p. p."""
    out = np.empty((n, (nbits + 7) // 8), dtype=np.uint8)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        if dist == "uniform":
            bits = rng.integers(0, 2, (m, nbits), dtype=np.uint8)
        else:
            bits = centres[rng.integers(0, len(centres), m)]
            bits ^= (rng.random((m, nbits), dtype=np.float32) < p).astype(np.uint8)
        out[s : s + m] = np.packbits(bits, axis=1, bitorder="big")
    return out


def pct(ts) -> tuple[float, float]:
    a = np.asarray(ts, dtype=np.float64) / 1e3  # ns -> us
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def timeit(fn, qs) -> list[int]:
    fn(qs[0])  # warm-up
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


def run_one(args, dist: str, nbits: int, n: int, workdir: Path, seed: int) -> dict:
    import faiss

    from cbir.codes import CodeLayout, Codes
    from cbir.indexer import build_index, open_index

    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2, (args.centres, nbits), dtype=np.uint8) if dist == "clustered" else None
    t0 = time.perf_counter()
    packed = gen_codes(rng, n, nbits, dist, centres, args.flip)
    qpacked = gen_codes(rng, args.queries, nbits, dist, centres, args.flip)
    tgen = time.perf_counter() - t0
    codes = Codes(packed, nbits)
    ids = np.arange(n, dtype=np.int64)
    out = workdir / f"ix_{dist}_{nbits}_{n}"
    t0 = time.perf_counter()
    build_index(out, ids, codes, layout=CodeLayout(nbits=nbits), build_params={"bench": True})
    tbuild = time.perf_counter() - t0
    del codes
    gc.collect()
    lmdb_b = dir_bytes(out / "lmdb")
    all_b = dir_bytes(out)
    row = {"dist": dist, "nbits": nbits, "n": n, "gen_s": round(tgen, 2), "build_s": round(tbuild, 2),
           "ingest_codes_per_s": n / tbuild, "lmdb_bytes_per_item": lmdb_b / n,
           "disk_bytes_per_item": all_b / n}
    r = open_index(out)
    qs = [qpacked[i].tobytes() for i in range(len(qpacked))]
    k = args.k
    ts = timeit(lambda q: r.search_lex(q, k), qs)
    row["lex_p50_us"], row["lex_p99_us"] = pct(ts)
    # derived structures (MIH + FAISS) -- built once per generation, timed separately
    t0 = time.perf_counter()
    d = r.derived().base
    _ = d.mih
    row["mih_ready_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    fx = d.faiss
    row["faiss_ready_s"] = round(time.perf_counter() - t0, 2)
    hq = qs[: args.hamming_queries]
    qarr = [np.frombuffer(q, dtype=np.uint8) for q in hq]
    ts = timeit(lambda q: fx.knn_raw(q, k), qarr)
    row["faiss_p50_us"], row["faiss_p99_us"] = pct(ts)
    ts = timeit(lambda q: r.search_hamming(q, k=k, method="mih"), hq)
    row["mih_p50_us"], row["mih_p99_us"] = pct(ts)
    ts = timeit(lambda q: r.search_hamming(q, k=k, method="auto"), hq)
    row["ham_auto_p50_us"], row["ham_auto_p99_us"] = pct(ts)
    # the lexicographic search against FAISS on the same (first hamming_queries) queries
    ts = timeit(lambda q: r.search_lex(q, k), hq)
    row["lex_same_q_p50_us"], _ = pct(ts)
    row["lex_speedup_vs_faiss"] = row["faiss_p50_us"] / row["lex_same_q_p50_us"]
    row["mih_speedup_vs_faiss"] = row["faiss_p50_us"] / row["mih_p50_us"]
    row["auto_speedup_vs_faiss"] = row["faiss_p50_us"] / row["ham_auto_p50_us"]
    row["faiss_threads"] = faiss.omp_get_max_threads()
    r.close()
    del d, fx, r
    gc.collect()
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    ap.add_argument("--max-n", type=float, default=1e7, help="skip sizes above this")
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dists", nargs="+", default=["uniform", "clustered"], choices=["uniform", "clustered"])
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--queries", type=int, default=1000, help="search_lex queries per setting")
    ap.add_argument("--hamming-queries", type=int, default=200)
    ap.add_argument("--centres", type=int, default=1024, help="clusters of the clustered codes")
    ap.add_argument("--flip", type=float, default=0.05, help="bit-flip probability (clustered)")
    ap.add_argument("--faiss-threads", type=int, default=1,
                    help="OpenMP threads for FAISS (1: single-query latency on a shared machine)")
    ap.add_argument("--workdir", default=None, help="where indexes are built (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the built indexes")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import faiss

    if args.faiss_threads > 0:
        faiss.omp_set_num_threads(args.faiss_threads)
    sizes = [int(s) for s in args.sizes if s <= args.max_n]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_index_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"# cbir index benchmark: k={args.k}, {args.queries} lex queries, "
          f"{args.hamming_queries} Hamming queries, FAISS threads={faiss.omp_get_max_threads()}, "
          f"gpus={faiss.get_num_gpus()}, cpus={os.cpu_count()}", flush=True)
    hdr = (f"{'dist':9} {'B':>3} {'N':>9} {'ingest/s':>10} {'B/item':>7} {'lex p50':>8} {'lex p99':>8} "
           f"{'faiss p50':>10} {'faiss p99':>10} {'mih p50':>9} {'mih p99':>9} {'auto p50':>9} "
           f"{'lex x':>7} {'mih x':>7} {'auto x':>7}")
    print(hdr + "   (latencies in us; x = FAISS flat p50 / ours p50)", flush=True)
    try:
        for dist in args.dists:
            for nbits in args.bits:
                for n in sizes:
                    row = run_one(args, dist, nbits, n, workdir, args.seed)
                    rows.append(row)
                    print(f"{dist:9} {nbits:3d} {n:9d} {row['ingest_codes_per_s']:10.0f} "
                          f"{row['disk_bytes_per_item']:7.1f} {row['lex_p50_us']:8.1f} {row['lex_p99_us']:8.1f} "
                          f"{row['faiss_p50_us']:10.1f} {row['faiss_p99_us']:10.1f} "
                          f"{row['mih_p50_us']:9.1f} {row['mih_p99_us']:9.1f} {row['ham_auto_p50_us']:9.1f} "
                          f"{row['lex_speedup_vs_faiss']:7.1f} {row['mih_speedup_vs_faiss']:7.1f} "
                          f"{row['auto_speedup_vs_faiss']:7.1f}", flush=True)
        # latency growth of search_lex with N
        for dist in args.dists:
            for nbits in args.bits:
                rs = [r for r in rows if r["dist"] == dist and r["nbits"] == nbits]
                if len(rs) >= 2:
                    print(f"search_lex p50 at N={rs[-1]['n']} / at N={rs[0]['n']} ({dist}, B={nbits}): "
                          f"{rs[-1]['lex_p50_us'] / rs[0]['lex_p50_us']:.2f}", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
