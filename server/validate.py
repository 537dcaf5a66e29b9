"""Request validation and the per-call work limits of the search service.

:class:`Limits` are the server's bounds; :func:`validate_search` checks one ``SearchRequest``'s
fields (INVALID_ARGUMENT naming the field), :func:`check_work` refuses up front a call whose
ranked hits or response size exceed the limits (RESOURCE_EXHAUSTED: the same queries fit in
smaller calls) and :func:`check_size` checks a built response against the send limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from cbir.v1 import search_pb2 as pb

from .guard import RpcError, invalid, response_bytes_bound

__all__ = ["Limits", "MODE_NAMES", "INLINE_MODES", "check_count", "check_size", "check_work", "validate_search"]

MODE_NAMES = {pb.LEXICOGRAPHIC: "lex", pb.HAMMING: "hamming", pb.HYBRID: "hybrid", pb.PREFIX: "prefix"}
INLINE_MODES = frozenset({"lex", "prefix"})  # default: O(log N + k) cursor walks, served on the event loop


MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_k: int = 10_000
    max_batch: int = 10_000  # queries per BatchSearch, items per Add/Delete, images per GetCode
    max_offset: int = 1_000_000
    max_image_pixels: int = 4096 * 4096  # larger images are refused (memory / decompression bombs)
    max_request_pixels: int = 2 * 4096 * 4096  # all the images of one call together
    max_images_per_call: int = 256  # each costs a forward pass row whatever its size
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
    max_hits_per_call: int = 200_000  # sum of k + offset over the queries of one call
    max_filter_scan: int = 50_000  # items a label-filtered search may examine
    max_call_cpu_s: float = 2.0  # CPU seconds the offloaded search work of one call may use
    max_response_bytes: int = 16 * MiB  # the server's send limit


def check_count(limits: Limits, n: int, what: str) -> None:
    """At most ``limits.max_batch`` queries / items / ids / images in one call."""
    if n > limits.max_batch:
        raise invalid(f"too many {what}: {n} > limit {limits.max_batch}; split the call")


def validate_search(lim: Limits, r: pb.SearchRequest, nbits: int, where: str = "") -> tuple[str, int]:
    """The (mode name, k) of a search request, or INVALID_ARGUMENT naming the bad field."""
    k = r.k
    if k == 0:
        raise invalid(f"{where}k must be >= 1 (the number of hits to return; at most {lim.max_k})")
    if k > lim.max_k:
        raise invalid(f"{where}k={k} exceeds the limit {lim.max_k}")
    if r.offset > lim.max_offset:
        raise invalid(f"{where}offset={r.offset} exceeds the limit {lim.max_offset}")
    mode = MODE_NAMES.get(r.mode)
    if mode is None:
        raise invalid(f"{where}unknown search mode {r.mode}")
    if r.HasField("radius") and mode != "hamming":
        raise invalid(f"{where}radius is only valid in HAMMING mode")
    if mode == "prefix":
        if not 1 <= r.prefix_bits <= nbits:
            raise invalid(f"{where}prefix_bits must be in 1..{nbits}, got {r.prefix_bits}")
        if r.offset:
            raise invalid(f"{where}PREFIX mode pages with cursor, not offset")
    elif r.cursor:
        raise invalid(f"{where}cursor is only valid in PREFIX mode")
    return mode, k


def check_work(lim: Limits, reqs, params, nbits: int) -> None:
    """Refuse, before any search runs, a call whose ranked hits or response size exceed the
    per-call limits (RESOURCE_EXHAUSTED: the same queries fit in smaller calls)."""
    hits = sum(int(r.offset) + k for r, (_, k) in zip(reqs, params))
    if hits > lim.max_hits_per_call:
        raise RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this call asks for {hits} ranked hits (k + offset over its {len(reqs)} queries), over "
            f"the per-call work limit of {lim.max_hits_per_call}; split it into smaller calls",
        )
    size = sum(response_bytes_bound(r, k, nbits) for r, (_, k) in zip(reqs, params))
    if size > lim.max_response_bytes:
        raise RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the response could reach {size} bytes ({len(reqs)} queries, {hits} hits), over the "
            f"message limit of {lim.max_response_bytes} bytes; lower k, drop return_codes/"
            "return_metadata or split the call",
        )


def check_size(lim: Limits, resp) -> None:
    """The built response against the send limit (metadata is only known once read)."""
    n = resp.ByteSize()
    if n > lim.max_response_bytes:
        raise RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the response is {n} bytes, over the message limit of {lim.max_response_bytes} "
            "bytes; lower k, drop return_metadata or split the call",
        )
