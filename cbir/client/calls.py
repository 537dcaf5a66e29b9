"""Every RPC of the client as a :class:`Call` (method name, request, how to convert the answer,
whether UNAVAILABLE may be retried), so the sync and asyncio clients share one definition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from cbir.client import _common as C
from cbir.codes import Codes


@dataclass(frozen=True)
class Call:
    method: str
    request: Any
    convert: Callable[[Any], Any]
    idempotent: bool = True  # retried on UNAVAILABLE


class ClientCalls:
    """The public methods of :class:`~cbir.client.CbirClient` and :class:`~cbir.client.AsyncCbirClient`
    (awaitable there). ``timeout`` (seconds) overrides the client's default deadline; a call's
    retries all fit in that one deadline."""

    def _run(self, call: Call, timeout: float | None):  # pragma: no cover - defined by the clients
        raise NotImplementedError

    # --- searches --------------------------------------------------------------------------
    def search(
        self,
        query: Any = None,
        *,
        image: bytes | None = None,
        code: Any = None,
        id: int | None = None,
        nbits: int | None = None,
        k: int = 10,
        offset: int = 0,
        mode: str = "lex",
        prefix_bits: int = 0,
        radius: int | None = None,
        labels: Sequence[str] = (),
        return_codes: bool = False,
        return_metadata: bool = False,
        cursor: bytes | str = b"",
        search_prediction_set: bool = False,
        timeout: float | None = None,
    ):
        """One ranked search by image bytes, code (``Codes`` row 0, bytes or hex) or indexed id
        -> :class:`SearchResult` (numpy ids/distances, ``Codes``; with an ensemble model, the
        image query's hardness, IDK flag and prediction set). ``search_prediction_set``: an IDK
        image query searches every class of its prediction set (ensemble servers only)."""
        req = C.search_request(
            query,
            image=image,
            code=code,
            id=id,
            nbits=nbits,
            k=k,
            offset=offset,
            mode=mode,
            prefix_bits=prefix_bits,
            radius=radius,
            labels=labels,
            return_codes=return_codes,
            return_metadata=return_metadata,
            cursor=cursor,
            search_prediction_set=search_prediction_set,
        )
        return self._run(Call("Search", req, lambda r: C.search_result(r, return_codes, return_metadata)), timeout)

    def batch_search(
        self,
        queries: Any,
        *,
        k: int = 10,
        mode: str = "lex",
        timeout: float | None = None,
        return_codes: bool = False,
        return_metadata: bool = False,
        **kw,
    ):
        """One ``BatchSearch`` call: ``queries`` = a ``Codes`` (one query per row) or a sequence
        of image bytes / ids / codes -> list of :class:`SearchResult`."""
        reqs = C.batch_requests(
            queries, k=k, mode=mode, return_codes=return_codes, return_metadata=return_metadata, **kw
        )

        def convert(resp):
            return [C.search_result(r, return_codes, return_metadata) for r in resp.responses]

        return self._run(Call("BatchSearch", C.pb().BatchSearchRequest(requests=reqs), convert), timeout)

    # --- writes ----------------------------------------------------------------------------
    def add(
        self,
        ids,
        codes: Codes | None = None,
        *,
        images: Sequence[bytes] | None = None,
        metadata: Sequence[dict | None] | None = None,
        upsert: bool = False,
        return_codes: bool = False,
        timeout: float | None = None,
    ):
        """Add items by code or image -> the number added (and their ``Codes`` with ``return_codes``).
        Retried on UNAVAILABLE only with ``upsert`` (a repeated upsert is harmless)."""
        req = C.add_request(ids, codes, images, metadata, upsert, return_codes)

        def convert(resp):
            n = int(resp.added)
            return (n, C.codes_of(resp.codes)) if return_codes else n

        return self._run(Call("Add", req, convert, idempotent=upsert), timeout)

    def delete(self, ids, *, must_exist: bool = False, timeout: float | None = None):
        """Delete ids -> the number deleted (retried on UNAVAILABLE unless ``must_exist``)."""
        req = C.pb().DeleteRequest(
            ids=[int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)], must_exist=must_exist
        )
        return self._run(Call("Delete", req, lambda r: int(r.deleted), idempotent=not must_exist), timeout)

    # --- the rest --------------------------------------------------------------------------
    def stats(self, *, timeout: float | None = None):
        """The index's count, CodeLayout, model hash and coverage -> :class:`Stats`."""
        return self._run(Call("GetStats", C.pb().GetStatsRequest(), C.stats_of), timeout)

    def get_code(self, images: Sequence[bytes], *, return_confidence: bool = False, timeout: float | None = None):
        """Encode images on the server -> ``(Codes, confidence float32 (N, B) or None)``."""
        req = C.pb().GetCodeRequest(images=list(images), return_confidence=return_confidence)
        return self._run(Call("GetCode", req, lambda r: C.encoded(r, return_confidence)), timeout)

    def ping(self, *, timeout: float | None = None):
        """An empty round trip (raises when the server cannot answer)."""
        return self._run(Call("Ping", C.pb().PingRequest(), lambda r: None), timeout)
