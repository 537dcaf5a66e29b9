"""One search request against the index: plain, label-filtered (by the index's posting list or,
for an index without one, a bounded scan of the ranking) and its ``SearchResponse``.

Runs on the event loop (cheap modes) or on an offload thread; long loops check the call's
:class:`~cbir.server.guard.Budget` (deadline, cancellation, CPU) and the filter scan limit.
"""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np

from cbir.codes import Codes
from cbir.indexer.results import SearchResult, hamming_to, prefix_len_to
from cbir.v1 import search_pb2 as pb

from .backend import IndexBackend, as_result, skip
from .convert import code_to_pb, json_safe
from .guard import Budget, RpcError, invalid
from .validate import Limits

__all__ = ["search_one", "response"]


def search_one(
    backend: IndexBackend, lim: Limits, r: pb.SearchRequest, query: Codes, mode: str, k: int, budget: Budget
) -> pb.SearchResponse:
    """One validated search request against the index: its ``SearchResponse``."""
    radius = min(r.radius, backend.nbits) if r.HasField("radius") else None
    labels = set(r.label_filter)
    try:
        if not labels:
            res = backend.search(query, mode, k, r.offset, radius, r.prefix_bits, r.cursor)
            metas = backend.get_metadata(res.ids) if r.return_metadata else None
        else:
            res, metas = _filtered(backend, lim, query, mode, k, r, radius, labels, budget)
    except RpcError:
        raise
    except (ValueError, KeyError) as e:  # e.g. a malformed cursor
        raise invalid(f"bad search request: {e}") from None
    return response(r, query, res, metas, r.offset)


def _filtered(backend, lim: Limits, query, mode, k, r, radius, labels, budget):
    """Search with a label filter: page through the ranking until k matches (bounded)."""
    if getattr(backend.reader, "has_label_index", False):  # cbir.indexer: its label posting list
        return _filtered_by_index(backend, query, mode, k, r, radius, sorted(labels))
    class_names = backend.layout.class_names if backend.layout is not None else ()
    want = k + r.offset
    ids: list[int] = []
    rows: list[bytes] = []
    metas: list[dict | None] = []

    scanned = [0]

    def take(res: SearchResult) -> None:
        for at in range(0, len(res.ids), 1024):  # bounded: deadline, cancellation, scan limit
            budget.check()
            scanned[0] += min(1024, len(res.ids) - at)
            if scanned[0] > lim.max_filter_scan:
                raise RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the label filter examined {lim.max_filter_scan} items and found "
                    f"{len(ids)} of the {want} matches asked for (per-call scan limit); use a "
                    "smaller k/offset or a less selective filter",
                )
            for j, meta in enumerate(backend.get_metadata(res.ids[at : at + 1024]), at):
                if _labels_match(meta, labels, class_names) and len(ids) < want:
                    ids.append(int(res.ids[j]))
                    rows.append(res.codes.packed[j].tobytes())
                    metas.append(meta)

    cursor: bytes | str | None = None
    if mode == "prefix":
        cursor = bytes(r.cursor)
        while len(ids) < k:
            budget.check()
            res = backend.search(query, mode, k - len(ids), 0, None, r.prefix_bits, cursor)
            take(res)
            cursor = res.next_cursor
            if not cursor or len(res.ids) == 0:
                break
        want = k
    elif mode == "lex":
        page, pos = max(64, 2 * want), 0
        while len(ids) < want:
            budget.check()
            res = backend.search(query, mode, page, pos)
            take(res)
            pos += len(res.ids)
            if len(res.ids) < page:
                break
            page = min(page * 2, 1 << 20)
    else:
        total = backend.count()
        kk = max(64, 2 * want)
        while True:
            budget.check()
            ids.clear()
            rows.clear()
            metas.clear()
            scanned[0] = 0
            res = backend.search(query, mode, kk, 0, radius)
            take(res)
            if len(ids) >= want or len(res.ids) < kk or kk > total:
                break
            kk *= 4
    off = r.offset if mode != "prefix" else 0
    codes = Codes.from_bytes(rows[off:], backend.nbits) if len(rows) > off else Codes.empty(backend.nbits)
    q = query.packed[0]
    found = SearchResult(
        np.asarray(ids[off:], dtype=np.int64),
        codes,
        hamming_to(q, codes.packed),
        prefix_len_to(q, codes.packed, codes.nbits),
        "hamming" if mode in ("hamming", "hybrid") else "lex",
        cursor.decode("ascii") if isinstance(cursor, bytes) and cursor else (cursor or None),
    )
    return found, metas[off:]


def _filtered_by_index(backend, query, mode, k, r, radius, labels):
    """The index filters inside its search (cost ~ what the filter selects)."""
    ix, off = backend.reader, r.offset
    if mode == "lex":
        res, off = ix.search_lex(query, k, offset=off, labels=labels), 0
    elif mode == "hamming":
        res = ix.search_hamming(query, k=k + off, radius=radius, labels=labels)
    elif mode == "hybrid":
        res = ix.search_hybrid(query, k + off, labels=labels)
    else:
        cursor = bytes(r.cursor).decode("ascii") if r.cursor else None
        res, off = ix.search_prefix(query.prefix(r.prefix_bits), k, cursor, labels=labels), 0
    out = skip(as_result(res, query), off)
    if mode != "prefix" and out.next_cursor is not None:
        out = dataclasses.replace(out, next_cursor=None)
    return out, backend.get_metadata(out.ids) if r.return_metadata else None


def response(r, query: Codes, res: SearchResult, metas, offset: int) -> pb.SearchResponse:
    resp = pb.SearchResponse(query_code=code_to_pb(query), next_cursor=(res.next_cursor or "").encode())
    n = len(res.ids)
    if n == 0:
        return resp
    ham = res.distances.tolist()
    cpl = res.prefix_lengths.tolist()
    ids = res.ids.tolist()
    hits = resp.hits
    for j in range(n):
        h = hits.add(id=ids[j], hamming_distance=ham[j], common_prefix_length=cpl[j], rank=offset + j)
        if r.return_codes:
            h.code.data = res.codes.packed[j].tobytes()
            h.code.nbits = res.codes.nbits
        if r.return_metadata and metas is not None and metas[j]:
            h.metadata.update(json_safe(metas[j]))
    return resp


def _labels_match(meta: dict | None, wanted: set[str], class_names=()) -> bool:
    if not meta:
        return False
    vals = meta.get("labels", meta.get("label"))
    if vals is None:
        return False
    if not isinstance(vals, (list, tuple)):
        vals = [vals]
    for v in vals:
        if str(v) in wanted:
            return True
        if isinstance(v, int) and 0 <= v < len(class_names) and class_names[v] in wanted:
            return True
    return False
