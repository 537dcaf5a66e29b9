"""cbir.indexer: the on-disk image index (LMDB lexicographic tree + MIH + FAISS binary).

An index is a directory: one LMDB environment (the single source of truth) with
sub-databases ``tree`` (key = code bytes || 8-byte big-endian id, so the B-tree order is the
lexicographic code order of :mod:`cbir.codes`), ``codes`` (id -> code; after a large bulk build
only the items written since, see ``CodeLookup``), ``meta`` (id -> JSON), ``conf`` (id ->
float16 per-bit confidence), ``labels`` (label posting list), ``info`` (generation, count) and
``log`` (generation -> keys added/deleted by that write, bounded in records and bytes); plus
``manifest.json`` and ``derived/g<generation>/`` (sorted codes/ids, id index, exact
multi-index-hashing tables, FAISS IndexBinaryFlat), built and saved with the index and
memory-mapped on open, brought up to date after writes by replaying ``log`` (rebuilt off the
snapshot lock when the delta grows past ~2 % of N).

Modules: ``env`` (environment cache, fork and reader-table rules, manifest), ``rows`` (key
layouts, validation, item labels), ``writer``, ``build`` (bulk build, compaction),
``reader`` (snapshot), ``lexmodes`` / ``hamming`` (search modes; the MIH-vs-FAISS choice is
``hamming.AutoPolicy``), ``derived``, ``mih``, ``faissidx``, ``lexarray`` (lex top-k on the
sorted base), ``lexsearch`` (lex on the LMDB tree), ``stats``,
``publish`` (atomic swaps that never delete a user's files), ``sharded`` (sharded indexes).

Public API
----------
``build_index(out_dir, ids, codes, meta=None, conf=None, layout=None, model_hash="",
build_params=None, overwrite=True, progress=False) -> pathlib.Path``
    Atomic bulk build (temp dir + rename; an interrupted build leaves the old index or none).
``compact_index(path) -> dict``: LMDB copy without free pages, swapped in atomically.
``build_sharded_index(out_dir, ids, codes, shards, meta=None, conf=None, layout=None, ...)``
    S (a power of two) complete indexes split by the leading log2 S code bits under one
    manifest, published atomically; ``shards=1`` is ``build_index``.
``open_index(path, readonly=True) -> IndexReader`` (same as ``IndexReader(path, readonly)``),
    or for a sharded index a read-only ``ShardedReader`` with the same search API whose
    results equal one index over the collection (``readonly=False``: ValueError).
``IndexWriter(path, layout=None, model_hash="", build_params=None, create=True)``
    ``add(ids, codes, meta=None, conf=None) -> int``, ``upsert(...) -> int``,
    ``delete(ids) -> int``, ``update_meta(ids, meta) -> int``, ``count() -> int``,
    ``generation``, ``close()``; one LMDB transaction per call, map grows automatically.
``IndexReader`` (one consistent LMDB snapshot; ``refresh() -> bool`` moves to the newest and
re-opens an index rebuilt or compacted in place; a reader opened before ``fork()`` raises
``ForkError`` in the child):
    ``search_lex(code, k=10, offset=0, conf=None, conf_threshold=None, probe_budget=16,
    cursor=None, labels=None) -> SearchResult`` (lexicographic order; ``cursor=""`` then
    ``result.next_cursor`` pages in O(k); optional uncertainty-aware wildcard probing)
    ``search_prefix(bits, limit=100, cursor=None, labels=None) -> PrefixPage``
    ``search_hamming(code, k=None, radius=None, method="auto", labels=None) -> SearchResult``
    (exact; ``method`` in auto|mih|faiss|brute)
    ``search_hybrid(code, k=10, class_bits=None, labels=None) -> SearchResult``
    ``*_batch(codes, ...) -> list[...]`` for each of the above (Hamming batches answered by
    FAISS are one call on all cores),
    ``ids_with_labels(labels) -> int64 ids`` (label posting list; ``labels=`` on the searches
    filters through it: an empty match returns at once, a selective one costs what it selects),
    ``get(id) -> Item | None``, ``get_many(ids) -> list[Item | None]``, ``count()``,
    ``len()``, ``generation``, ``stats(coverage=True) -> dict``, ``close()``; and with
    ``readonly=False``: ``add``/``upsert``/``delete``/``update_meta`` (write, then refresh).

Item labels are read from metadata ``labels`` (list) or ``label`` (one value): ``str(v)`` of
each value, plus the layout's class name for an integer class index.

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
from cbir.indexer.sharded import ShardedReader, build_sharded_index
from cbir.indexer.writer import IndexWriter

__all__ = [
    "FORMAT_VERSION",
    "IndexReader",
    "IndexWriter",
    "Item",
    "PrefixPage",
    "SearchResult",
    "ShardedReader",
    "build_index",
    "build_sharded_index",
    "compact_index",
    "open_index",
    "read_manifest",
]
