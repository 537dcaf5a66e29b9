"""What the sync and asyncio clients share: channels, request builders, response conversion,
the retry schedule. Imports grpc, numpy, protobuf and ``cbir.codes`` only (never torch)."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from cbir.codes import CodeLayout, Codes

MiB = 1 << 20
MODES = ("lex", "hamming", "hybrid", "prefix")
DEFAULT_TIMEOUT_S = 30.0


@dataclass
class RetryPolicy:
    """UNAVAILABLE only: up to ``attempts`` tries in all, waiting ``initial_s * multiplier**i``
    (capped at ``max_s``, ±``jitter``) between them, never past the call's deadline."""

    attempts: int = 4
    initial_s: float = 0.1
    multiplier: float = 2.0
    max_s: float = 2.0
    jitter: float = 0.2

    def backoff(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * self.multiplier**attempt)
        return max(0.0, base * (1.0 + random.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True)
class PredictedClass:
    """One class of a query's prediction set: ``index`` (the model's class order), ``name`` and
    the ensemble's t-test ``confidence``."""

    index: int
    name: str
    confidence: float


@dataclass
class SearchResult:
    """One ranked answer: ``ids`` int64, ``hamming`` / ``prefix`` / ``rank`` (per hit), ``codes`` of
    the hits (when ``return_codes``), ``metadata`` dicts (when ``return_metadata``), the query's
    code and the prefix-mode ``next_cursor`` (``b""`` at the end).

    Image queries to a server whose model is an ensemble also carry the query's class answer:
    ``hardness`` (float in (0, 1]), ``idk`` ("I don't know": the prediction set is not exactly
    one class), ``prediction_set`` (:class:`PredictedClass` list, most confident first) and
    ``searched_prediction_set`` (the hits come from the prediction-set search). They are
    ``None`` (``False``) for code / id queries and single models."""

    ids: np.ndarray
    hamming: np.ndarray
    prefix: np.ndarray
    query_code: Codes | None
    rank: np.ndarray | None = None  # 0-based rank in the full ranking (offset included)
    codes: Codes | None = None
    metadata: list[dict] | None = None
    next_cursor: bytes = b""
    hardness: float | None = None
    idk: bool | None = None
    prediction_set: list[PredictedClass] | None = None
    searched_prediction_set: bool = False

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Stats:
    count: int
    layout: CodeLayout | None
    model_content_hash: str
    entropy: float
    unique_percent: float
    average_collisions: float
    prefix_entropy: list[float] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def nbits(self) -> int:
        return self.layout.nbits if self.layout is not None else 0


def pb():
    from cbir.v1 import search_pb2

    return search_pb2


def channel_options(max_message_bytes: int, server_name: str | None, extra: Iterable = ()) -> list:
    opts: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.max_send_message_length", int(max_message_bytes)),
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts + list(extra)


def credentials(tls: bool, tls_ca: bytes | str | os.PathLike | None, tls_cert=None, tls_key=None):
    """``grpc.ssl_channel_credentials`` when TLS is asked for (a CA file/bytes implies TLS)."""
    if not tls and tls_ca is None:
        return None
    import grpc

    def read(x):
        if x is None or isinstance(x, bytes):
            return x
        with open(x, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca), private_key=read(tls_key), certificate_chain=read(tls_cert)
    )


