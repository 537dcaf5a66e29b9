"""Compatibility module: the index used to live here in one file; it is now split by
responsibility (see :mod:`cbir.indexer`). Import from :mod:`cbir.indexer` instead.

* :mod:`cbir.indexer.env` -- LMDB environment cache (fork rule, reader table) and manifest
* :mod:`cbir.indexer.rows` -- input validation, key/value byte layouts, labels of an item
* :mod:`cbir.indexer.writer` -- :class:`IndexWriter`, the bounded change log
* :mod:`cbir.indexer.build` -- atomic bulk build and compaction
* :mod:`cbir.indexer.reader` -- :class:`IndexReader` snapshot, derived views, items, labels
* :mod:`cbir.indexer.lexmodes` / :mod:`cbir.indexer.hamming` -- the search modes and the
  MIH-vs-FAISS choice; :mod:`cbir.indexer.stats` -- statistics
"""

from cbir.indexer.build import build_index, compact_index
from cbir.indexer.env import FORMAT_VERSION, read_manifest
from cbir.indexer.reader import IndexReader, open_index
from cbir.indexer.writer import IndexWriter

__all__ = [
    "FORMAT_VERSION",
    "IndexReader",
    "IndexWriter",
    "build_index",
    "compact_index",
    "open_index",
    "read_manifest",
]
