"""Thin adapter between the gRPC servicer and the index (``cbir.indexer``).

The servicer only talks to :class:`IndexBackend`; everything that depends on the exact
``IndexReader`` API (argument names, result types, writer handles) lives here.

Consistency: writes (Add/Delete) are serialised by an exclusive lock. Every search is one call
on one ``IndexReader`` snapshot (cbir.indexer searches are atomic: one LMDB read transaction,
derived structures stamped with its generation, refreshed after each write), so a search never
sees half of an Add. For an index without that guarantee pass ``lock_reads=True``: searches
then hold a shared lock that excludes writes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cbir.codes import CodeLayout, Codes

__all__ = ["IndexBackend", "Result", "RWLock", "open_backend"]


class RWLock:
    """Many readers or one writer; writers are preferred (no writer starvation).

    ``with lock.read():`` / ``with lock.write():`` (plain context-manager objects, cheap enough
    for the per-search hot path).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._read = _Guard(self.acquire_read, self.release_read)
        self._write = _Guard(self.acquire_write, self.release_write)

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    def read(self) -> "_Guard":
        return self._read

    def write(self) -> "_Guard":
        return self._write


def _noop() -> None:
    pass


class _Guard:
    __slots__ = ("_enter", "_exit")

    def __init__(self, enter, exit_) -> None:
        self._enter, self._exit = enter, exit_

    def __enter__(self) -> None:
        self._enter()

    def __exit__(self, *exc) -> None:
        self._exit()


@dataclass
class Result:
    """One ranked result list: ``ids`` (int64) and their ``codes``, best first."""

    ids: np.ndarray
    codes: Codes
    next_cursor: bytes = b""
    distances: np.ndarray | None = None  # Hamming distance to the query, when the index gives it
    prefix_lengths: np.ndarray | None = None  # common-prefix length with the query, likewise


class NotFound(KeyError):
    pass


class AlreadyExists(ValueError):
    pass


def _as_result(res: Any, nbits: int) -> Result:
    """Normalise what an index search returns into :class:`Result` (duck-typed)."""
    codes = getattr(res, "codes", None)
    if type(codes) is Codes:  # fast path: cbir.indexer SearchResult / PrefixPage
        nc = getattr(res, "next_cursor", None)
        return Result(
            res.ids,
            codes,
            b"" if nc is None else _cursor_bytes(nc),
            getattr(res, "distances", None),
            getattr(res, "prefix_lengths", None),
        )
    cursor = b""
    if isinstance(res, tuple) and len(res) == 2 and not hasattr(res, "ids"):
        res, cursor = res[0], res[1]
    ids = getattr(res, "ids", None)
    codes = getattr(res, "codes", None)
    if ids is None:  # a list of hits
        hits = list(res)
        ids = [int(getattr(h, "id", h[0] if isinstance(h, tuple) else h)) for h in hits]
        codes = [getattr(h, "code", h[1] if isinstance(h, tuple) and len(h) > 1 else None) for h in hits]
    if getattr(res, "next_cursor", None) is not None:
        cursor = res.next_cursor
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if not isinstance(codes, Codes):
        rows = []
        for c in codes:
            rows.append(c.packed[0].tobytes() if isinstance(c, Codes) else bytes(c))
        codes = Codes.from_bytes(rows, nbits) if rows else Codes.empty(nbits)
    dist = getattr(res, "distances", None)
    cpl = getattr(res, "prefix_lengths", None)
    if dist is not None and len(dist) != len(ids):
        dist = None
    if cpl is not None and len(cpl) != len(ids):
        cpl = None
    return Result(ids, codes, _cursor_bytes(cursor), dist, cpl)


def _cursor_in(cursor: bytes) -> str | None:
    """A client's cursor bytes -> the index's opaque str cursor (``ValueError`` if not text)."""
    if not cursor:
        return None
    try:
        return bytes(cursor).decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("malformed cursor") from None


