"""Where a benchmark's database codes and rankings can come from besides in-process encoding:
a running ``cbir serve`` (:class:`GrpcSearcher`) and an on-disk index (:func:`index_database`)."""

from __future__ import annotations

import os
import time

import numpy as np

from cbir.bench.robustness import encode_raw, raw_images
from cbir.codes import Codes

# ============================================================================================
# searchers for --address (the gRPC server) and --index
# ============================================================================================
class GrpcSearcher:
    """A :class:`cbir.metrics.Searcher` over a running ``cbir serve``: each chunk of queries is
    one ``BatchSearch`` call of code queries (``Search`` semantics per request) in ``order``.

    Returns the servers's item ids (pass ``db_ids`` to the metric functions to map them to
    database rows); rows are padded with ``-1``.
    """

    def __init__(self, address: str, order: str = "lex", token: str | None = None,
                 timeout: float = 120.0, max_batch: int = 256):
        self.address = address
        self.order = order
        self.token = token
        self.timeout = timeout
        self.max_batch = max_batch
        self._channel = None
        self._stub = None
        self.calls = 0
        self.wall_s = 0.0

    def _connect(self):
        if self._stub is None:
            from cbir.server import connect

            self._channel, self._stub = connect(self.address, token=self.token, max_message_bytes=64 << 20)
        return self._stub

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") and exc.code() else "ERROR"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise ValueError(f"server at {self.address}: {code}: {details}") from None

    def stats(self):
        from cbir.v1 import search_pb2 as pb

        return self._call(self._connect().GetStats, pb.GetStatsRequest())

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def search(self, query: Codes, k: int) -> np.ndarray:
        from cbir.v1 import search_pb2 as pb

        stub = self._connect()
        mode = pb.HAMMING if self.order == "hamming" else pb.LEXICOGRAPHIC
        out = np.full((len(query), int(k)), -1, dtype=np.int64)
        t0 = time.perf_counter()
        step = max(1, min(self.max_batch, 200_000 // max(1, int(k))))  # keep responses ~< 4 MB
        for s in range(0, len(query), step):
            reqs = [pb.SearchRequest(code=pb.Code(data=query.packed[i].tobytes(), nbits=query.nbits),
                                     k=int(k), mode=mode)
                    for i in range(s, min(s + step, len(query)))]
            resp = self._call(stub.BatchSearch, pb.BatchSearchRequest(requests=reqs))
            self.calls += 1
            for j, r in enumerate(resp.responses):
                ids = [h.id for h in r.hits][: int(k)]
                out[s + j, : len(ids)] = ids
        self.wall_s += time.perf_counter() - t0
        return out


def index_database(path: str, hasher, data, spot_check: int = 32) -> tuple[Codes, np.ndarray, np.ndarray, dict]:
    """Database codes read from a ``cbir index`` directory (:mod:`cbir.indexer`) instead of
    encoding the database.

    Index items are matched to the benchmark's database rows by their file path when the
    database is file-backed and every item's metadata has a ``path`` (as ``cbir index build``
    writes it), otherwise by id: the ids must be the positions of the items in the benchmark's
    whole database set (what ``cbir index build --dataset SRC`` assigns for the same ``SRC``).
    Index items that match no database row (e.g. outside ``--limit-database``) are ignored.
    The model content hash stored in the index must equal the model's, and a spot check
    re-encodes up to ``spot_check`` database images and compares them with the stored codes.

    Returns ``(codes, rows, ids, facts)``: the stored codes of the matched items in database
    order, their rows in ``data.database``, their index ids and facts for the report.
    """
    from cbir.indexer import open_index

    reader = open_index(path)
    try:
        if reader.nbits != hasher.nbits:
            raise ValueError(f"index {path} holds {reader.nbits}-bit codes, the model makes {hasher.nbits}-bit codes")
        if reader.model_hash and reader.model_hash != hasher.content_hash:
            raise ValueError(f"index {path} was built with model {reader.model_hash[:12]}, not "
                             f"{hasher.content_hash[:12]}; its codes are not this model's")
        # every item, through the public prefix scan (empty prefix = all, ascending code order)
        id_parts, code_parts, cursor = [], [], None
        while True:
            page = reader.search_prefix("", limit=65536, cursor=cursor)
            id_parts.append(np.asarray(page.ids, dtype=np.int64))
            code_parts.append(page.codes.packed)
            cursor = page.next_cursor
            if not cursor:
                break
        ids = np.concatenate(id_parts)
        packed = np.ascontiguousarray(np.concatenate(code_parts), dtype=np.uint8)
        count, model_hash = int(reader.count()), reader.model_hash
        metas = None
        if not data.database.in_memory and len(ids):
            metas = [it.meta if it is not None else None for it in reader.get_many(ids)]
    finally:
        reader.close()
    n_rows = len(data.database)
    if metas is not None and all(isinstance(m, dict) and m.get("path") for m in metas):
        matched_by = "path"
        row_of_path = {os.path.realpath(p): r for r, p in enumerate(data.database.paths)}
        rows = np.array([row_of_path.get(os.path.realpath(m["path"]), -1) for m in metas], dtype=np.int64)
    else:
        matched_by = "id"
        n_source = data.database_source_size
        if ids.size and (ids.min() < 0 or ids.max() >= n_source):
            raise ValueError(f"index {path}: item ids must be the positions 0..{n_source - 1} of the benchmark's "
                             f"database items (found ids {int(ids.min())}..{int(ids.max())}); build the index "
                             "from the same database source (`cbir index build --dataset SRC`)")
        row_of = np.full(n_source, -1, dtype=np.int64)
        row_of[data.database_positions] = np.arange(n_rows)
        rows = row_of[ids]
    keep = rows >= 0
    rows, packed, ids = rows[keep], packed[keep], ids[keep]
    order = np.argsort(rows, kind="stable")
    rows, packed, ids = rows[order], packed[order], ids[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]  # one index item per database row
    rows, packed, ids = rows[first], packed[first], ids[first]
    if len(rows) == 0:
        raise ValueError(f"index {path} holds none of the benchmark's database items (matched by {matched_by})")
    codes = Codes(packed, hasher.nbits)
    sample = np.unique(rows[np.linspace(0, len(rows) - 1, min(spot_check, len(rows))).astype(np.int64)])
    imgs, kept = raw_images(data.database, sample)
    if imgs:
        enc = encode_raw(hasher, imgs)
        stored = codes[np.searchsorted(rows, np.asarray(kept))]
        mismatched = int((enc.packed != stored.packed).any(axis=1).sum())
        if mismatched:
            raise ValueError(f"index {path}: {mismatched} of {len(kept)} spot-checked database images encode to "
                             "other codes than the index stores (built from other data or another model)")
    facts = {"path": str(path), "count": count, "model_hash": model_hash, "matched_by": matched_by,
             "used": int(len(rows)), "missing_from_index": int(n_rows - len(rows)), "spot_checked": len(kept)}
    return codes, rows, ids, facts
