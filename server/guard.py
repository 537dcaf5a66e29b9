"""What stands between a hostile request and the servicer's work.

* :func:`parse_request`: the servicer's method handlers receive the *raw* request bytes (no
  gRPC deserializer), so that authentication (an interceptor, from metadata) is decided before
  any byte of the body is parsed, and a body that does not parse is an ``INVALID_ARGUMENT``
  with one WARNING line, never an ``UNKNOWN`` with a traceback;
* :class:`Budget`: the call's deadline, cancellation and CPU allowance (``time.thread_time`` of
  the offload thread doing its work), checked by long loops on the offload threads (a thread
  cannot be cancelled: it notices at its next check);
* :func:`response_bytes_bound`: an upper bound of a ``SearchResponse``'s size, known before any
  search runs, so an oversized answer is refused up front instead of after the work;
* :func:`log_level`: which statuses are the client's fault (WARNING) and which are ours;
* :class:`FaultPacer`: the answers to a peer's failed calls paced to a rate, so a client that
  keeps sending bad requests cannot make the server parse them as fast as it sends them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import grpc

__all__ = ["RpcError", "invalid", "Budget", "FaultPacer", "parse_request", "response_bytes_bound", "log_level"]

CLIENT_FAULTS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(msg: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def log_level(status: grpc.StatusCode) -> int:
    if status == grpc.StatusCode.OK:
        return logging.INFO
    if status in CLIENT_FAULTS:
        return logging.WARNING
    if status == grpc.StatusCode.INTERNAL:
        return logging.ERROR
    return logging.INFO  # DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE: the call's fate, not a fault


def parse_request(cls, raw) -> object:
    """``cls.FromString(raw)``; anything that does not parse is :func:`invalid` with the reason."""
    reason = None
    try:
        return cls.FromString(bytes(raw))
    except Exception as e:  # noqa: BLE001 - DecodeError (corrupt wire, bad UTF-8, nesting), ...
        reason = str(e) or type(e).__name__
    # raised outside the except block: no context, no traceback into the parser
    raise invalid(f"request is not a valid {cls.DESCRIPTOR.full_name} message ({len(raw)} bytes): {reason}")


class Budget:
    """A call's deadline (``time.monotonic()`` value or None), its cancellation flag and the CPU
    seconds its work may use on the thread that runs it (``cpu_limit``, None = unlimited)."""

    __slots__ = ("deadline", "cancelled", "cpu_limit", "_cpu0")

    def __init__(self, deadline: float | None = None, cpu_limit: float | None = None) -> None:
        self.deadline = deadline
        self.cancelled = False
        self.cpu_limit = cpu_limit
        self._cpu0: float | None = None

    @classmethod
    def of(cls, context, cpu_limit: float | None = None) -> "Budget":
        t = context.time_remaining()
        if t is None or t > 1e6:  # no deadline (gRPC reports a huge value)
            return cls(None, cpu_limit)
        if t <= 0:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return cls(time.monotonic() + t, cpu_limit)

    def start_work(self) -> None:
        """Called on the thread that does the work: CPU time is counted from here."""
        self._cpu0 = time.thread_time()

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def check(self) -> None:
        if self.cancelled:
            raise RpcError(grpc.StatusCode.CANCELLED, "call cancelled")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if self.cpu_limit is not None and self._cpu0 is not None and time.thread_time() - self._cpu0 > self.cpu_limit:
            raise RpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this call used more than {self.cpu_limit:g} s of CPU (the per-call work limit); "
                "split it into smaller calls",
            )


def _varint_len(v: int) -> int:
    return max(1, (int(v).bit_length() + 6) // 7)


def response_bytes_bound(r, k: int, nbits: int) -> int:
    """Upper bound of the serialized ``SearchResponse`` for request ``r`` asking ``k`` hits
    (metadata not counted: its size is only known once read; the built response is checked)."""
    nbytes = (nbits + 7) // 8
    code = 1 + _varint_len(nbytes + 8) + 1 + _varint_len(nbytes) + nbytes + 1 + _varint_len(nbits)
    hit = 10 + 2 * (1 + _varint_len(nbits)) + 1 + _varint_len(int(r.offset) + k)  # id, distances, rank
    if r.return_codes:
        hit += code
    if r.return_metadata:
        hit += 2
    hit += 1 + _varint_len(hit)  # the Hit's own tag and length
    return 8 + code + 2 + len(r.cursor) + 64 + k * hit


#: the statuses whose answers :class:`FaultPacer` paces: the request itself is at fault
#: (malformed, bad fields, over a per-call limit); not NOT_FOUND / ALREADY_EXISTS /
#: FAILED_PRECONDITION, which well-formed calls get in normal use
PACED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``, ``ipv6:[::1]:5``
    -> ``ipv6:[::1]``; anything else unchanged): one client, whatever its connection."""
    if peer.startswith(("ipv4:", "ipv6:")):
        head, sep, port = peer.rpartition(":")
        if sep and port.isdigit() and head not in ("ipv4", "ipv6"):
            return head
    return peer


class FaultPacer:
    """Paces the answers to each peer host's failed calls (:data:`PACED` statuses): a burst of
    ``burst`` is answered at once, beyond it at most ``rate`` per second (the generic cell rate
    algorithm); a failing answer that comes early waits its turn on the event loop
    (``asyncio.sleep``: no thread, no CPU), at most ``max_delay_s``. A client that keeps its bad
    requests in flight is then answered, and so can send again, only ``rate`` times a second,
    which bounds what parsing and rejecting them costs the server; well-formed calls are never
    delayed. ``max_peers`` hosts are remembered (least recently faulted forgotten first)."""

    def __init__(self, rate: float = 100.0, burst: int = 20, max_delay_s: float = 1.0, max_peers: int = 4096):
        if not rate > 0:
            raise ValueError(f"fault rate must be > 0 answers per second (0 turns pacing off upstream), got {rate}")
        if burst < 1:
            raise ValueError(f"fault burst must be >= 1, got {burst}")
        if not max_delay_s > 0:
            raise ValueError(f"max_delay_s must be > 0, got {max_delay_s}")
        self.interval = 1.0 / float(rate)
        self.tolerance = (burst - 1) * self.interval  # (burst faults at one instant: none waits)
        self.max_delay_s = float(max_delay_s)
        self.max_peers = int(max_peers)
        self._tat: OrderedDict[str, float] = OrderedDict()  # host -> theoretical arrival time
        self.paced = 0  # answers delayed so far

    def delay(self, peer: str, now: float | None = None) -> float:
        """Seconds the answer to a failed call of ``peer`` should wait (0: answer now); records
        the fault. Called on the event loop only (no lock)."""
        now = time.monotonic() if now is None else now
        host = peer_host(peer)
        tat = max(self._tat.pop(host, now), now)
        wait = min(max(0.0, tat - self.tolerance - now), self.max_delay_s)
        self._tat[host] = min(tat, now + self.tolerance + self.max_delay_s) + self.interval
        if len(self._tat) > self.max_peers:
            self._tat.popitem(last=False)
        if wait > 0:
            self.paced += 1
        return wait
