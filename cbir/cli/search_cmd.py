"""``cbir search``: query a running ``cbir serve`` and print the hits as a table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODES = ("lex", "hamming", "hybrid", "prefix")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search", help="query a cbir gRPC server", description="Search a running `cbir serve` by image, code or id."
    )
    p.add_argument("--address", default="127.0.0.1:50051", help="server HOST:PORT (default: %(default)s)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", type=Path, help="image file to search with (encoded by the server)")
    q.add_argument("--code", help="query code as hex (ceil(B/8) bytes, bit 0 = MSB of the first byte)")
    q.add_argument("--id", type=int, help="search with the stored code of this indexed id")
    p.add_argument("--nbits", type=int, default=None, help="bits of --code (default: the index's)")
    p.add_argument("-k", type=int, default=10, help="hits, >= 1 (default: %(default)s)")
    p.add_argument("--offset", type=int, default=0, help="skip this many hits (default: %(default)s)")
    p.add_argument("--mode", choices=MODES, default="lex", help="ranking (default: %(default)s)")
    p.add_argument("--prefix-bits", type=int, default=0, help="prefix mode: leading bits that must match")
    p.add_argument("--cursor", default="", help="prefix mode: next-page cursor printed by the previous call")
    p.add_argument("--radius", type=int, default=None, help="hamming mode: all hits within this distance")
    p.add_argument("--label", action="append", default=[], help="keep only hits with this label (repeatable)")
    p.add_argument(
        "--prediction-set",
        action="store_true",
        help="ensemble servers, image queries: when the class answer is IDK, search every class of the "
        "prediction set and merge (lex mode)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--token", default=None, help="bearer token (default: $CBIR_TOKEN)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM CA certificate of a TLS server")
    p.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    p.add_argument("--server-name", default=None, help="TLS name to verify instead of the address host")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default: %(default)s)")
    p.set_defaults(func=run)


def _code_str(data: bytes, nbits: int) -> str:
    if nbits <= 64:
        return "".join(f"{b:08b}" for b in data)[:nbits]
    return data.hex()


def _labels_str(meta: dict) -> str:
    labels = meta.get("labels", meta.get("label", ""))
    if hasattr(labels, "__iter__") and not isinstance(labels, str):
        return ",".join(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in labels)
    if isinstance(labels, float) and labels.is_integer():
        return str(int(labels))
    return str(labels)


def format_table(res) -> str:
    """A :class:`cbir.client.SearchResult` as a text table."""
    rows = [("rank", "id", "hamming", "prefix", "code", "labels", "source")]
    for j in range(len(res)):
        meta = res.metadata[j] if res.metadata else {}
        code = _code_str(res.codes.packed[j].tobytes(), res.codes.nbits) if res.codes is not None else ""
        rows.append(
            (
                str(int(res.rank[j])),
                str(int(res.ids[j])),
                str(int(res.hamming[j])),
                str(int(res.prefix[j])),
                code,
                _labels_str(meta),
                str(meta.get("source", meta.get("path", ""))),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    keep = [i for i in range(len(widths)) if i < 4 or any(r[i] for r in rows[1:])]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in keep).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * widths[i] for i in keep))
    return "\n".join(lines)


def answer_line(res) -> str | None:
    """The class answer of an ensemble server (hardness, IDK, prediction set) as one line, or
    None when the result has none (code / id queries, single models)."""
    if res.prediction_set is None:
        return None
    classes = ", ".join(f"{c.name or c.index} ({c.confidence:.2f})" for c in res.prediction_set)
    head = "IDK" if res.idk else "sure"
    searched = "; hits from every class of the set" if res.searched_prediction_set else ""
    return f"class answer: {head}, hardness {res.hardness:.3f}, prediction set: {classes}{searched}"


def _answer_json(res) -> dict:
    return {
        "hardness": float(res.hardness),
        "idk": bool(res.idk),
        "prediction_set": [
            {"index": int(c.index), "name": c.name, "confidence": float(c.confidence)} for c in res.prediction_set
        ],
        "searched_prediction_set": bool(res.searched_prediction_set),
    }


def as_json(res) -> dict:
    hits = [
        {
            "rank": int(res.rank[j]),
            "id": int(res.ids[j]),
            "hamming_distance": int(res.hamming[j]),
            "common_prefix_length": int(res.prefix[j]),
            **({"code": res.codes.packed[j].tobytes().hex()} if res.codes is not None else {}),
            **({"metadata": res.metadata[j]} if res.metadata else {}),
        }
        for j in range(len(res))
    ]
    q = res.query_code
    out = {
        "query_code": {"hex": q.packed[0].tobytes().hex(), "nbits": q.nbits} if q is not None else None,
        "hits": hits,
        "next_cursor": res.next_cursor.decode(errors="replace"),
    }
    if res.prediction_set is not None:  # an ensemble's class answer of an image query
        out["uncertainty"] = _answer_json(res)
    return out


def run(args: argparse.Namespace) -> int:
    from cbir.client import CbirClient, CbirError

    if args.k < 1:
        print(f"cbir search: error: -k must be >= 1 (the number of hits to return), got {args.k}", file=sys.stderr)
        return 2
    if args.offset < 0:
        print(f"cbir search: error: --offset must be >= 0, got {args.offset}", file=sys.stderr)
        return 2
    query: dict = {}
    if args.image is not None:
        query["image"] = args.image.read_bytes()
    elif args.id is not None:
        query["id"] = args.id
    else:
        try:
            query["code"] = bytes.fromhex(args.code)
        except ValueError:
            raise ValueError(f"--code must be hex, got {args.code!r}") from None
    with CbirClient(
        args.address,
        token=args.token,
        tls=args.tls,
        tls_ca=args.tls_ca,
        server_name=args.server_name,
        timeout=args.timeout,
    ) as client:
        try:
            if "code" in query:
                query["nbits"] = args.nbits if args.nbits is not None else client.stats().nbits
            t0 = time.perf_counter()
            res = client.search(
                **query,
                k=args.k,
                offset=args.offset,
                mode=args.mode,
                prefix_bits=args.prefix_bits,
                radius=args.radius,
                labels=args.label,
                return_codes=True,
                return_metadata=True,
                cursor=args.cursor,
                search_prediction_set=args.prediction_set,
            )
            ms = (time.perf_counter() - t0) * 1e3
        except CbirError as e:
            print(f"cbir search: {e.code}: {e.details}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(as_json(res), indent=2))
        return 0
    q = res.query_code
    print(f"query code: {_code_str(q.packed[0].tobytes(), q.nbits)} ({q.nbits} bits)")
    line = answer_line(res)
    if line is not None:
        print(line)
    print(format_table(res))
    extra = f"; next page: --cursor {res.next_cursor.decode(errors='replace')}" if res.next_cursor else ""
    print(f"{len(res)} hits ({args.mode}) in {ms:.1f} ms{extra}")
    return 0
