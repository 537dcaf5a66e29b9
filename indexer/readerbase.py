"""What the search mixins (:mod:`cbir.indexer.lexmodes`, :mod:`cbir.indexer.hamming`) need
from :class:`~cbir.indexer.reader.IndexReader`, declared once so a type checker can see it.

The attribute annotations and the ``TYPE_CHECKING`` method signatures create nothing at run
time; :class:`IndexReader` sets and defines them. Only :attr:`ReaderAttrs._live_env` is code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from cbir.codes import CodeLayout
    from cbir.indexer.derived import View
    from cbir.indexer.env import Env

T = TypeVar("T")


class ReaderAttrs:
    """The shared state of an open reader (see :meth:`IndexReader._open`)."""

    nbits: int
    nb: int
    layout: CodeLayout
    manifest: dict[str, Any]
    _count: int
    _env: Env | None  # None once released or closed

    @property
    def _live_env(self) -> Env:
        """The open LMDB environment; ``ValueError`` once the reader is closed."""
        env = self._env
        if env is None:
            raise ValueError("index reader is closed")
        return env

    if TYPE_CHECKING:

        def _with_txn(self, fn: Callable[[Any], T]) -> T: ...

        def _query(self, code: Any) -> np.ndarray: ...

        def _queries(self, codes: Any) -> np.ndarray: ...

        def _codes_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

        def ids_with_labels(self, labels: Any) -> np.ndarray: ...

        def derived(self) -> View: ...

        def _lex_view(self) -> View | None: ...
