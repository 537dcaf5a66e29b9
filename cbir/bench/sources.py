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
    """A :class:`cbir.metrics.Searcher` over a running ``cbir serve``, a thin adapter over
    :class:`cbir.client.CbirClient`: each chunk of queries is one ``BatchSearch`` of code queries
    in ``order``. A chunk the server refuses with RESOURCE_EXHAUSTED (its ``--max-hits-per-call``
    / ``--max-call-cpu-s`` limits) is halved and retried, down to one query per call.

    Returns the server's item ids (pass ``db_ids`` to the metric functions to map them to
    database rows); rows are padded with ``-1``. Server errors are ``ValueError``s naming the
    address and status.
    """

    def __init__(
        self,
        address: str,
        order: str = "lex",
        token: str | None = None,
        timeout: float = 120.0,
        max_batch: int = 256,
        client=None,
    ):
        self.address = address
        self.order = order
        self.token = token
        self.timeout = timeout
        self.max_batch = max_batch
        self._client = client
        self.calls = 0
        self.halvings = 0  # chunks halved after RESOURCE_EXHAUSTED
        self.wall_s = 0.0

    @property
    def client(self):
        if self._client is None:
            from cbir.client import CbirClient

            self._client = CbirClient(self.address, token=self.token, timeout=self.timeout)
        return self._client

    def _fail(self, exc) -> ValueError:
        return ValueError(f"server at {self.address}: {exc.code}: {exc.details}")

    def stats(self):
        from cbir.client import CbirError

        try:
            return self.client.stats()
        except CbirError as exc:
            raise self._fail(exc) from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def search(self, query: Codes, k: int) -> np.ndarray:
        from cbir.client import CbirError, ResourceExhausted, ids_matrix

        mode = "hamming" if self.order == "hamming" else "lex"
        out = np.full((len(query), int(k)), -1, dtype=np.int64)
        t0 = time.perf_counter()
        step = max(1, min(self.max_batch, 200_000 // max(1, int(k))))  # the server's default hit limit
        s = 0
        while s < len(query):
            e = min(s + step, len(query))
            try:
                res = self.client.batch_search(query[s:e], k=int(k), mode=mode)
            except ResourceExhausted as exc:
                if step == 1:
                    raise self._fail(exc) from None
                step = max(1, (e - s) // 2)
                self.halvings += 1
                continue
            except CbirError as exc:
                raise self._fail(exc) from None
            self.calls += 1
            out[s:e] = ids_matrix(res, int(k))
            s = e
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
            raise ValueError(
                f"index {path} was built with model {reader.model_hash[:12]}, not "
                f"{hasher.content_hash[:12]}; its codes are not this model's"
            )
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
            raise ValueError(
                f"index {path}: item ids must be the positions 0..{n_source - 1} of the benchmark's "
                f"database items (found ids {int(ids.min())}..{int(ids.max())}); build the index "
                "from the same database source (`cbir index build --dataset SRC`)"
            )
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
            raise ValueError(
                f"index {path}: {mismatched} of {len(kept)} spot-checked database images encode to "
                "other codes than the index stores (built from other data or another model)"
            )
    facts = {
        "path": str(path),
        "count": count,
        "model_hash": model_hash,
        "matched_by": matched_by,
        "used": int(len(rows)),
        "missing_from_index": int(n_rows - len(rows)),
        "spot_checked": len(kept),
    }
    return codes, rows, ids, facts
