"""Thin adapter between the gRPC servicer and the index (``cbir.indexer``).

The servicer only talks to :class:`IndexBackend`; everything that depends on the exact
``IndexReader`` API (argument names, result types, writer handles) lives here.

Consistency: writes (Add/Delete) are serialised by an exclusive lock. Every search is one call
on one ``IndexReader`` snapshot (cbir.indexer searches are atomic: one LMDB read transaction,
derived structures stamped with its generation, refreshed after each write), so a search never
sees half of an Add and takes no lock. Results are the index's own
:class:`cbir.indexer.SearchResult` (a prefix page is given its distances here).
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

from cbir.codes import CodeLayout, Codes
from cbir.indexer.results import PrefixPage, SearchResult, hamming_to, prefix_len_to

__all__ = ["IndexBackend", "AlreadyExists", "NotFound", "as_result", "open_backend", "skip"]


class NotFound(KeyError):
    pass


class AlreadyExists(ValueError):
    pass


def as_result(res: SearchResult | PrefixPage, query: Codes) -> SearchResult:
    """An index answer as a :class:`~cbir.indexer.SearchResult`: a prefix page (ids and codes in
    code order) gets its Hamming distances and common-prefix lengths to the query."""
    if isinstance(res, SearchResult):
        return res
    q, packed = query.packed[0], res.codes.packed
    return SearchResult(
        res.ids, res.codes, hamming_to(q, packed), prefix_len_to(q, packed, res.codes.nbits), "lex", res.next_cursor
    )


def skip(res: SearchResult, offset: int) -> SearchResult:
    """``res`` without its first ``offset`` hits (the cursor kept)."""
    if offset <= 0:
        return res
    return SearchResult(
        res.ids[offset:],
        res.codes[offset:] if len(res.ids) > offset else Codes.empty(res.codes.nbits),
        res.distances[offset:],
        res.prefix_lengths[offset:],
        res.order,
        res.next_cursor,
    )


def _cursor_in(cursor: bytes | str | None) -> str | None:
    """A client's cursor bytes -> the index's opaque str cursor (``ValueError`` if not text)."""
    if not cursor:
        return None
    if isinstance(cursor, str):
        return cursor
    try:
        return bytes(cursor).decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("malformed cursor") from None


class IndexBackend:
    """What the servicer needs from an index, in the one code format.

    ``reader``: an ``IndexReader`` (or anything with the same search API). ``writer``: the
    handle that has ``add/delete/upsert`` (may be the same object); ``None`` = read-only server.
    """

    def __init__(self, reader, writer=None, *, close=None) -> None:
        self.reader = reader
        self.writer = writer
        self.read_only_reason = "index is open read-only"  # the status detail of a refused write
        self._write_lock = threading.Lock()
        self._close = close
        layout = getattr(reader, "layout", None)
        if layout is None:
            st = self._stats_dict()
            lay = st.get("layout")
            layout = CodeLayout.from_dict(lay) if isinstance(lay, dict) else lay
        self.layout: CodeLayout | None = layout
        nbits = getattr(reader, "nbits", None) or (layout.nbits if layout is not None else None)
        if not nbits:
            raise ValueError("index does not report its bit count")
        self.nbits = int(nbits)

    # reads ----------------------------------------------------------------------------------
    @property
    def writable(self) -> bool:
        return self.writer is not None

    @property
    def model_content_hash(self) -> str:
        for name in ("model_content_hash", "content_hash", "model_hash"):
            v = getattr(self.reader, name, None)
            if isinstance(v, str):
                return v
        st = self._stats_dict()
        for name in ("model_content_hash", "content_hash", "model_hash"):
            if isinstance(st.get(name), str):
                return st[name]
        man = st.get("manifest")
        if isinstance(man, dict):
            for name in ("model_content_hash", "content_hash", "model_hash"):
                if isinstance(man.get(name), str):
                    return man[name]
        return ""

    def count(self) -> int:
        n = getattr(self.reader, "count", None)
        if callable(n):
            return int(n())
        if n is not None:
            return int(n)
        try:
            return int(len(self.reader))
        except TypeError:
            st = self._stats_dict()
            return int(st.get("count", st.get("n", 0)))

    def _stats_dict(self) -> dict:
        st = self.reader.stats()
        if not isinstance(st, dict):
            import dataclasses

            st = dataclasses.asdict(st) if dataclasses.is_dataclass(st) and not isinstance(st, type) else dict(vars(st))
        return st

    def stats(self) -> dict:
        return self._stats_dict()

    def get_codes(self, ids: Sequence[int]) -> Codes:
        """Stored codes of ``ids``; :class:`NotFound` names the first unknown id."""
        rows = [self._get_code(int(i)) for i in ids]
        return Codes.from_bytes(rows, self.nbits) if rows else Codes.empty(self.nbits)

    def _get_code(self, i: int) -> bytes:
        try:
            item = self.reader.get(i)
        except KeyError:
            item = None
        if item is None:
            raise NotFound(i)
        code = getattr(item, "code", item)
        if isinstance(code, dict):
            code = code["code"]
        if isinstance(code, tuple):
            code = code[0]
        return code.packed[0].tobytes() if isinstance(code, Codes) else bytes(code)

    def get_metadata(self, ids: Sequence[int] | np.ndarray) -> list[dict | None]:
        out: list[dict | None] = []
        for i in ids:
            try:
                item = self.reader.get(int(i))
            except KeyError:
                item = None
            meta = getattr(item, "meta", None)
            if meta is None:
                meta = getattr(item, "metadata", None)
            if meta is None and isinstance(item, dict):
                meta = item.get("meta", item.get("metadata"))
            if meta is None and isinstance(item, tuple) and len(item) > 1:
                meta = item[1]
            out.append(meta if isinstance(meta, dict) else None)
        return out

    def search(
        self,
        query: Codes,
        mode: str,
        k: int,
        offset: int = 0,
        radius: int | None = None,
        prefix_bits: int = 0,
        cursor: bytes | str | None = b"",
    ) -> SearchResult:
        """One query row; ``mode`` in lex|hamming|hybrid|prefix."""
        r = self.reader
        if mode == "lex":
            return as_result(r.search_lex(query, k, offset=offset), query)
        if mode == "hamming":
            if radius is None:
                res = r.search_hamming(query, k=offset + k)
            else:
                res = r.search_hamming(query, k=offset + k, radius=radius)
            return skip(as_result(res, query), offset)
        if mode == "hybrid":
            return skip(as_result(r.search_hybrid(query, offset + k), query), offset)
        if mode == "prefix":
            return as_result(r.search_prefix(query.prefix(prefix_bits), k, _cursor_in(cursor)), query)
        raise ValueError(f"unknown mode {mode!r}")

    # writes ---------------------------------------------------------------------------------
    def warmup(self, preload: bool = True) -> None:
        """Build the index's derived search structures now (not on the first query); with
        ``preload`` also fault in their pages (``IndexReader.preload``), so that queries read
        no page from disk and the resident memory does not grow with the first scans."""
        fn = getattr(self.reader, "preload" if preload else "derived", None)
        if not callable(fn):
            fn = getattr(self.reader, "derived", None)
        if callable(fn):
            fn()

    def add(
        self,
        ids: Sequence[int],
        codes: Codes,
        metas: Sequence[dict | None],
        upsert: bool,
        conf: np.ndarray | None = None,
    ) -> int:
        if self.writer is None:
            raise PermissionError(self.read_only_reason)
        arr = np.asarray(ids, dtype=np.int64)
        with self._write_lock:
            if not upsert:
                for i in arr:
                    if self._exists(int(i)):
                        raise AlreadyExists(int(i))
            fn = self.writer.upsert if upsert else self.writer.add
            if conf is not None:
                fn(arr, codes, list(metas), conf)
            else:
                fn(arr, codes, list(metas))
        return len(arr)

    def delete(self, ids: Sequence[int], must_exist: bool) -> int:
        if self.writer is None:
            raise PermissionError(self.read_only_reason)
        wanted = [int(i) for i in ids]
        with self._write_lock:
            present = [i for i in wanted if self._exists(i)]
            if must_exist and len(set(present)) != len(set(wanted)):
                missing = next(i for i in wanted if i not in set(present))
                raise NotFound(missing)
            if present:
                self.writer.delete(np.asarray(present, dtype=np.int64))
            return len(present)

    def _exists(self, i: int) -> bool:
        try:
            return self.reader.get(i) is not None
        except KeyError:
            return False

    def close(self) -> None:
        if self._close is not None:
            self._close()


def open_backend(index_dir, writable: bool = False) -> IndexBackend:
    """Open an on-disk index (``cbir.indexer.open_index``) behind an :class:`IndexBackend`."""
    from cbir.indexer import open_index

    reader = open_index(index_dir, readonly=not writable)
    writer = reader if writable else None
    close = getattr(reader, "close", None)
    return IndexBackend(reader, writer, close=close)
