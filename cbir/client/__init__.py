"""``cbir.client``: the client library of ``cbir serve`` (imports grpc, numpy, protobuf and
``cbir.codes``; never torch).

* :class:`CbirClient` (blocking) and :class:`AsyncCbirClient` (``grpc.aio``), one API:
  ``search`` (by image bytes, ``Codes``/bytes/hex code, or id), ``batch_search``, ``add``,
  ``delete``, ``stats``, ``get_code``, ``ping``; results are :class:`SearchResult` (numpy ids,
  Hamming distances, common-prefix lengths, ``Codes``; an ensemble server's class answer of an
  image query: hardness, IDK flag, prediction set of :class:`PredictedClass`) and :class:`Stats`.
* Failures raise a subclass of :class:`CbirError` named after the status code
  (``InvalidArgument``, ``NotFound``, ``Unauthenticated``, ``ResourceExhausted``,
  ``FailedPrecondition``, ``Unavailable``, ...), carrying ``code`` and ``details``.
* Only UNAVAILABLE is retried (:class:`RetryPolicy`: bounded attempts, exponential backoff with
  jitter, all within the call's deadline; writes only when idempotent).
"""

from cbir.client._common import PredictedClass, RetryPolicy, SearchResult, Stats, ids_matrix
from cbir.client.aio import AsyncCbirClient
from cbir.client.errors import *  # noqa: F401,F403
from cbir.client.errors import __all__ as _errors
from cbir.client.sync import CbirClient

__all__ = [
    "CbirClient",
    "AsyncCbirClient",
    "PredictedClass",
    "RetryPolicy",
    "SearchResult",
    "Stats",
    "ids_matrix",
    *_errors,
]
