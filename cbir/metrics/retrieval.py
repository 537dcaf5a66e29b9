"""Retrieval metrics: pure functions on :class:`cbir.codes.Codes` and label arrays.

Every definition used by ``cbir bench`` lives here or in :mod:`cbir.metrics.buckets` (Hamming-radius
metrics and tie-aware AP), in the function docstrings.

Conventions
-----------
* **Labels.** Single-label data: a 1-D array (``Q`` query labels, ``N`` database labels) of class
  ids (ints or strings); an item is *relevant* to a query when the labels are equal.
  Multi-label data: 2-D multi-hot arrays ``(Q, L)`` / ``(N, L)`` of 0/1 or bool; an item is
  relevant when it shares at least one label with the query.
* **Rankings.** Every ranking is one of the two total orders of :mod:`cbir.codes`:
  ``"lex"`` (ascending big-endian ``q XOR c``, ties by id) or ``"hamming"`` (ascending Hamming
  distance, then the lexicographic order, then id). The default backend,
  :class:`BruteForceSearcher`, reproduces :func:`cbir.codes.rank` exactly; any other backend
  (the LMDB/FAISS index, the gRPC server) is passed in as a :class:`Searcher`.
* **Ranked relevance** ``rel`` is a ``(Q, k)`` bool matrix: ``rel[q, i]`` is True when the item
  at rank ``i + 1`` of query ``q`` is relevant. A searcher may return fewer than ``k`` columns
  or pad a row with ``-1``; an empty slot is never relevant.
* Queries for which a metric is undefined (no relevant item, empty Hamming ball) score **0 and
  still count** in the mean, unless a docstring says otherwise.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from cbir.codes import ORDERS, Codes

__all__ = [
    "Searcher",
    "BruteForceSearcher",
    "relevance",
    "ranked_relevance",
    "relevant_counts",
    "average_precision_at_k",
    "average_precisions",
    "mean_average_precision",
    "precision_at_k",
    "recall_at_k",
    "check_overlap",
]

# Elements of a (queries x database) temporary processed at once (bounds memory per chunk).
_CHUNK_ELEMS = 1 << 21


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_codes(codes, name: str) -> Codes:
    if not isinstance(codes, Codes):
        raise ValueError(
            f"{name} must be a cbir.codes.Codes, got {type(codes).__name__}; "
            "wrap packed bytes with Codes(packed, nbits) or bits with Codes.from_bits(bits)"
        )
    return codes


def _check_k(k, n: int, name: str = "k") -> int:
    """``None`` -> ``n`` (the whole database); otherwise a positive int capped at ``n``."""
    if k is None:
        return n
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be a positive integer or None (whole database), got {k!r}")
    return min(int(k), n)


def _check_labels(labels, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 1:
        if labels.dtype.kind == "f":
            if not np.all(labels == np.round(labels)):
                raise ValueError(f"{name}: single-label classes must be integers or strings")
        return labels
    if labels.ndim == 2:
        if labels.dtype != np.bool_:
            if labels.size and not np.isin(labels, (0, 1)).all():
                raise ValueError(
                    f"{name}: a 2-D label array must be multi-hot 0/1 (one column per label); "
                    "for single-label data pass a 1-D array of class ids (e.g. labels.ravel())"
                )
            labels = labels.astype(np.bool_)
        return labels
    raise ValueError(f"{name} must be 1-D class ids or a 2-D multi-hot (n, L) array, got shape {labels.shape}")


def _check_label_pair(query_labels, db_labels) -> tuple[np.ndarray, np.ndarray]:
    ql = _check_labels(query_labels, "query_labels")
    dl = _check_labels(db_labels, "db_labels")
    if ql.ndim != dl.ndim:
        raise ValueError(
            f"query_labels is {ql.ndim}-D but db_labels is {dl.ndim}-D; use 1-D class ids for "
            "both (single-label) or 2-D multi-hot arrays for both (multi-label)"
        )
    if ql.ndim == 2 and ql.shape[1] != dl.shape[1]:
        raise ValueError(
            f"multi-hot label widths differ: queries have {ql.shape[1]} labels, database "
            f"{dl.shape[1]}; both must use the same label vocabulary"
        )
    return ql, dl


def _check_problem(query_codes, query_labels, db_codes, db_labels, *, need_db_codes=True):
    query_codes = _check_codes(query_codes, "query_codes")
    ql, dl = _check_label_pair(query_labels, db_labels)
    if len(query_codes) != len(ql):
        raise ValueError(
            f"query_codes has {len(query_codes)} codes but query_labels has {len(ql)} rows; "
            "they must describe the same queries in the same order"
        )
    if len(ql) == 0:
        raise ValueError("no queries: pass at least one query code and label")
    if db_codes is None:
        if need_db_codes:
            raise ValueError("db_codes is required here (only a searcher can replace it)")
    else:
        db_codes = _check_codes(db_codes, "db_codes")
        if len(db_codes) != len(dl):
            raise ValueError(
                f"db_codes has {len(db_codes)} codes but db_labels has {len(dl)} rows; they must "
                "describe the same database items in the same order"
            )
        if db_codes.nbits != query_codes.nbits:
            raise ValueError(
                f"query codes have {query_codes.nbits} bits but database codes "
                f"{db_codes.nbits}; encode both with the same model"
            )
    if len(dl) == 0:
        raise ValueError("empty database: pass at least one database code and label")
    return query_codes, ql, db_codes, dl


def _chunk_rows(n_cols: int, per_elem: int = 1) -> int:
    return max(1, _CHUNK_ELEMS // max(1, n_cols * per_elem))


# --------------------------------------------------------------------------------------------
# relevance
# --------------------------------------------------------------------------------------------
def relevance(query_labels, db_labels) -> np.ndarray:
    """``(Q, N)`` bool relevance matrix.

    ``rel[q, j]`` is True when database item ``j`` is relevant to query ``q``:
    same class for 1-D (single-label) labels; at least one shared label for 2-D multi-hot labels.
    """
    ql, dl = _check_label_pair(query_labels, db_labels)
    return _relevance(ql, dl)


def _relevance(ql: np.ndarray, dl: np.ndarray) -> np.ndarray:
    if ql.ndim == 1:
        return ql[:, None] == dl[None, :]
    return (ql.astype(np.float32) @ dl.astype(np.float32).T) > 0


def relevant_counts(query_labels, db_labels) -> np.ndarray:
    """``(Q,)`` int64: number of database items relevant to each query (chunked, low memory)."""
    ql, dl = _check_label_pair(query_labels, db_labels)
    out = np.empty(len(ql), dtype=np.int64)
    if ql.ndim == 1:
        vals, counts = np.unique(dl, return_counts=True)
        pos = np.searchsorted(vals, ql)
        pos_c = np.minimum(pos, len(vals) - 1)
        hit = (pos < len(vals)) & (vals[pos_c] == ql)
        out[:] = np.where(hit, counts[pos_c], 0)
        return out
    step = _chunk_rows(len(dl))
    dlf = dl.astype(np.float32).T
    for s in range(0, len(ql), step):
        out[s : s + step] = ((ql[s : s + step].astype(np.float32) @ dlf) > 0).sum(axis=1)
    return out


def ranked_relevance(query_labels, db_labels, ranking) -> np.ndarray:
    """``(Q, k)`` bool: relevance of the database item at each rank of each query.

    ``ranking`` is a ``(Q, k)`` int array of database positions (rows of ``db_labels``) best
    first; an entry ``< 0`` is an empty slot (the backend returned fewer than ``k`` items) and is
    never relevant.
    """
    ql, dl = _check_label_pair(query_labels, db_labels)
    return _ranked_rel(ql, dl, ranking)


def _ranked_rel(ql: np.ndarray, dl: np.ndarray, ranking) -> np.ndarray:
    ranking = np.asarray(ranking)
    if ranking.ndim != 2 or ranking.shape[0] != len(ql):
        raise ValueError(f"ranking must have shape ({len(ql)}, k) (one row per query), got {ranking.shape}")
    if ranking.size and ranking.max() >= len(dl):
        raise ValueError(
            f"ranking holds position {int(ranking.max())} but the database has {len(dl)} items; "
            "rankings must hold positions into db_labels (pass db_ids to map ids)"
        )
    valid = ranking >= 0
    safe = np.where(valid, ranking, 0)
    if ql.ndim == 1:
        rel = dl[safe] == ql[:, None]
    else:
        rel = np.empty(ranking.shape, dtype=np.bool_)
        step = _chunk_rows(ranking.shape[1], ql.shape[1])
        for s in range(0, len(ql), step):
            rel[s : s + step] = (dl[safe[s : s + step]] & ql[s : s + step, None, :]).any(axis=2)
    return rel & valid


# --------------------------------------------------------------------------------------------
# searchers
# --------------------------------------------------------------------------------------------
@runtime_checkable
class Searcher(Protocol):
    """A search backend: anything with ``search(query, k)``.

    ``search(query: Codes, k: int) -> np.ndarray`` returns a ``(len(query), k')`` integer array,
    ``k' <= k``, of database positions (or ids, see ``db_ids`` of the metric functions) best
    first. Rows may be padded with ``-1`` when fewer than ``k`` items are found. Metrics call it
    with chunks of queries.
    """

    def search(self, query: Codes, k: int) -> np.ndarray: ...


def _words(packed: np.ndarray) -> np.ndarray:
    """``(N, W)`` uint64 big-endian words of packed codes (most significant word first)."""
    n, nb = packed.shape
    w = (nb + 7) // 8
    buf = np.zeros((n, w * 8), dtype=np.uint8)
    buf[:, :nb] = packed
    return buf.view(">u8").astype(np.uint64).reshape(n, w)


class BruteForceSearcher:
    """Exact in-memory search in one of the engine's two orders (reference backend).

    ``BruteForceSearcher(db, order="lex" | "hamming", ids=None).search(query, k)`` returns the
    same ``(len(query), min(k, N))`` int64 positions into ``db`` as
    ``cbir.codes.rank(query, db, k, order, ids)``: ``"lex"`` = ascending big-endian
    ``q XOR c``, ties (identical codes) by ascending id; ``"hamming"`` = ascending Hamming
    distance, then ``q XOR c``, then id. ``ids`` (default: positions) only break ties.

    Vectorised over chunks of queries: codes are split into 64-bit big-endian words, the
    database is pre-sorted by id, and every row is sorted with a stable sort on the XOR words
    (one combined ``(distance << B) | xor`` key when ``B <= 57`` in Hamming order).
    ``k=None`` ranks the whole database.
    """

    def __init__(self, db: Codes, order: str = "lex", ids: np.ndarray | None = None) -> None:
        db = _check_codes(db, "db")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        n = len(db)
        if ids is None:
            perm = np.arange(n, dtype=np.int64)
        else:
            ids = np.asarray(ids)
            if ids.shape != (n,) or ids.dtype.kind not in "iu":
                raise ValueError(f"ids must be an integer array of shape ({n},), got {ids.shape}")
            perm = np.argsort(ids.astype(np.int64), kind="stable")
        self.db = db
        self.order = order
        self.nbits = db.nbits
        self._perm = perm
        self._words = _words(db.packed[perm])

    def __len__(self) -> int:
        return len(self.db)

    def search(self, query: Codes, k: int | None = None) -> np.ndarray:
        query = _check_codes(query, "query")
        if query.nbits != self.nbits:
            raise ValueError(
                f"query codes have {query.nbits} bits but the database {self.nbits}; encode both with the same model"
            )
        n = len(self.db)
        kk = 0 if n == 0 else _check_k(k, n)
        out = np.empty((len(query), kk), dtype=np.int64)
        if kk == 0 or len(query) == 0:
            return out
        qwords = _words(query.packed)
        nw = self._words.shape[1]
        step = _chunk_rows(n, nw)
        ham = self.order == "hamming"
        for s in range(0, len(query), step):
            x = qwords[s : s + step, None, :] ^ self._words[None, :, :]  # (c, N, W)
            if nw == 1 and (not ham or self.nbits <= 57):
                key = x[:, :, 0]
                if ham:
                    dist = np.bitwise_count(key).astype(np.uint64)
                    key = (dist << np.uint64(self.nbits)) | (key >> np.uint64(64 - self.nbits))
                idx = np.argsort(key, axis=1, kind="stable")
            else:
                keys = [x[:, :, j] for j in range(nw - 1, -1, -1)]  # last = most significant
                if ham:
                    keys.append(np.bitwise_count(x).sum(axis=2, dtype=np.int32))
                idx = np.lexsort(keys, axis=-1)
            out[s : s + step] = self._perm[idx[:, :kk]]
        return out


def _default_searcher(db_codes, searcher, order):
    if searcher is None:
        if db_codes is None:
            raise ValueError("pass db_codes (for the default BruteForceSearcher) or a searcher")
        return BruteForceSearcher(db_codes, order="lex" if order is None else order)
    if order is not None and order != getattr(searcher, "order", None):
        raise ValueError(
            "order only selects the default BruteForceSearcher; with a searcher, build the "
            "searcher in the order you want and leave order=None"
        )
    if not callable(getattr(searcher, "search", None)):
        raise ValueError("searcher must have a search(query: Codes, k: int) method")
    return searcher


def _id_map(db_ids, n: int):
    if db_ids is None:
        return None
    db_ids = np.asarray(db_ids)
    if db_ids.shape != (n,) or db_ids.dtype.kind not in "iu":
        raise ValueError(f"db_ids must be an integer array of shape ({n},) (id of each db row)")
    db_ids = db_ids.astype(np.int64)
    order = np.argsort(db_ids, kind="stable")
    sorted_ids = db_ids[order]
    if n > 1 and (np.diff(sorted_ids) == 0).any():
        raise ValueError("db_ids must be unique to map search results back to positions")
    return sorted_ids, order


def _search_positions(searcher, qcodes: Codes, k: int, n: int, id_map) -> np.ndarray:
    res = np.asarray(searcher.search(qcodes, k))
    if res.ndim != 2 or res.shape[0] != len(qcodes) or res.shape[1] > k:
        raise ValueError(f"searcher.search returned shape {res.shape}; expected ({len(qcodes)}, <= {k})")
    if res.dtype.kind not in "iu":
        raise ValueError(f"searcher.search must return integers, got {res.dtype}")
    res = res.astype(np.int64)
    valid = res >= 0
    if id_map is not None:
        sorted_ids, order = id_map
        pos = np.searchsorted(sorted_ids, res)
        pos_c = np.minimum(pos, n - 1)
        found = (pos < n) & (sorted_ids[pos_c] == res)
        if (valid & ~found).any():
            bad = res[valid & ~found][0]
            raise ValueError(f"searcher returned id {int(bad)} which is not in db_ids")
        res = np.where(valid, order[pos_c], -1)
    elif res.size and res.max() >= n:
        raise ValueError(
            f"searcher returned position {int(res.max())} for a database of {n} items; if it returns ids, pass db_ids"
        )
    if res.shape[1] > 1:
        srt = np.sort(np.where(valid, res, -1 - np.arange(res.shape[1])[None, :]), axis=1)
        if (np.diff(srt, axis=1) == 0).any():
            raise ValueError("searcher returned the same database item twice for one query")
    return res


def _iter_ranked(query_codes, ql, db_codes, dl, k, searcher, order, db_ids):
    """Yield ``(slice, rel (c, k'))`` over chunks of queries."""
    n = len(dl)
    kk = _check_k(k, n)
    srch = _default_searcher(db_codes, searcher, order)
    id_map = _id_map(db_ids, n)
    step = _chunk_rows(kk, 8)
    for s in range(0, len(ql), step):
        sl = slice(s, min(s + step, len(ql)))
        pos = _search_positions(srch, query_codes[sl], kk, n, id_map)
        yield sl, _ranked_rel(ql[sl], dl, pos), kk


# --------------------------------------------------------------------------------------------
# AP / mAP, P@k, R@k
# --------------------------------------------------------------------------------------------
def _check_rel(rel_ranked) -> np.ndarray:
    rel = np.asarray(rel_ranked)
    if rel.ndim != 2:
        raise ValueError(f"rel_ranked must be a (Q, k) array, got shape {rel.shape}")
    if rel.dtype != np.bool_:
        if rel.size and not np.isin(rel, (0, 1)).all():
            raise ValueError("rel_ranked must hold 0/1 or bool relevance flags")
        rel = rel.astype(np.bool_)
    return rel


def average_precision_at_k(rel_ranked) -> np.ndarray:
    """``(Q,)`` float64 AP@k of ranked relevance flags ``(Q, k)`` (DeepHash convention).

    ``AP@k = (1 / R_k) * sum_{i=1..k} P@i * rel_i``, where ``rel_i`` says whether the item at
    rank ``i`` is relevant, ``P@i`` is the fraction of relevant items among the first ``i`` and
    ``R_k = sum_{i<=k} rel_i`` is the number of relevant items *retrieved in the top k* (not the
    number in the database). A query with no relevant item in its top ``k`` scores 0 (and still
    counts in any mean). With ``k = N`` (whole database) ``R_k`` is the total number of relevant
    items, so this is the usual AP.
    """
    rel = _check_rel(rel_ranked)
    if rel.shape[1] == 0:
        return np.zeros(rel.shape[0])
    hits = np.cumsum(rel, axis=1, dtype=np.float64)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    num = (hits / ranks * rel).sum(axis=1)
    r = hits[:, -1]
    return np.divide(num, r, out=np.zeros_like(num), where=r > 0)


def average_precisions(
    query_codes: Codes,
    query_labels,
    db_codes: Codes | None,
    db_labels,
    k: int | None = None,
    *,
    searcher: Searcher | None = None,
    order: str | None = None,
    db_ids=None,
) -> np.ndarray:
    """``(Q,)`` per-query AP@k (see :func:`average_precision_at_k`) of a ranked search.

    Each query is ranked against the database by ``searcher`` (default:
    ``BruteForceSearcher(db_codes, order or "lex")``); ``k=None`` ranks the whole database
    (mAP@all, ``k = N``). With a searcher, ``order`` must be None or equal ``searcher.order``
    (the searcher decides the order); ``db_codes`` may then be None. If the searcher
    returns ids rather than positions, pass ``db_ids`` (id of each row of ``db_labels``).
    """
    query_codes, ql, db_codes, dl = _check_problem(
        query_codes, query_labels, db_codes, db_labels, need_db_codes=searcher is None
    )
    out = np.empty(len(ql))
    for sl, rel, _ in _iter_ranked(query_codes, ql, db_codes, dl, k, searcher, order, db_ids):
        out[sl] = average_precision_at_k(rel)
    return out


def mean_average_precision(
    query_codes: Codes,
    query_labels,
    db_codes: Codes | None,
    db_labels,
    k: int | None = None,
    *,
    searcher: Searcher | None = None,
    order: str | None = None,
    db_ids=None,
) -> float:
    """mAP@k: the mean over **all** queries of AP@k (:func:`average_precisions`).

    ``AP@k = (1/R_k) sum_{i<=k} P@i rel_i`` with ``R_k`` the relevant items in the top ``k``;
    a query with none scores 0 and counts. ``k=None`` = whole database (mAP@all).
    """
    return float(
        average_precisions(
            query_codes,
            query_labels,
            db_codes,
            db_labels,
            k,
            searcher=searcher,
            order=order,
            db_ids=db_ids,
        ).mean()
    )


def _check_ks(ks) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(ks))
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu" or (arr < 1).any():
        raise ValueError(f"ks must be one or more positive integers, got {ks!r}")
    return arr.astype(np.int64)


def precision_at_k(
    query_codes: Codes,
    query_labels,
    db_codes: Codes | None,
    db_labels,
    ks: Sequence[int] | int = (1, 10, 100, 1000),
    *,
    searcher: Searcher | None = None,
    order: str | None = None,
    db_ids=None,
) -> np.ndarray:
    """P@k curve: ``(len(ks),)`` mean over queries of ``(relevant items in the top k) / k``.

    The denominator is always ``k`` (an empty slot, e.g. when ``k > N`` or a backend returns
    fewer items, counts as not relevant). One search with ``max(ks)`` serves every ``k``.
    """
    kv, ql, _, chunks = _hits_at_ks(query_codes, query_labels, db_codes, db_labels, ks, searcher, order, db_ids)
    total = np.zeros(len(kv))
    for _, got in chunks:
        total += (got / kv[None, :]).sum(axis=0)
    return total / len(ql)


def _hits_at_ks(query_codes, query_labels, db_codes, db_labels, ks, searcher, order, db_ids):
    """Validate, then ``(ks, ql, dl, chunks)`` where ``chunks`` yields ``(query slice, got)`` with
    ``got[i, j]`` = relevant items in the top ``ks[j]`` of query ``i`` (one search at max(ks))."""
    ks = _check_ks(ks)
    query_codes, ql, db_codes, dl = _check_problem(
        query_codes, query_labels, db_codes, db_labels, need_db_codes=searcher is None
    )

    def chunks():
        for sl, rel, _ in _iter_ranked(query_codes, ql, db_codes, dl, int(ks.max()), searcher, order, db_ids):
            hits = np.concatenate([np.zeros((len(rel), 1)), np.cumsum(rel, axis=1)], axis=1)
            yield sl, hits[:, np.minimum(ks, rel.shape[1])]

    return ks, ql, dl, chunks()


def recall_at_k(
    query_codes: Codes,
    query_labels,
    db_codes: Codes | None,
    db_labels,
    ks: Sequence[int] | int = (1, 10, 100, 1000),
    *,
    searcher: Searcher | None = None,
    order: str | None = None,
    db_ids=None,
) -> np.ndarray:
    """Recall@k curve: ``(len(ks),)`` mean over queries of ``(relevant in top k) / R``.

    ``R`` is the number of relevant items in the whole database; a query with ``R = 0`` scores 0
    and still counts.
    """
    kv, ql, dl, chunks = _hits_at_ks(query_codes, query_labels, db_codes, db_labels, ks, searcher, order, db_ids)
    n_rel = relevant_counts(ql, dl).astype(np.float64)
    total = np.zeros(len(kv))
    for sl, got in chunks:
        r = n_rel[sl, None]
        total += np.divide(got, r, out=np.zeros_like(got), where=r > 0).sum(axis=0)
    return total / len(ql)


def check_overlap(query_ids_or_hashes, db_ids_or_hashes, allow: bool = False) -> np.ndarray:
    """Check that no query is also a database item.

    Arguments are sequences of ids or content hashes (ints or strings) identifying the query and
    database items. Returns the ``int64`` positions of the queries that also occur in the
    database (empty when none). Raises ``ValueError`` when there is any overlap, unless
    ``allow=True`` (e.g. a deliberate "database = queries" protocol).
    """
    q = list(np.asarray(query_ids_or_hashes).ravel().tolist())
    d = set(np.asarray(db_ids_or_hashes).ravel().tolist())
    hits = np.array([i for i, x in enumerate(q) if x in d], dtype=np.int64)
    if len(hits) and not allow:
        ex = q[int(hits[0])]
        raise ValueError(
            f"{len(hits)} of {len(q)} queries also appear in the database (e.g. {ex!r}); remove "
            "them from the database, or pass allow=True if this protocol is intended"
        )
    return hits
