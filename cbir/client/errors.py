"""Typed client exceptions, one per gRPC status code, all subclasses of :class:`CbirError`."""

from __future__ import annotations

__all__ = [
    "CbirError",
    "Cancelled",
    "UnknownError",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "InternalError",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
    "error_from_rpc",
]


class CbirError(Exception):
    """A failed call: ``code`` is the status name (``"INVALID_ARGUMENT"``), ``details`` the
    server's message; ``status`` the ``grpc.StatusCode`` when known."""

    code_name = "UNKNOWN"

    def __init__(self, details: str = "", status=None) -> None:
        super().__init__(f"{self.code_name}: {details}")
        self.details = details
        self.status = status

    @property
    def code(self) -> str:
        return self.code_name


def _make(name: str, code: str, doc: str) -> type[CbirError]:
    return type(name, (CbirError,), {"code_name": code, "__doc__": doc, "__module__": __name__})


Cancelled = _make("Cancelled", "CANCELLED", "The call was cancelled.")
UnknownError = _make("UnknownError", "UNKNOWN", "Unknown error.")
InvalidArgument = _make("InvalidArgument", "INVALID_ARGUMENT", "A malformed request (bad code, k, image...).")
DeadlineExceeded = _make("DeadlineExceeded", "DEADLINE_EXCEEDED", "The call's deadline passed.")
NotFound = _make("NotFound", "NOT_FOUND", "An id is not in the index.")
AlreadyExists = _make("AlreadyExists", "ALREADY_EXISTS", "An id is already in the index (use upsert).")
PermissionDenied = _make("PermissionDenied", "PERMISSION_DENIED", "The server refuses this operation.")
ResourceExhausted = _make(
    "ResourceExhausted",
    "RESOURCE_EXHAUSTED",
    "A per-call limit was exceeded (hits, CPU, pixels, message size): split the call.",
)
FailedPrecondition = _make(
    "FailedPrecondition",
    "FAILED_PRECONDITION",
    "The server cannot do this in its state (e.g. read-only, no model loaded).",
)
Aborted = _make("Aborted", "ABORTED", "The operation was aborted.")
OutOfRange = _make("OutOfRange", "OUT_OF_RANGE", "A value is out of range.")
Unimplemented = _make("Unimplemented", "UNIMPLEMENTED", "The server does not implement this call.")
InternalError = _make("InternalError", "INTERNAL", "A server fault.")
Unavailable = _make("Unavailable", "UNAVAILABLE", "The server cannot be reached (retried by the client).")
DataLoss = _make("DataLoss", "DATA_LOSS", "Unrecoverable data loss.")
Unauthenticated = _make("Unauthenticated", "UNAUTHENTICATED", "Missing or wrong bearer token.")

_BY_NAME = {
    cls.code_name: cls
    for cls in (
        Cancelled,
        UnknownError,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        InternalError,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_from_rpc(exc) -> CbirError:
    """The typed exception for a ``grpc.RpcError`` (sync or aio)."""
    status = exc.code() if callable(getattr(exc, "code", None)) else None
    name = status.name if status is not None else "UNKNOWN"
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return _BY_NAME.get(name, UnknownError)(details or "", status)
