"""Bind-address policy, bearer-token interceptors and TLS credentials."""

from __future__ import annotations

import hmac
import ipaddress
import logging

import grpc
import grpc.aio

log = logging.getLogger(__name__)

__all__ = ["split_address", "is_loopback", "check_bind_policy", "TokenAuthInterceptor", "BearerTokenClientInterceptor"]

TOKEN_ENV = "CBIR_TOKEN"
# Health checks stay reachable without a token (load balancers, orchestrators).
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError(f"address {address!r} needs a port: [HOST]:PORT")
        port = rest[1:]
    else:
        host, sep, port = address.rpartition(":")
        if not sep or not host:
            raise ValueError(f"address {address!r} must be HOST:PORT")
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"bad port in address {address!r}") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"port out of range in address {address!r}")
    return host, p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or a wildcard: not provably loopback


def check_bind_policy(address: str, tls: bool, token: str | None, insecure: bool) -> None:
    """Refuse a non-loopback bind without TLS or a token unless ``insecure`` is explicit."""
    host, _ = split_address(address)
    if is_loopback(host):
        return
    if not (tls or token):
        if not insecure:
            raise ValueError(
                f"refusing to bind {address} (not loopback) without --tls-cert/--tls-key or a"
                f" bearer token (--token / ${TOKEN_ENV}); pass --insecure to do it anyway"
            )
        log.warning("serving %s without TLS or authentication (--insecure)", address)
    elif token and not tls:
        log.warning("bearer token on %s travels in clear text without TLS", address)


def _abort_handler(handler, message: str):
    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover

    # no request deserializer: the body of an unauthenticated call is never parsed
    kw = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call except health checks (asyncio server)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty token")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(UNAUTHENTICATED_PREFIXES):
            return await continuation(handler_call_details)
        got = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(got, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        log.info("rpc method=%s status=UNAUTHENTICATED", method.rsplit("/", 1)[-1])
        msg = "missing bearer token" if not got else "invalid bearer token"
        return _abort_handler(handler, msg)


class BearerTokenClientInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Client side: adds ``authorization: Bearer <token>`` to every unary call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, client_call_details, request):
        md = list(client_call_details.metadata or [])
        md.append(self._header)
        details = (
            client_call_details._replace(metadata=md)
            if hasattr(client_call_details, "_replace")
            else _Details(client_call_details, md)
        )
        return continuation(details, request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata):
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)
