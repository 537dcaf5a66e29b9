"""OS-level scheduling of the server's threads: names and priorities (Linux; no-ops elsewhere).

The server's threads do two kinds of work. The event loop (every RPC's parsing, validation and
response) and the *search* threads (single unfiltered HAMMING/HYBRID queries of modest k) are
what an ordinary query waits on; the *bulk* threads (BatchSearch, label-filtered and large-k
searches, writes, stats) and the image encoder (decoding untrusted image bytes and the model's
forward pass) do the expensive work a hostile client can ask for. The latter run at a lower OS
priority (a higher per-thread nice value, ``bulk_nice``): on a busy machine the kernel then runs
a cheap request's thread first, while the expensive work still gets every idle cycle.

Linux applies ``setpriority(PRIO_PROCESS, tid, n)`` to one thread (the kernel's tid, Python's
``threading.get_native_id()``). Only lowering priority is done: that needs no privilege and a
server started under ``nice`` keeps its offset (the value is added to the thread's current one).

Threads are also given OS names (``prctl(PR_SET_NAME)``, 15 bytes), so ``top -H`` and
``/proc/<pid>/task/*/comm`` show which thread uses the CPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

__all__ = ["name_thread", "lower_priority", "thread_setup"]

_PR_SET_NAME = 15
_libc = None


def name_thread(name: str) -> bool:
    """Give the calling thread the OS name ``name`` (first 15 bytes); False where unsupported."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        return _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def lower_priority(nice: int) -> int | None:
    """Add ``nice`` (>= 0) to the calling thread's nice value; returns the new value, or None
    where per-thread priorities are unsupported (not Linux) or the call failed."""
    if nice < 0:
        raise ValueError(f"nice must be >= 0 (only lowering priority is supported), got {nice}")
    if not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return None
    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        if nice:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, now + nice))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as e:  # e.g. a seccomp profile that forbids it: serve anyway
        log.warning("cannot lower the priority of thread %s by %d: %s", tid, nice, e)
        return None


def thread_setup(name: str, nice: int = 0):
    """A ``ThreadPoolExecutor`` initializer (or a thread's first call): OS name + priority."""

    def init() -> None:
        name_thread(name)
        lower_priority(nice)

    return init