def auth_metadata(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def resolve_token(token: str | None) -> str | None:
    return token if token is not None else (os.environ.get("CBIR_TOKEN") or None)


def code_msg(codes: Codes, row: int = 0):
    return pb().Code(data=codes.packed[row].tobytes(), nbits=codes.nbits)


def as_codes(code: Any, nbits: int | None = None) -> Codes:
    """``Codes`` (one row or many), packed bytes + ``nbits``, or a hex string + ``nbits``."""
    if isinstance(code, Codes):
        return code
    if isinstance(code, str):
        data = bytes.fromhex(code)
    elif isinstance(code, (bytes, bytearray, memoryview)):
        data = bytes(code)
    else:
        raise TypeError(f"a code must be Codes, bytes or hex, not {type(code).__name__}")
    if nbits is None:
        nbits = 8 * len(data)
    return Codes(np.frombuffer(data, dtype=np.uint8).reshape(1, -1).copy(), int(nbits))


def search_request(
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
):
    """A ``SearchRequest``: exactly one of ``image`` (encoded file bytes), ``code`` (``Codes`` row
    0 / bytes / hex) or ``id``; ``query`` guesses which from its type (bytes = image).
    ``search_prediction_set``: an ensemble server searches every class of an IDK image query's
    prediction set (see the proto)."""
    P = pb()
    if query is not None:
        if isinstance(query, Codes) or isinstance(query, str):
            code = query
        elif isinstance(query, (bytes, bytearray, memoryview)):
            image = bytes(query)
        elif isinstance(query, (int, np.integer)):
            id = int(query)
        else:
            raise TypeError(f"a query is image bytes, Codes, a hex code or an id, not {type(query).__name__}")
    if sum(x is not None for x in (image, code, id)) != 1:
        raise ValueError("give exactly one of image, code or id")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    req = P.SearchRequest(
        k=int(k),
        offset=int(offset),
        prefix_bits=int(prefix_bits),
        mode={"lex": P.LEXICOGRAPHIC, "hamming": P.HAMMING, "hybrid": P.HYBRID, "prefix": P.PREFIX}[mode],
        label_filter=list(labels),
        return_codes=return_codes,
        return_metadata=return_metadata,
        cursor=cursor.encode() if isinstance(cursor, str) else bytes(cursor),
        search_prediction_set=bool(search_prediction_set),
    )
    if radius is not None:
        req.radius = int(radius)
    if image is not None:
        req.image = image
    elif id is not None:
        req.id = int(id)
    else:
        c = as_codes(code, nbits)
        req.code.CopyFrom(code_msg(c))
    return req


def batch_requests(queries: Any, **kw) -> list:
    """One ``SearchRequest`` per query: rows of a ``Codes``, or a sequence of image bytes / ids / codes."""
    if isinstance(queries, Codes):
        return [search_request(code=queries[i : i + 1], **kw) for i in range(len(queries))]
    return [search_request(q, **kw) for q in queries]


def intify(x: Any) -> Any:
    """JSON-like data with integral floats as ints: protobuf ``Struct`` numbers are doubles, so
    ids, labels and counts come back as ``3.0``; they are given back as ``3`` (below 2**53,
    where a double is exact). Dicts and lists are converted recursively."""
    if isinstance(x, float) and math.isfinite(x) and x.is_integer() and abs(x) < 2**53:
        return int(x)
    if isinstance(x, dict):
        return {k: intify(v) for k, v in x.items()}
    if isinstance(x, list):
        return [intify(v) for v in x]
    return x


def struct_dict(msg) -> dict:
    """A ``google.protobuf.Struct`` as plain JSON data (integral numbers as ints: :func:`intify`)."""
    from google.protobuf.json_format import MessageToDict

    return intify(MessageToDict(msg))


def codes_of(msgs) -> Codes | None:
    msgs = list(msgs)
    if not msgs:
        return None
    nbits = msgs[0].nbits
    nbytes = (nbits + 7) // 8
    packed = np.frombuffer(b"".join(m.data for m in msgs), dtype=np.uint8).reshape(len(msgs), nbytes)
    return Codes(packed.copy(), nbits)


def search_result(resp, return_codes: bool, return_metadata: bool) -> SearchResult:
    hits = resp.hits
    answer: dict[str, Any] = {}
    if resp.HasField("uncertainty"):
        u = resp.uncertainty
        answer = dict(
            hardness=float(u.hardness),
            idk=bool(u.idk),
            prediction_set=[PredictedClass(int(c.index), c.name, float(c.confidence)) for c in u.prediction_set],
            searched_prediction_set=bool(u.searched_prediction_set),
        )
    return SearchResult(
        ids=np.fromiter((h.id for h in hits), dtype=np.int64, count=len(hits)),
        hamming=np.fromiter((h.hamming_distance for h in hits), dtype=np.int32, count=len(hits)),
        prefix=np.fromiter((h.common_prefix_length for h in hits), dtype=np.int32, count=len(hits)),
        query_code=codes_of([resp.query_code]) if resp.HasField("query_code") else None,
        rank=np.fromiter((h.rank for h in hits), dtype=np.int64, count=len(hits)),
        codes=(codes_of([h.code for h in hits]) or Codes.empty(resp.query_code.nbits)) if return_codes else None,
        metadata=[struct_dict(h.metadata) if h.HasField("metadata") else {} for h in hits] if return_metadata else None,
        next_cursor=bytes(resp.next_cursor),
        **answer,
    )


def stats_of(resp) -> Stats:
    lay = resp.layout
    layout = None
    if resp.HasField("layout") and lay.nbits:
        layout = CodeLayout(
            nbits=lay.nbits,
            class_bits=lay.class_bits,
            depth=lay.depth,
            multilabel=lay.multilabel,
            class_names=tuple(lay.class_names),
            method=lay.method,
            **({"bit_order": lay.bit_order} if lay.bit_order else {}),
        )
    return Stats(
        count=int(resp.count),
        layout=layout,
        model_content_hash=resp.model_content_hash,
        entropy=resp.entropy,
        unique_percent=resp.unique_percent,
        average_collisions=resp.average_collisions,
        prefix_entropy=list(resp.prefix_entropy),
        details=struct_dict(resp.details) if resp.HasField("details") else {},
    )


def add_request(
    ids,
    codes: Codes | None = None,
    images: Sequence[bytes] | None = None,
    metadata: Sequence[dict | None] | None = None,
    upsert: bool = False,
    return_codes: bool = False,
):
    P = pb()
    ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
    if (codes is None) == (images is None):
        raise ValueError("give exactly one of codes or images")
    n = len(codes) if codes is not None else len(images or ())
    if n != len(ids) or (metadata is not None and len(metadata) != n):
        raise ValueError(
            f"{len(ids)} ids for {n} items" + ("" if metadata is None else f" and {len(metadata)} metadata")
        )
    items = []
    for j, i in enumerate(ids):
        it = P.Item(id=i)
        if codes is not None:
            it.code.CopyFrom(code_msg(codes, j))
        elif images is not None:
            it.image = images[j]
        if metadata is not None and metadata[j] is not None:
            it.metadata.update(metadata[j])
        items.append(it)
    return P.AddRequest(items=items, upsert=upsert, return_codes=return_codes)


def encoded(resp, return_confidence: bool):
    codes = codes_of([e.code for e in resp.codes])
    if codes is None:
        return Codes.empty(0), (np.zeros((0, 0), np.float32) if return_confidence else None)
    conf = np.array([list(e.confidence) for e in resp.codes], dtype=np.float32) if return_confidence else None
    return codes, conf


def ids_matrix(results: Sequence[SearchResult], k: int) -> np.ndarray:
    """``(len(results), k)`` int64 ids, rows padded with -1."""
    out = np.full((len(results), int(k)), -1, dtype=np.int64)
    for j, r in enumerate(results):
        ids = r.ids[: int(k)]
        out[j, : len(ids)] = ids
    return out
