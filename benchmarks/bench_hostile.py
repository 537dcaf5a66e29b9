"""The server under hostile input (issue 12): counts, RSS and latency ratios, one run.

Against one ``cbir serve`` subprocess on 127.0.0.1 (its RSS read from ``/proc``), in order:

1. the first image ``Search`` right after the server printed SERVING (target <= 1 s);
2. ``--hostile`` seeded hostile requests (:mod:`cbir.server.fuzz`: raw random bytes, mutated
   messages, wrong lengths, extreme numbers, image bombs, huge batches) sent as raw bytes with
   ``--in-flight`` calls in flight: status counts (target 0 INTERNAL / UNKNOWN, no crash), the
   server's RSS growth (target <= 200 MB), the reference answers before == after, tracebacks in
   the server's log;
3. the 69-byte PNG bomb (4000x4000 declared, empty IDAT) in ``GetCode{images=[32x32 PNG, bomb]}``
   ``--bombs`` times, 8 in flight (target RSS growth <= 100 MB);
4. ratios measured in this run: a 32x32 image Search's median latency while a GetCode of two
   4096x4096 images is being encoded vs alone (fairness), and a HAMMING code Search's p99 while
   another process keeps 4 hostile requests in flight vs alone (4 interleaved windows of each).

Where things run: with at least 2 usable cores the server is pinned to all but the last core and
this client and the hostile sender (``os.sched_setaffinity``) to the last one (``--client-cores``;
``none`` pins nothing), as a deployment has its clients on other machines; the sender's answered
requests per second and the server's CPU seconds by thread (``cbir-loop``, ``cbir-search``,
``cbir-bulk``, ``cbir-encoder``, gRPC's own; the encoder process's as ``child:...``) during the
hostile windows are printed with the p99s.
``--server-args`` passes extra ``cbir serve`` flags (e.g. ``--bulk-nice 0`` or ``--fault-rate 0``
for an A/B run). With the default pacing of failed calls (``--fault-rate 100``) step 2 takes about
80 s instead of about 25 s: its ~8,000 INVALID_ARGUMENT answers are paced to 100/s.

Timings on a shared machine are disturbed by other work; the counts and RSS figures are not.

    python benchmarks/bench_hostile.py
    python benchmarks/bench_hostile.py --n 1000000 --hostile 10000 --bombs 1000
    python benchmarks/bench_hostile.py --n 1000000 --client-cores none   # nothing pinned
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_server  # noqa: E402
from bench_server import clustered_codes, make_model, pin_cores, png  # noqa: E402

MiB = 1 << 20


def send_all(channel, reqs, in_flight: int) -> Counter:
    """Send ``(method, body, kind)`` triples as raw bytes; count the statuses."""
    import grpc

    from cbir.server.fuzz import raw_caller

    calls = {}

    def one(req):
        method, body, _ = req
        fn = calls.get(method) or calls.setdefault(method, raw_caller(channel, method))
        try:
            fn(body, timeout=120)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    with ThreadPoolExecutor(in_flight) as pool:
        return Counter(pool.map(one, reqs))


def reference(stub, codes, image: bytes):
    from cbir.v1 import search_pb2 as pb

    q = [pb.Code(data=codes.packed[i].tobytes(), nbits=codes.nbits) for i in (3, 7)]
    return [
        stub.Search(pb.SearchRequest(code=q[0], k=100, return_codes=True, return_metadata=True)),
        stub.Search(pb.SearchRequest(code=q[1], k=20, mode=pb.HAMMING)),
        stub.Search(pb.SearchRequest(image=image, k=10)),
    ]


def hostile_sender(
    address: str, seed: int, nbits: int, ids: list, image: bytes, stop, pause, sent, cores: set | None = None
) -> None:
    """In its own process (pinned to ``cores``): keep 4 hostile requests in flight (except while
    ``pause`` is set) until ``stop`` is set; ``sent`` counts the answered requests."""
    import grpc

    from cbir.server.fuzz import hostile_requests

    if cores:
        os.sched_setaffinity(0, cores)
    reqs = list(hostile_requests(2000, seed, nbits, ids, image))  # made up front: the sender's CPU is not the test
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MiB)]) as ch:
        i = 0
        while not stop.is_set():
            if pause.is_set():
                time.sleep(0.01)
                continue
            send_all(ch, [reqs[(i + j) % len(reqs)] for j in range(8)], 4)
            with sent.get_lock():
                sent.value += 8
            i += 8


def start_server(index_dir, model_path, args, log_path, cores=None, extra=()):
    """``bench_server.start_server`` with ``extra`` cbir serve flags appended to its command."""
    popen = subprocess.Popen

    def with_extra(cmd, *a, **kw):
        return popen([*cmd, *extra], *a, **kw)

    subprocess.Popen = with_extra  # type: ignore[misc]
    try:
        return bench_server.start_server(index_dir, model_path, args, log_path, cores=cores)
    finally:
        subprocess.Popen = popen  # type: ignore[misc]


def thread_cpu(pid: int, _depth: int = 0) -> dict:
    """CPU seconds (user + system) of each thread of process ``pid``, summed by thread name; the
    threads of its child processes (the encoder process) are included, named ``child:<name>``."""
    tick = os.sysconf("SC_CLK_TCK")
    out: Counter = Counter()
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            children.update(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name if not _depth else f"child:{name}"] += (int(fields[11]) + int(fields[12])) / tick
    for child in children if _depth < 2 else ():
        try:
            out.update(thread_cpu(child, _depth + 1))
        except OSError:
            continue
    return dict(out)


def cpu_delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def latencies(fn, n: int) -> np.ndarray:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return np.asarray(out)


def big_png(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, format="PNG")
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="index size (default: %(default)s)")
    ap.add_argument("--hostile", type=int, default=10_000, help="hostile requests (default: %(default)s)")
    ap.add_argument("--bombs", type=int, default=1_000, help="PNG-bomb GetCode calls (default: %(default)s)")
    ap.add_argument("--in-flight", type=int, default=8, help="hostile calls in flight (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--model", default=None, help="model checkpoint (default: untrained DDTL)")
    ap.add_argument("--backbone", default="resnet20", help="backbone of the untrained model (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=4, help="server offload threads")
    ap.add_argument("--server-torch-threads", type=int, default=1, help="server --torch-threads (default: %(default)s)")
    ap.add_argument("--workdir", default=None, help="where to build the index (default: a temp dir)")
    ap.add_argument("--windows", type=int, default=4, help="interleaved alone/during windows (default: %(default)s)")
    ap.add_argument("--per-window", type=int, default=100, help="searches per window (default: %(default)s)")
    ap.add_argument(
        "--server-args",
        default="",
        help="extra cbir serve flags, e.g. '--bulk-nice 0 --switch-interval-ms 5' (default: none)",
    )
    ap.add_argument(
        "--client-cores",
        default=None,
        help="cores for this client and the hostile sender, e.g. 0 (default: the last usable core; "
        "the server gets the others); 'none' pins nothing",
    )
    args = ap.parse_args(argv)
    args.inline_modes, args.encoder_batch, args.encoder_wait_ms = "lex,prefix", 64, 2.0

    import grpc

    from cbir.indexer import build_index
    from cbir.server import connect
    from cbir.server.fuzz import hostile_requests, png_bomb, rss_bytes
    from cbir.v1 import search_pb2 as pb

    if args.client_cores == "none":
        client_cores, server_cores = set(), set()
    else:
        client_cores, server_cores = pin_cores(args.client_cores)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cbir-hostile-"))
    hasher = make_model(args)
    model_path = hasher.save(work / "model.pt")
    nbits = hasher.layout.nbits
    codes = clustered_codes(args.n, nbits, seed=1)
    ids = np.arange(args.n, dtype=np.int64)
    metas = [{"labels": [int(i % 10)]} for i in range(args.n)]
    index_dir = build_index(
        work / "index", ids, codes, meta=metas, layout=hasher.layout, model_hash=hasher.content_hash
    )
    log_path = work / "server.log"
    print(
        f"# cbir hostile-input benchmark: N={args.n}, {nbits}-bit codes, backbone={args.backbone}, "
        f"server torch threads={args.server_torch_threads}, extra server flags {args.server_args!r}; cpu cores={os.cpu_count()}; "
        + (
            f"server pinned to cores {sorted(server_cores)}, this client and the hostile sender to "
            f"{sorted(client_cores)}"
            if server_cores
            else "nothing pinned"
        ),
        flush=True,
    )

    proc, address, logf = start_server(
        index_dir, model_path, args, log_path, cores=server_cores or None, extra=shlex.split(args.server_args)
    )
    try:
        channel, stub = connect(address)
        image = png(11)
        t0 = time.perf_counter()
        stub.Search(pb.SearchRequest(image=png(99), k=5), timeout=30)
        first = time.perf_counter() - t0
        print(f"first image Search after SERVING: {first * 1e3:.1f} ms (target <= 1000 ms)", flush=True)

        before = reference(stub, codes, image)
        raw = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * MiB)])
        rss0, anon0 = rss_bytes(proc.pid), rss_bytes(proc.pid, "RssAnon")
        t0 = time.perf_counter()
        counts = send_all(
            raw, hostile_requests(args.hostile, args.seed, nbits, ids[:1000].tolist(), image), args.in_flight
        )
        el = time.perf_counter() - t0
        rss1, anon1 = rss_bytes(proc.pid), rss_bytes(proc.pid, "RssAnon")
        alive = proc.poll() is None
        same = alive and reference(stub, codes, image) == before
        print(f"hostile requests: {sum(counts.values())} in {el:.1f} s, statuses {dict(sorted(counts.items()))}")
        print(
            f"  INTERNAL={counts.get('INTERNAL', 0)} UNKNOWN={counts.get('UNKNOWN', 0)} "
            f"server alive={alive} reference answers identical={same}"
        )
        print(
            f"  server RSS {rss0 / MiB:.0f} -> {rss1 / MiB:.0f} MB: growth {(rss1 - rss0) / MiB:+.0f} MB "
            f"(target <= 200 MB; anonymous {(anon1 - anon0) / MiB:+.0f} MB, the rest file-backed, e.g. mmapped index pages)",
            flush=True,
        )

        bomb = png_bomb()
        req = pb.GetCodeRequest(images=[png(1), bomb]).SerializeToString()
        rss2 = rss_bytes(proc.pid)
        bc = send_all(raw, [("GetCode", req, "bomb")] * args.bombs, 8)
        rss3 = rss_bytes(proc.pid)
        print(
            f"PNG bomb ({len(bomb)} bytes, 4000x4000 declared) x {args.bombs} in GetCode, 8 in flight: "
            f"statuses {dict(bc)}; server RSS {rss2 / MiB:.0f} -> {rss3 / MiB:.0f} MB: growth "
            f"{(rss3 - rss2) / MiB:+.0f} MB (target <= 100 MB)",
            flush=True,
        )

        # the 13.2 s BatchSearch (200 x k=10000), now refused before any work
        huge = pb.BatchSearchRequest(
            requests=[pb.SearchRequest(code=pb.Code(data=codes.packed[4].tobytes(), nbits=nbits), k=10_000)] * 200
        )
        t0 = time.perf_counter()
        try:
            stub.BatchSearch(huge, timeout=60)
            status = "OK"
        except grpc.RpcError as e:
            status = e.code().name
        print(
            f"BatchSearch 200 x k=10000 ({huge.ByteSize()} bytes): {status} in "
            f"{(time.perf_counter() - t0) * 1e3:.1f} ms",
            flush=True,
        )

        # the 10.8 s request: a label filter that matches nothing
        for name, mode in (("HAMMING", pb.HAMMING), ("LEXICOGRAPHIC", pb.LEXICOGRAPHIC)):
            nomatch = pb.SearchRequest(
                code=pb.Code(data=codes.packed[4].tobytes(), nbits=nbits), k=10, mode=mode, label_filter=["nomatch"]
            )
            lat = latencies(lambda req=nomatch: stub.Search(req, timeout=60), 20)
            print(
                f"label_filter=['nomatch'] {name} k=10 Search at N={args.n}: median {np.median(lat) * 1e3:.2f} ms, "
                f"max {lat.max() * 1e3:.2f} ms",
                flush=True,
            )

        # fairness: a small image Search while two 4096x4096 images are encoded
        small = pb.SearchRequest(image=png(5), k=3)
        alone = latencies(lambda: stub.Search(small, timeout=60), 20)
        big = pb.GetCodeRequest(images=[big_png(4096)] * 2)
        t0 = time.perf_counter()
        fut = stub.GetCode.future(big, timeout=120)
        time.sleep(0.05)
        during = latencies(lambda: stub.Search(small, timeout=60), 5)
        fut.result()
        big_s = time.perf_counter() - t0
        print(
            f"fairness: 32x32 image Search median {np.median(alone) * 1e3:.1f} ms alone, "
            f"{np.median(during) * 1e3:.1f} ms while a GetCode of 2 x 4096x4096 runs ({big_s:.2f} s); "
            f"ratio {np.median(during) / np.median(alone):.1f}",
            flush=True,
        )

        # an unrelated search while 4 hostile requests are in flight (sent by another process)
        q = pb.SearchRequest(code=pb.Code(data=codes.packed[9].tobytes(), nbits=nbits), k=10, mode=pb.HAMMING)
        ctx = multiprocessing.get_context("spawn")
        stop, pause = ctx.Event(), ctx.Event()
        sent = ctx.Value("q", 0)
        pause.set()
        sender = ctx.Process(
            target=hostile_sender,
            args=(address, 100, nbits, ids[:1000].tolist(), image, stop, pause, sent, client_cores or None),
        )
        sender.start()
        time.sleep(3.0)  # the sender process imports and connects
        alone, during = [], []
        log_at = log_path.stat().st_size
        busy_s, busy_n, cpu = 0.0, 0, Counter()
        for _ in range(args.windows):  # interleaved windows: drifting background load hits both alike
            pause.set()
            time.sleep(0.3)
            alone.append(latencies(lambda: stub.Search(q, timeout=60), args.per_window))
            pause.clear()
            time.sleep(0.3)
            n0, c0, t0 = sent.value, thread_cpu(proc.pid), time.perf_counter()
            during.append(latencies(lambda: stub.Search(q, timeout=60), args.per_window))
            busy_s += time.perf_counter() - t0
            busy_n += sent.value - n0
            cpu.update(cpu_delta(c0, thread_cpu(proc.pid)))
        stop.set()
        sender.join(120)
        alone, during = np.concatenate(alone), np.concatenate(during)
        p99a, p99d = np.percentile(alone, 99) * 1e3, np.percentile(during, 99) * 1e3
        print(
            f"HAMMING code Search p99: {p99a:.2f} ms alone, {p99d:.2f} ms with 4 hostile requests in flight; "
            f"ratio {p99d / p99a:.1f} (target <= 2; "
            + (
                f"server on cores {sorted(server_cores)}, client and sender on {sorted(client_cores)})"
                if server_cores
                else "server, client and sender share this machine's cores)"
            ),
            flush=True,
        )
        statuses = Counter(
            line.split("status=", 1)[1].split()[0] + " " + line.split("method=", 1)[1].split()[0]
            for line in log_path.read_text(errors="replace")[log_at:].splitlines()
            if "rpc method=" in line
        )
        top = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])[:6] if v > 0)
        print(
            f"  hostile sender: {busy_n} requests answered in the {busy_s:.2f} s of the 'during' windows "
            f"({busy_n / busy_s:.0f}/s); server CPU meanwhile {sum(cpu.values()):.2f} s by thread: {top}; "
            f"non-OK statuses logged during the windows (method): {dict(statuses.most_common(8))}",
            flush=True,
        )
        raw.close()
        channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        logf.close()
    text = log_path.read_text(errors="replace")
    print(
        f"server exit code {rc}; server log: {text.count('Traceback')} tracebacks, "
        f"{text.count(' WARNING cbir.server')} WARNING lines, {text.count('ERROR')} ERROR mentions "
        f"({log_path})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
