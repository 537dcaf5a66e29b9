"""``cbir serve --processes N``: N server processes on one port (SO_REUSEPORT).

As in gRPC's multiprocessing example: the parent reserves the port with a socket bound with
``SO_REUSEPORT`` (never listening, so it takes no connections), then forks the workers **before
any gRPC, LMDB or torch state exists in it** (this module imports neither grpc nor the indexer);
each worker builds its own grpc.aio server with ``grpc.so_reuseport=1`` on that port, opens the
index read-only after the fork (the indexer's fork rule) and loads its own model. The kernel
spreads incoming connections over the workers (a connection, and so a client channel, stays
with one worker).

The parent supervises: it prints one SERVING line once every worker reports ready, forwards
SIGTERM/SIGINT to all of them (each drains its in-flight calls) and waits; if a worker dies, the
others are stopped and the parent exits 1 (let the service manager restart the group).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, Callable

log = logging.getLogger("cbir.server.multiproc")

__all__ = ["reserve_port", "run_workers", "split_address"]


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


@contextlib.contextmanager
def reserve_port(address: str):
    """Bind ``address`` (port 0 = a free port) with SO_REUSEPORT and yield ``HOST:PORT``."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot bind {address}: {exc}") from None
        port = sock.getsockname()[1]
        yield f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    finally:
        sock.close()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _child(target: Callable, args: Any, address: str, index: int, conn) -> None:
    _die_with_parent()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)
    code = 1
    try:
        code = int(target(args, address, index, lambda info: conn.send(("ready", info))) or 0)
    except BaseException as exc:  # reported to the parent, which prints it
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        code = 2
    finally:
        conn.close()
    os._exit(code)


def run_workers(
    n: int,
    target: Callable,
    args: Any,
    address: str,
    *,
    grace: float,
    ready_timeout: float = 600.0,
    on_ready: Callable[[list], None] | None = None,
) -> int:
    """Fork ``n`` workers running ``target(args, address, i, ready)`` (``ready(info)`` once it is
    SERVING; it returns after its own drain) and supervise them until SIGTERM/SIGINT."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs, conns = [], []
    for i in range(n):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(target, args, address, i, child_end), name=f"cbir-serve-{i}")
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    stopping = []

    def on_signal(signum, frame):  # noqa: ARG001
        log.info("received %s: stopping %d workers (grace %.1fs)", signal.Signals(signum).name, n, grace)
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        infos: dict[int, Any] = {}
        deadline = time.monotonic() + ready_timeout
        while len(infos) < n and not stopping:
            for i, c in enumerate(conns):
                if i in infos or not c.poll(0.05):
                    continue
                try:
                    kind, info = c.recv()
                except EOFError:
                    kind, info = "error", "exited before SERVING (its error is above)"
                if kind == "error":
                    raise RuntimeError(f"worker {i}: {info}")
                infos[i] = info
            if any(not p.is_alive() and i not in infos for i, p in enumerate(procs)) and not any(
                c.poll(0) for c in conns
            ):
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in infos]
                raise RuntimeError(f"worker {dead[0]} exited (code {procs[dead[0]].exitcode}) before SERVING")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n - len(infos)} workers not SERVING after {ready_timeout:.0f} s")
        if not stopping and on_ready is not None:
            on_ready([infos[i] for i in range(n)])
        while not stopping:
            dead = [i for i, p in enumerate(procs) if not p.is_alive()]
            if dead:
                print(
                    f"cbir serve: worker {dead[0]} (pid {procs[dead[0]].pid}) exited with code "
                    f"{procs[dead[0]].exitcode}; stopping the others",
                    file=sys.stderr,
                    flush=True,
                )
                code = 1
                break
            time.sleep(0.2)
    except RuntimeError as exc:
        print(f"cbir serve: error: {exc}", file=sys.stderr, flush=True)
        code = 2
    finally:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        end = time.monotonic() + grace + 15.0
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                log.warning("worker pid %d did not stop within the grace period: killed", p.pid)
                p.kill()
                p.join(5)
        for s, h in old.items():
            signal.signal(s, h)
        for c in conns:
            c.close()
    if code == 0 and any(p.exitcode not in (0, -signal.SIGTERM) for p in procs):
        code = 1
    return code
