"""Bounded loopback load benchmark of the cbir gRPC server (issue 5).

One run, in this order, against ``cbir serve --processes N`` subprocesses on 127.0.0.1 (real
server processes, so client and server do not share a GIL), for every N of ``--processes``
(default 1,2). When the machine has at least 2 cores, this process (the client) is pinned to
``--client-cores`` and the server to the others (``os.sched_setaffinity``), so the server is
what is measured; the client opens ``--channels`` connections so SO_REUSEPORT spreads them:

1. empty-RPC ceiling: ``Ping`` at 1, 4 and 16 calls in flight;
2. ``Search`` by code, LEXICOGRAPHIC and HAMMING (k = 10) at N items (default 10^6), with 1, 4
   and 16 calls in flight;
3. ``Search`` by image (PNG bytes, encoded by the server's micro-batching worker) at 16 and 64
   in flight, and the model's raw batched inference throughput (``Hasher.encode`` on float
   batches of ``--encoder-batch`` images) measured in this process in the same run.

Every level stops by itself after ``--requests`` calls or ``--duration`` seconds, whichever
comes first. Prints QPS, p50 and p99 latency per level and the ratios the issue targets
(code Search >= 0.8 x Ping QPS at 16 in flight with p99 <= 5 ms; image Search >= 0.8 x raw
batched inference). Synthetic clustered codes (like learned codes) fill the index; the model
is ``--model`` or an untrained DDTL (random weights: same cost as a trained one).

    python benchmarks/bench_server.py --n 1000000
    python benchmarks/bench_server.py --n 100000 --requests 2000 --duration 5
    python benchmarks/bench_server.py --n 200000 --processes 1,2 --image-concurrency ""
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def make_model(args):
    import torch

    from cbir.models.hasher import Hasher
    from cbir.models.registry import MethodSpec, create_method, resolve_params

    if args.model:
        return Hasher.load(args.model, device="cpu")
    torch.manual_seed(0)
    spec = MethodSpec(
        backbone=args.backbone, num_classes=10, nbits=None, depth=12, class_names=tuple(str(i) for i in range(10))
    )
    params = resolve_params("ddtl", None)
    return Hasher(create_method("ddtl", spec, params), "ddtl", spec, params, image_size=32, device="cpu")


def clustered_codes(n: int, nbits: int, seed: int = 0):
    from cbir.codes import Codes

    rng = np.random.default_rng(seed)
    centers = rng.integers(0, 2, size=(min(4096, max(1, n // 64)), nbits), dtype=np.uint8)
    out = np.empty((n, (nbits + 7) // 8), np.uint8)
    step = 1 << 18
    for s in range(0, n, step):
        m = min(step, n - s)
        bits = centers[rng.integers(0, len(centers), m)] ^ (rng.random((m, nbits)) < 0.1)
        out[s : s + m] = Codes.from_bits(bits.astype(np.uint8)).packed
    return Codes(out, nbits)


def png(seed: int) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def load(call, requests: list, concurrency: int, max_requests: int, duration: float, timeout: float = 30.0):
    calls = call if isinstance(call, (list, tuple)) else [call]
    """Closed loop with ``concurrency`` calls in flight, driven by completion callbacks of the
    client's future API (no client thread per call, so the client spends its one core on gRPC,
    not on GIL hand-offs), round-robin over ``call`` (one or a list: several channels); stops after
    ``max_requests`` calls or ``duration`` seconds.
    Returns (completed, errors, elapsed_s, latencies_s)."""
    lock = threading.Lock()
    finished = threading.Event()
    state = {"issued": 0, "outstanding": 0}
    lat: list[float] = []
    errors = [0]
    deadline = time.perf_counter() + duration

    def issue(i: int) -> None:
        t0 = time.perf_counter()
        fut = calls[i % len(calls)].future(requests[i % len(requests)], timeout=timeout)
        fut.add_done_callback(lambda f, t0=t0: done(f, t0))

    def done(fut, t0: float) -> None:
        dt = time.perf_counter() - t0
        failed = fut.exception() is not None
        with lock:
            if failed:
                errors[0] += 1
            else:
                lat.append(dt)
            nxt = None
            if state["issued"] < max_requests and time.perf_counter() < deadline:
                nxt = state["issued"]
                state["issued"] += 1
            else:
                state["outstanding"] -= 1
                if state["outstanding"] == 0:
                    finished.set()
        if nxt is not None:
            issue(nxt)

    t0 = time.perf_counter()
    first = min(concurrency, max_requests)
    with lock:
        state["issued"] = state["outstanding"] = first
    for i in range(first):
        issue(i)
    if first:
        finished.wait(duration + timeout + 5)
    elapsed = time.perf_counter() - t0
    with lock:
        return len(lat), errors[0], elapsed, np.asarray(lat)


def fmt_row(name: str, c: int, res) -> tuple[str, float, float, float]:
    n, err, el, lat = res
    qps = n / el if el > 0 else 0.0
    p50 = float(np.percentile(lat, 50) * 1e3) if n else float("nan")
    p99 = float(np.percentile(lat, 99) * 1e3) if n else float("nan")
    print(f"{name:<22} {c:>3}  {n:>7}  {err:>4}  {qps:>9.0f}  {p50:>8.3f}  {p99:>8.3f}", flush=True)
    return name, qps, p50, p99


def raw_inference(hasher, batch: int, seconds: float, windows: int = 3) -> float:
    """Best images/s of ``windows`` timing windows of ``Hasher.encode`` on one preprocessed
    float batch of real (PNG-decoded) images (the best window is the least disturbed one)."""
    from cbir.data import decode_image

    x = hasher.preprocess([decode_image(png(i)) for i in range(batch)])
    hasher.encode(x)  # warm-up
    best = 0.0
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / windows:
            hasher.encode(x)
            n += batch
        best = max(best, n / (time.perf_counter() - t0))
    return best


def start_server(index_dir: Path, model_path: Path, args, log_path: Path, processes: int = 1, cores: set | None = None):
    cmd = [
        sys.executable,
        "-m",
        "cbir.cli",
        "serve",
        "--index",
        str(index_dir),
        "--model",
        str(model_path),
        "--address",
        "127.0.0.1:0",
        "--no-access-log",
        "--grace",
        "5",
        "--workers",
        str(args.workers),
        "--inline-modes",
        args.inline_modes,
        *(["--torch-threads", str(args.server_torch_threads)] if args.server_torch_threads else []),
        "--encoder-batch",
        str(args.encoder_batch),
        "--encoder-wait-ms",
        str(args.encoder_wait_ms),
        "--device",
        "cpu",
        "--read-only",
        "--processes",
        str(processes),
    ]
    logf = open(log_path, "w")
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, text=True, preexec_fn=pin)
    end = time.monotonic() + 300
    address = None
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        if "SERVING" in line:
            address = line.rsplit(" on ", 1)[1].split()[0]
            break
    if address is None:
        proc.kill()
        raise RuntimeError(f"server did not start; see {log_path}")
    return proc, address, logf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="index size (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=3000, help="max calls per level (default: %(default)s)")
    ap.add_argument("--duration", type=float, default=6.0, help="max seconds per level (default: %(default)s)")
    ap.add_argument("--image-requests", type=int, default=1500, help="max image calls per level")
    ap.add_argument("--model", default=None, help="model checkpoint (default: untrained DDTL)")
    ap.add_argument("--backbone", default="resnet20", help="backbone of the untrained model (default: %(default)s)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved windows per code-search level (default: %(default)s)"
    )
    ap.add_argument("--workers", type=int, default=4, help="server offload threads (scans, writes)")
    ap.add_argument("--inline-modes", default="lex,prefix", help="server --inline-modes (default: %(default)s)")
    ap.add_argument(
        "--server-torch-threads",
        type=int,
        default=None,
        help="server --torch-threads (default: torch's choice); the raw-inference baseline always "
        "uses this process's default threads",
    )
    ap.add_argument("--encoder-batch", type=int, default=64)
    ap.add_argument("--encoder-wait-ms", type=float, default=2.0)
    ap.add_argument("--concurrency", default="1,4,16", help="code-search levels (default: %(default)s)")
    ap.add_argument(
        "--image-concurrency",
        default="16,64",
        help='image-search levels, run for the first --processes value; "" skips them (default: %(default)s)',
    )
    ap.add_argument("--workdir", default=None, help="where to build the index (default: a temp dir)")
    ap.add_argument(
        "--processes", default="1,2", help="cbir serve --processes values to measure (default: %(default)s)"
    )
    ap.add_argument(
        "--channels",
        type=int,
        default=4,
        help="client channels (connections) the calls are spread over (default: %(default)s)",
    )
    ap.add_argument(
        "--client-cores",
        default=None,
        help="cores for this client process, e.g. 0 (default: the last usable core; the server "
        "gets the others; no pinning on fewer than 2 cores)",
    )
    args = ap.parse_args(argv)

    import grpc

    from cbir.indexer import build_index
    from cbir.v1 import search_pb2 as pb
    from cbir.v1 import search_pb2_grpc as pb_grpc

    client_cores, server_cores = pin_cores(args.client_cores)
    levels = [int(c) for c in args.concurrency.split(",")]
    img_levels = [int(c) for c in args.image_concurrency.split(",") if c.strip()]
    nprocs = [int(c) for c in args.processes.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="bench_server_", dir=args.workdir)
    work = Path(tmp.name)
    hasher = make_model(args)
    nbits = hasher.layout.nbits
    model_path = hasher.save(work / "model.pt")
    t0 = time.perf_counter()
    codes = clustered_codes(args.n, nbits)
    index_dir = build_index(
        work / "index", np.arange(args.n, dtype=np.int64), codes, layout=hasher.layout, model_hash=hasher.content_hash
    )
    print(
        f"index: N={args.n:,} codes of {nbits} bits built in {time.perf_counter() - t0:.1f}s; "
        f"model {hasher.method_name}/{hasher.spec.backbone}; cpu cores={os.cpu_count()}; "
        + (
            f"client pinned to cores {sorted(client_cores)}, server to {sorted(server_cores)}"
            if server_cores
            else "not pinned (fewer than 2 usable cores, or --client-cores took them all)"
        ),
        flush=True,
    )
    rng = np.random.default_rng(1)
    qcodes = [codes[int(i)] for i in rng.integers(0, args.n, 256)]
    lex_reqs = [pb.SearchRequest(code=pb.Code(data=q.packed[0].tobytes(), nbits=nbits), k=args.k) for q in qcodes]
    ham_reqs = [pb.SearchRequest(code=r.code, k=args.k, mode=pb.HAMMING) for r in lex_reqs]
    ping_reqs = [pb.PingRequest()]
    img_reqs = [pb.SearchRequest(image=png(i), k=args.k) for i in range(64)]
    results, raws = {}, []
    for P in nprocs:
        proc, address, logf = start_server(index_dir, model_path, args, work / f"server{P}.log", P, server_cores)
        # one connection per channel (no shared subchannel pool): SO_REUSEPORT spreads connections
        channels = [
            grpc.insecure_channel(address, [("grpc.use_local_subchannel_pool", 1), ("bench.ch", j)])
            for j in range(max(1, args.channels))
        ]
        stubs = [pb_grpc.SearchServiceStub(ch) for ch in channels]
        try:
            for st in stubs:
                for r in lex_reqs[:10] + ham_reqs[:10] + (img_reqs[:2] if img_levels else []):  # warm-up
                    st.Search(r, timeout=60)
            print(f"\n--processes {P} ({len(stubs)} client channels)")
            print(f"{'level':<22} {'c':>3}  {'calls':>7}  {'err':>4}  {'QPS':>9}  {'p50 ms':>8}  {'p99 ms':>8}")
            # Ping and the code searches are interleaved in --rounds short windows per level, so a
            # drifting background load hits every kind alike (the ratios are what the targets need).
            kinds = (
                ("ping", "Ping (empty RPC)", [s.Ping for s in stubs], ping_reqs),
                ("lex", "Search code LEX", [s.Search for s in stubs], lex_reqs),
                ("hamming", "Search code HAM", [s.Search for s in stubs], ham_reqs),
            )
            R = max(1, args.rounds)
            for c in levels:
                acc = {key: [0, 0, 0.0, []] for key, *_ in kinds}
                for _ in range(R):
                    for key, _, call, reqs in kinds:
                        n, err, el, lat = load(call, reqs, c, -(-args.requests // R), args.duration / R)
                        a = acc[key]
                        a[0] += n
                        a[1] += err
                        a[2] += el
                        a[3].append(lat)  # noqa: E702
                for key, label, *_ in kinds:
                    n, err, el, lats = acc[key]
                    results[(P, key, c)] = fmt_row(label, c, (n, err, el, np.concatenate(lats)))
            if P == nprocs[0] and img_levels:
                # raw model throughput interleaved with the image levels (server idle meanwhile)
                raws.append(raw_inference(hasher, args.encoder_batch, min(4.0, args.duration)))
                for c in img_levels:
                    results[(P, "image", c)] = fmt_row(
                        "Search image",
                        c,
                        load([s.Search for s in stubs], img_reqs, c, args.image_requests, args.duration),
                    )
                    raws.append(raw_inference(hasher, args.encoder_batch, min(4.0, args.duration)))
        finally:
            for ch in channels:
                ch.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            logf.close()
    top = max(levels)
    print()
    for P in nprocs:
        ping = results[(P, "ping", top)][1]
        print(f"--processes {P}: Ping @{top} {ping:.0f} QPS")
        for name in ("lex", "hamming"):
            _, qps, _, p99 = results[(P, name, top)]
            ok = "meets" if qps >= 0.8 * ping and p99 <= 5.0 else "misses"
            print(
                f"  Search code {name:<8} @{top}: {qps:.0f} QPS = {qps / ping:.2f} x Ping QPS, p99 {p99:.2f} ms "
                f"({ok} target >= 0.80 x and <= 5 ms)"
            )
    if len(nprocs) > 1:
        a, b = nprocs[0], nprocs[-1]
        for name in ("ping", "lex", "hamming"):
            r = results[(b, name, top)][1] / max(1e-9, results[(a, name, top)][1])
            tgt = "" if name == "ping" else f" ({'meets' if r >= 1.6 else 'misses'} target >= 1.6 x)"
            print(f"{name:<8} @{top}: --processes {b} = {r:.2f} x --processes {a}{tgt}")
    if raws:
        raw = float(np.mean(raws))
        print(
            f"\nraw batched inference (Hasher.encode on float batches of {args.encoder_batch}, this process, "
            f"server idle), around the image levels: {' / '.join(f'{r:.0f}' for r in raws)}; mean {raw:.0f} images/s"
        )
        best_img = max(results[(nprocs[0], "image", c)][1] for c in img_levels)
        ok = "meets" if best_img >= 0.8 * raw else "misses"
        print(f"Search image best {best_img:.0f} QPS = {best_img / raw:.2f} x raw inference ({ok} target >= 0.80 x)")
    tmp.cleanup()
    return 0


def pin_cores(spec: str | None) -> tuple[set, set]:
    """Pin this process (the client) to ``spec`` (e.g. "0" or "0,1"; default: the last usable
    core) and return (client cores, server cores = the others); no pinning below 2 cores."""
    if not hasattr(os, "sched_setaffinity"):
        return set(), set()
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return set(usable), set()
    client = {int(c) for c in spec.split(",")} if spec else {usable[-1]}
    server = set(usable) - client
    if not server:
        return set(usable), set()
    os.sched_setaffinity(0, client)
    return client, server


if __name__ == "__main__":
    sys.exit(main())