def _cursor_bytes(cursor: Any) -> bytes:
    if cursor is None:
        return b""
    if isinstance(cursor, str):
        return cursor.encode()
    if isinstance(cursor, (bytes, bytearray, memoryview)):
        return bytes(cursor)
    if isinstance(cursor, (int, np.integer)):
        return int(cursor).to_bytes(8, "big")
    raise TypeError(f"unsupported cursor type {type(cursor).__name__}")


class IndexBackend:
    """What the servicer needs from an index, in the one code format.

    ``reader``: an ``IndexReader`` (or anything with the same search API). ``writer``: the
    handle that has ``add/delete/upsert`` (may be the same object); ``None`` = read-only server.
    """

    def __init__(self, reader, writer=None, *, close=None, lock_reads: bool = False) -> None:
        self.reader = reader
        self.writer = writer
        self.read_only_reason = "index is open read-only"  # the status detail of a refused write
        self.lock = RWLock()
        self._read = self.lock.read() if lock_reads else _Guard(_noop, _noop)
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

            st = dataclasses.asdict(st) if dataclasses.is_dataclass(st) else dict(vars(st))
        return st

    def stats(self) -> dict:
        with self._read:
            return self._stats_dict()

    def get_codes(self, ids: Sequence[int]) -> Codes:
        """Stored codes of ``ids``; :class:`NotFound` names the first unknown id."""
        rows = []
        with self._read:
            for i in ids:
                rows.append(self._get_code(int(i)))
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

    def get_metadata(self, ids: Sequence[int]) -> list[dict | None]:
        out = []
        with self._read:
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
        cursor: bytes = b"",
    ) -> Result:
        """One query row; ``mode`` in lex|hamming|hybrid|prefix."""
        r = self.reader
        with self._read:
            if mode == "lex":
                res = r.search_lex(query, k, offset=offset)
            elif mode == "hamming":
                if radius is None:
                    res = r.search_hamming(query, k=offset + k)
                else:
                    res = r.search_hamming(query, k=offset + k, radius=radius)
                return _skip(_as_result(res, self.nbits), offset)
            elif mode == "hybrid":
                res = r.search_hybrid(query, offset + k)
                return _skip(_as_result(res, self.nbits), offset)
            elif mode == "prefix":
                res = r.search_prefix(query.prefix(prefix_bits), k, _cursor_in(cursor))
            else:
                raise ValueError(f"unknown mode {mode!r}")
            return _as_result(res, self.nbits)

    # writes ---------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Build the index's derived search structures now (not on the first query)."""
        derived = getattr(self.reader, "derived", None)
        if callable(derived):
            with self._read:
                derived()

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
        ids = np.asarray(ids, dtype=np.int64)
        with self.lock.write():
            if not upsert:
                for i in ids:
                    if self._exists(int(i)):
                        raise AlreadyExists(int(i))
            fn = self.writer.upsert if upsert else self.writer.add
            if conf is not None:
                fn(ids, codes, list(metas), conf)
            else:
                fn(ids, codes, list(metas))
        return len(ids)

    def delete(self, ids: Sequence[int], must_exist: bool) -> int:
        if self.writer is None:
            raise PermissionError(self.read_only_reason)
        ids = [int(i) for i in ids]
        with self.lock.write():
            present = [i for i in ids if self._exists(i)]
            if must_exist and len(set(present)) != len(set(ids)):
                missing = next(i for i in ids if i not in set(present))
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


def _skip(res: Result, offset: int) -> Result:
    if offset <= 0:
        return res
    return Result(
        res.ids[offset:],
        res.codes[offset:] if len(res.ids) > offset else Codes.empty(res.codes.nbits),
        res.next_cursor,
        None if res.distances is None else res.distances[offset:],
        None if res.prefix_lengths is None else res.prefix_lengths[offset:],
    )


def open_backend(index_dir, writable: bool = False) -> IndexBackend:
    """Open an on-disk index (``cbir.indexer.open_index``) behind an :class:`IndexBackend`."""
    from cbir.indexer import open_index  # type: ignore[attr-defined]

    reader = open_index(index_dir, readonly=not writable)
    writer = reader if writable else None
    close = getattr(reader, "close", None)
    return IndexBackend(reader, writer, close=close)
