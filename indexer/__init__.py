"""cbir.indexer: the on-disk image index (LMDB lexicographic tree + MIH + FAISS binary).

An index is a directory (see :mod:`cbir.indexer.store`): one LMDB environment (the single
source of truth) with sub-databases ``tree`` (key = code bytes || 8-byte big-endian id, so the
B-tree order is the lexicographic code order of :mod:`cbir.codes`), ``codes`` (id -> code),
``meta`` (id -> JSON), ``conf`` (id -> float16 per-bit confidence), ``info`` (generation,
count) and ``log`` (generation -> keys added/deleted by that write); plus ``manifest.json``
(format version, CodeLayout, model content hash, counts, build parameters) and derived
accelerators (sorted codes/ids, exact multi-index hashing tables, FAISS IndexBinaryFlat; GPU
FAISS when ``faiss.get_num_gpus() > 0``) stamped with the LMDB generation they were built from,
persisted under ``derived/g<generation>`` (or rebuilt on open), and brought up to date after
writes by replaying ``log`` (rebuilt when the delta grows past ~2 % of N).

Public API
----------
``build_index(out_dir, ids, codes, meta=None, conf=None, layout=None, model_hash="",
build_params=None, overwrite=True, progress=False) -> pathlib.Path``
    Atomic bulk build (temp dir + rename; an interrupted build leaves the old index or none).
``open_index(path, readonly=True) -> IndexReader`` (same as ``IndexReader(path, readonly)``)
``IndexWriter(path, layout=None, model_hash="", build_params=None, create=True)``
    ``add(ids, codes, meta=None, conf=None) -> int``, ``upsert(...) -> int``,
    ``delete(ids) -> int``, ``update_meta(ids, meta) -> int``, ``count() -> int``,
    ``generation``, ``close()``; one LMDB transaction per call, map grows automatically.
``IndexReader`` (one consistent LMDB snapshot; ``refresh() -> bool`` moves to the newest):
    ``search_lex(code, k=10, offset=0, conf=None, conf_threshold=None, probe_budget=16)
    -> SearchResult`` (lexicographic order; optional uncertainty-aware wildcard probing)
    ``search_prefix(bits, limit=100, cursor=None) -> PrefixPage``
    ``search_hamming(code, k=None, radius=None, method="auto") -> SearchResult`` (exact;
    ``method`` in auto|mih|faiss|brute)
    ``search_hybrid(code, k=10, class_bits=None) -> SearchResult``
    ``*_batch(codes, ...) -> list[...]`` for each of the above,
    ``get(id) -> Item | None``, ``get_many(ids) -> list[Item | None]``, ``count()``,
    ``len()``, ``generation``, ``stats(coverage=True) -> dict``, ``close()``; and with
    ``readonly=False``: ``add``/``upsert``/``delete`` (write, then refresh).

A query ``code`` is a 1-row :class:`cbir.codes.Codes`, its packed bytes, or a (B,) 0/1 array.

Result types (:mod:`cbir.indexer.results`)
------------------------------------------
``SearchResult(ids: int64 (n,), codes: Codes (n rows), distances: int32 (n,) Hamming distance
to the query, prefix_lengths: int32 (n,) common-prefix length with the query, order: "lex" |
"hamming")``, best first; iterating yields ``(id, distance, prefix_length)``.
``PrefixPage(ids: int64 (n,), codes: Codes, next_cursor: str | None)`` in ascending code order.
``Item(id: int, code: Codes (1 row), meta: dict | None, conf: float32 (B,) | None)``.

Orders are exactly those of :func:`cbir.codes.rank` (lex: ascending ``q XOR c`` big-endian,
ties by id; hamming: distance, then lex), which the tests use as the reference.
"""

from cbir.indexer.build import build_index, compact_index
from cbir.indexer.env import FORMAT_VERSION, read_manifest
from cbir.indexer.reader import IndexReader, open_index
from cbir.indexer.results import Item, PrefixPage, SearchResult
from cbir.indexer.writer import IndexWriter

__all__ = [
    "FORMAT_VERSION",
    "IndexReader",
    "IndexWriter",
    "Item",
    "PrefixPage",
    "SearchResult",
    "build_index",
    "compact_index",
    "open_index",
    "read_manifest",
]
