"""The asyncio client: :class:`AsyncCbirClient` (grpc.aio); every call is awaited."""

from __future__ import annotations

import asyncio
import time

from cbir.client import _common as C
from cbir.client.calls import Call, ClientCalls
from cbir.client.errors import DeadlineExceeded, Unavailable, error_from_rpc


class AsyncCbirClient(ClientCalls):
    """:class:`~cbir.client.CbirClient`'s API on ``grpc.aio`` (same arguments)::

        async with AsyncCbirClient(address) as c:
            res = await c.search(id=42, k=10)

    Create it inside the running event loop."""

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
        self.retries = 0
        self._metadata = C.auth_metadata(C.resolve_token(token))
        opts = C.channel_options(max_message_bytes, server_name, options)
        creds = C.credentials(tls, tls_ca, tls_cert, tls_key)
        self.channel = (
            grpc.aio.secure_channel(address, creds, opts) if creds else grpc.aio.insecure_channel(address, opts)
        )
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)

    async def _run(self, call: Call, timeout: float | None):
        import grpc

        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        method = getattr(self.stub, call.method)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"{call.method}: deadline passed after {attempt} UNAVAILABLE answers")
            try:
                return call.convert(await method(call.request, timeout=remaining, metadata=self._metadata))
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
            await asyncio.sleep(wait)
            attempt += 1
            self.retries += 1

    async def wait_ready(self, timeout: float = 10.0) -> "AsyncCbirClient":
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"{self.address} not reachable within {timeout} s") from None
        return self

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncCbirClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
