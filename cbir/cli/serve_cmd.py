"""``cbir serve``: serve an index (and a model, for image queries) over gRPC."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("cbir.serve")

SWITCH_INTERVAL_MS = 5.0  # Python's default, until measured otherwise (benchmarks/bench_hostile.py)
_SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # = cbir.data.images.SAFE_FORMATS (lazy import)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an index over gRPC (cbir.v1.SearchService, health, reflection)",
        description="Load an index (and optionally a model for image queries) once and serve it "
        "until SIGTERM/SIGINT, then drain in-flight calls. Binds 127.0.0.1 by default; any other "
        "address needs TLS and/or a bearer token unless --insecure.",
    )
    p.add_argument("--index", required=True, type=Path, help="index directory (cbir index build)")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model checkpoint used to encode image queries (without it: code/id queries only)",
    )
    p.add_argument(
        "--address", default="127.0.0.1:50051", help="HOST:PORT to bind (default: %(default)s; port 0 = any free)"
    )
    p.add_argument("--read-only", action="store_true", help="open the index read-only (Add/Delete fail)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT), each with its own index handle, "
        "model and event loop; with more than 1 the index is served read-only and Add/Delete "
        "are FAILED_PRECONDITION (default: %(default)s)",
    )
    s = p.add_argument_group("security")
    s.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key)")
    s.add_argument("--tls-key", type=Path, help="PEM private key")
    s.add_argument("--token", default=None, help="require 'authorization: Bearer TOKEN' (default: $CBIR_TOKEN)")
    s.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address without TLS or token (not recommended)"
    )
    s.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="serve an index built with another model than --model (image queries then give codes of another model)",
    )
    lim = p.add_argument_group("limits")
    lim.add_argument(
        "--max-message-mb", type=float, default=16.0, help="max request/response size in MiB (default: %(default)s)"
    )
    lim.add_argument("--max-k", type=int, default=10_000, help="max hits per query (default: %(default)s)")
    lim.add_argument("--max-batch", type=int, default=10_000, help="max queries/items per call (default: %(default)s)")
    lim.add_argument(
        "--workers",
        type=int,
        default=4,
        help="search threads for single HAMMING/HYBRID scans; RPCs and lexicographic/prefix lookups "
        "run on one asyncio event loop (default: %(default)s)",
    )
    lim.add_argument(
        "--bulk-workers",
        type=int,
        default=2,
        help="bulk threads, run at a lower OS priority (--bulk-nice): BatchSearch, label-filtered "
        "searches, searches ranking more than --bulk-min-hits items, writes, stats; 0 = they share "
        "the search threads (default: %(default)s)",
    )
    lim.add_argument(
        "--bulk-nice",
        type=int,
        default=10,
        help="added to the nice value of the bulk threads and of the image encoder thread (Linux, "
        "per thread; 0..19): the kernel runs cheap requests first on a busy machine (default: %(default)s)",
    )
    lim.add_argument(
        "--fault-rate",
        type=float,
        default=100.0,
        help="answers per second to one client host's failed calls (INVALID_ARGUMENT, OUT_OF_RANGE, "
        "RESOURCE_EXHAUSTED) once it has had --fault-burst of them: a faster client's error answers wait "
        "their turn (at most 1 s, no CPU), so a stream of bad requests cannot keep the server busy "
        "rejecting them; well-formed calls are never delayed; 0 turns it off (default: %(default)s)",
    )
    lim.add_argument(
        "--fault-burst",
        type=int,
        default=20,
        help="failed calls of one host answered at once before --fault-rate applies (default: %(default)s)",
    )
    lim.add_argument(
        "--preload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read every page of the index's search structures into memory before reporting SERVING, so "
        "queries never wait on the disk and the server's memory does not grow with its first scans "
        "(default: on)",
    )
    lim.add_argument(
        "--encoder-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode and encode query images in a child process at the --bulk-nice priority, so the "
        "image work never holds the GIL the RPC event loop needs and a decoder crash cannot take the "
        "server down; --no-encoder-process keeps it on a thread of the server (default: on)",
    )
    lim.add_argument(
        "--bulk-min-hits",
        type=int,
        default=1000,
        help="a single search whose k + offset exceeds this runs on the bulk threads (default: %(default)s)",
    )
    lim.add_argument(
        "--switch-interval-ms",
        type=float,
        default=SWITCH_INTERVAL_MS,
        help="Python's GIL switch interval in the server process (sys.setswitchinterval): how long a "
        "thread holding the GIL keeps it while another waits; Python's own default is 5 ms "
        "(default: %(default)s)",
    )
    lim.add_argument(
        "--inline-modes",
        default="lex,prefix",
        help="search modes answered on the event loop without a thread hop (comma-separated from "
        "lex,prefix,hamming,hybrid; the others go to the offload threads; default: %(default)s)",
    )
    lim.add_argument("--max-concurrent-rpcs", type=int, default=None, help="refuse calls beyond this many in flight")
    lim.add_argument(
        "--max-hits-per-call",
        type=int,
        default=200_000,
        help="ranked hits (k + offset, summed over a BatchSearch) one call may ask for; more is "
        "RESOURCE_EXHAUSTED before any work (default: %(default)s)",
    )
    lim.add_argument(
        "--max-filter-scan",
        type=int,
        default=50_000,
        help="items a label-filtered search may examine before RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    lim.add_argument(
        "--max-call-cpu-s",
        type=float,
        default=2.0,
        help="CPU seconds the search work of one call may use (checked between the queries of a "
        "BatchSearch and the pages of a filtered scan); more is RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    img = p.add_argument_group("image limits (checked from the header, before any pixel is decoded)")
    img.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="pixels (width x height) of one image (default: %(default)s = 4096x4096)",
    )
    img.add_argument(
        "--max-request-pixels",
        type=int,
        default=2 * 4096 * 4096,
        help="pixels of all the images of one call together (default: %(default)s)",
    )
    img.add_argument(
        "--max-images-per-call",
        type=int,
        default=256,
        help="images in one call (each costs a forward pass row); more is RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    img.add_argument(
        "--image-formats",
        default=",".join(_SAFE_FORMATS),
        help="accepted image formats, comma-separated Pillow names; EPS/PS/PDF are never read (default: %(default)s)",
    )
    e = p.add_argument_group("encoder")
    e.add_argument("--encoder-batch", type=int, default=64, help="max images per forward pass (default: %(default)s)")
    e.add_argument(
        "--encoder-wait-ms",
        type=float,
        default=2.0,
        help="a batch keeps filling while images arrive less than this apart (default: %(default)s)",
    )
    e.add_argument(
        "--encoder-max-delay-ms",
        type=float,
        default=None,
        help="...but starts at most this long after its first image (default: 8 x --encoder-wait-ms)",
    )
    e.add_argument(
        "--encoder-step-pixels",
        type=int,
        default=8 << 20,
        help="decoded pixels per encoder step: a call with many big images is spread over steps "
        "shared round-robin with the other calls (default: %(default)s)",
    )
    e.add_argument("--device", default="auto", help="model device: auto, cpu, cuda ... (default: %(default)s)")
    e.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CPU threads for the model's forward pass (default: torch's choice; on a small machine "
        "shared with the RPC loop, 1 avoids thread-barrier stalls)",
    )
    p.add_argument(
        "--malloc-arenas",
        type=int,
        default=2,
        help="glibc malloc arenas (0 = glibc's default of 8 per core): every offload thread otherwise "
        "keeps its own arena holding the peak of its index-sized scratch arrays (default: %(default)s)",
    )
    p.add_argument("--no-access-log", action="store_true", help="no per-call INFO log lines (load tests)")
    p.add_argument(
        "--grace", type=float, default=10.0, help="seconds in-flight calls get on shutdown (default: %(default)s)"
    )
    p.add_argument(
        "--drain-delay",
        type=float,
        default=0.0,
        help="seconds to report NOT_SERVING before refusing new calls (default: %(default)s)",
    )
    p.set_defaults(func=run)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read {what} {path}: {exc}") from None


def _limit_malloc_arenas(n: int) -> bool:
    """``mallopt(M_ARENA_MAX, n)`` on glibc, before the server starts its threads (False elsewhere)."""
    if n <= 0 or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, int(n)))  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def _options(args: argparse.Namespace, extra_grpc_options=()):
    from cbir.server import ServerOptions

    token = args.token if args.token is not None else os.environ.get("CBIR_TOKEN") or None
    return ServerOptions(
        allow_model_mismatch=bool(getattr(args, "allow_model_mismatch", False)),
        max_message_bytes=int(args.max_message_mb * (1 << 20)),
        max_k=args.max_k,
        max_batch=args.max_batch,
        max_workers=args.workers,
        bulk_workers=args.bulk_workers,
        bulk_nice=args.bulk_nice,
        bulk_min_hits=args.bulk_min_hits,
        switch_interval_s=args.switch_interval_ms / 1000.0,
        inline_modes=tuple(m.strip() for m in args.inline_modes.split(",") if m.strip()),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_hits_per_call=args.max_hits_per_call,
        max_filter_scan=args.max_filter_scan,
        max_call_cpu_s=args.max_call_cpu_s,
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        max_images_per_call=args.max_images_per_call,
        image_formats=tuple(f.strip().upper() for f in args.image_formats.split(",") if f.strip()),
        encoder_step_pixels=args.encoder_step_pixels,
        encoder_process=bool(args.encoder_process),
        fault_rate=args.fault_rate,
        fault_burst=args.fault_burst,
        preload=bool(args.preload),
        encoder_max_batch=args.encoder_batch,
        encoder_max_wait_s=args.encoder_wait_ms / 1000.0,
        encoder_max_delay_s=None if args.encoder_max_delay_ms is None else args.encoder_max_delay_ms / 1000.0,
        token=token,
        tls_cert=_read(args.tls_cert, "TLS certificate"),
        tls_key=_read(args.tls_key, "TLS key"),
        insecure=args.insecure,
        extra_grpc_options=list(extra_grpc_options),
    )


def _load_hasher(args: argparse.Namespace):
    if args.model is None:
        return None
    from cbir.models.hasher import Hasher

    if args.torch_threads is not None:
        import torch

        if args.torch_threads < 1:
            raise ValueError(f"--torch-threads must be >= 1, got {args.torch_threads}")
        torch.set_num_threads(args.torch_threads)
    return Hasher.load(args.model, device=args.device)


def _serve(
    args: argparse.Namespace, address: str, opts, *, writable: bool, read_only_reason: str | None = None, on_ready=None
) -> int:
    """Run one server until SIGTERM/SIGINT, then drain. ``on_ready(info)`` instead of printing
    (a ``--processes`` worker reports to its parent)."""
    from cbir.server import CbirServer, open_backend

    say = (lambda msg: None) if on_ready else (lambda msg: print(msg, flush=True))
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        log.info("received %s: shutting down (grace %.1fs)", signal.Signals(signum).name, args.grace)
        stop.set()

    try:
        server = CbirServer(address, opts)  # health NOT_SERVING while loading
    except OSError as exc:
        print(f"cbir serve: error: {exc}", file=sys.stderr)
        return 2
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        say(f"cbir serve: listening on {server.address} (loading...)")
        backend = open_backend(args.index, writable=writable)  # after the fork in a worker
        if read_only_reason:
            backend.read_only_reason = read_only_reason
        try:
            hasher = _load_hasher(args)
            server.attach(backend, hasher, owns_backend=True, model_path=args.model)
        except BaseException:
            backend.close()
            raise
        info = {"pid": os.getpid(), "count": int(backend.count()), "nbits": backend.nbits, "model": hasher is not None}
        members = getattr(hasher, "members", None)
        model_note = "" if hasher else " [no model: code/id queries only]"
        if members:
            model_note = f" [ensemble of {len(members)} members: image queries get hardness, IDK and prediction set]"
        say(f"cbir serve: SERVING {info['count']} items ({backend.nbits}-bit codes) on {server.address}{model_note}")
        if on_ready:
            on_ready(info)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(grace=args.grace, drain_delay=args.drain_delay)
        for s, h in old.items():
            signal.signal(s, h)
    say("cbir serve: stopped")
    return 0


def _worker(args: argparse.Namespace, address: str, index: int, ready) -> int:  # noqa: ARG001
    reason = (
        f"writes are refused: this server runs {args.processes} read-only processes "
        "(cbir serve --processes); send Add/Delete to a single-process cbir serve of the index"
    )
    opts = _options(args, [("grpc.so_reuseport", 1)])
    return _serve(args, address, opts, writable=False, read_only_reason=reason, on_ready=ready)


def run(args: argparse.Namespace) -> int:
    _limit_malloc_arenas(args.malloc_arenas)
    if args.no_access_log:
        logging.getLogger("cbir.server.rpc").setLevel(logging.WARNING)
    if not args.index.is_dir():
        raise FileNotFoundError(f"no index directory at {args.index} (build one with `cbir index build`)")
    if args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.processes == 1:
        return _serve(args, args.address, _options(args), writable=not args.read_only)
    from cbir.server.multiproc import reserve_port, run_workers
    from cbir.server.security import check_bind_policy

    _read(args.tls_cert, "TLS certificate"), _read(args.tls_key, "TLS key")  # readable before any worker starts
    check_bind_policy(
        args.address,
        args.tls_cert is not None,
        args.token if args.token is not None else os.environ.get("CBIR_TOKEN") or None,
        args.insecure,
    )
    try:
        reserved = reserve_port(args.address)
        address = reserved.__enter__()
    except OSError as exc:
        print(f"cbir serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"cbir serve: listening on {address} with {args.processes} processes (loading...)", flush=True)

        def ready(infos) -> None:
            i0 = infos[0]
            print(
                f"cbir serve: SERVING {i0['count']} items ({i0['nbits']}-bit codes) on {address} "
                f"[{len(infos)} processes, pids {','.join(str(i['pid']) for i in infos)}; read-only]"
                f"{'' if i0['model'] else ' [no model: code/id queries only]'}",
                flush=True,
            )

        code = run_workers(args.processes, _worker, args, address, grace=args.grace, on_ready=ready)
    finally:
        reserved.__exit__(None, None, None)
    if code == 0:
        print("cbir serve: stopped", flush=True)
    return code


if __name__ == "__main__":  # pragma: no cover
    from cbir.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
