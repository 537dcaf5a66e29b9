"""The blocking client: :class:`CbirClient`."""

from __future__ import annotations

import time

from cbir.client import _common as C
from cbir.client.calls import Call, ClientCalls
from cbir.client.errors import DeadlineExceeded, Unavailable, error_from_rpc


class CbirClient(ClientCalls):
    """A client of ``cbir serve``::

        with CbirClient("127.0.0.1:50051", token=...) as c:
            res = c.search(code=Codes.from_hex("1a2b", 16), k=10)   # res.ids: int64 array

    ``token`` (default ``$CBIR_TOKEN``) is sent as ``authorization: Bearer``; ``tls=True`` or
    ``tls_ca`` (PEM bytes or a path) selects TLS (``tls_cert``/``tls_key`` for a client
    certificate, ``server_name`` to verify another name); ``timeout`` is the default deadline
    per call in seconds; ``retry`` (:class:`RetryPolicy`) bounds the retries of UNAVAILABLE
    calls, the only status retried. Failures raise :class:`~cbir.client.errors.CbirError`
    subclasses (``InvalidArgument``, ``ResourceExhausted``, ...)."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca=None,
        tls_cert=None,
        tls_key=None,
        server_name: str | None = None,
        timeout: float = C.DEFAULT_TIMEOUT_S,
        retry: C.RetryPolicy | None = None,
        max_message_bytes: int = 64 * C.MiB,
        options=(),
    ) -> None:
        import grpc

        from cbir.v1 import search_pb2_grpc

        self.address = address
        self.timeout = float(timeout)
        self.retry = retry or C.RetryPolicy()
        self.retries = 0  # UNAVAILABLE answers retried so far
        self._metadata = C.auth_metadata(C.resolve_token(token))
        opts = C.channel_options(max_message_bytes, server_name, options)
        creds = C.credentials(tls, tls_ca, tls_cert, tls_key)
        self.channel = grpc.secure_channel(address, creds, opts) if creds else grpc.insecure_channel(address, opts)
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)

    def _run(self, call: Call, timeout: float | None):
        import grpc

        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        method = getattr(self.stub, call.method)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"{call.method}: deadline passed after {attempt} UNAVAILABLE answers")
            try:
                return call.convert(method(call.request, timeout=remaining, metadata=self._metadata))
            except grpc.RpcError as exc:
                err = error_from_rpc(exc)
            wait = self.retry.backoff(attempt)
            if (
                not isinstance(err, Unavailable)
                or not call.idempotent
                or attempt + 1 >= self.retry.attempts
                or time.monotonic() + wait >= deadline
            ):
                raise err
            time.sleep(wait)
            attempt += 1
            self.retries += 1

    def wait_ready(self, timeout: float = 10.0) -> "CbirClient":
        """Block until the channel is connected (raises :class:`Unavailable` after ``timeout``)."""
        import grpc

        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"{self.address} not reachable within {timeout} s") from None
        return self

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CbirClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
