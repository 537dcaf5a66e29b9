"""``cbir search``: query a running ``cbir serve`` and print the hits as a table."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MODES = ("lex", "hamming", "hybrid", "prefix")


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="query a cbir gRPC server",
                              description="Search a running `cbir serve` by image, code or id.")
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


def format_table(resp, nbits: int) -> str:
    rows = [("rank", "id", "hamming", "prefix", "code", "labels", "source")]
    for h in resp.hits:
        meta = dict(h.metadata.items()) if h.HasField("metadata") else {}
        labels = meta.get("labels", meta.get("label", ""))
        if hasattr(labels, "__iter__") and not isinstance(labels, str):
            labels = ",".join(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in labels)
        elif isinstance(labels, float) and labels.is_integer():
            labels = str(int(labels))
        code = _code_str(h.code.data, h.code.nbits) if h.HasField("code") else ""
        rows.append((str(h.rank), str(h.id), str(h.hamming_distance), str(h.common_prefix_length), code,
                     str(labels), str(meta.get("source", meta.get("path", "")))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    keep = [i for i in range(len(widths)) if i < 4 or any(r[i] for r in rows[1:])]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in keep).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * widths[i] for i in keep))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import grpc

    from cbir.server import connect
    from cbir.v1 import search_pb2 as pb

    if args.k < 1:
        print(f"cbir search: error: -k must be >= 1 (the number of hits to return), got {args.k}", file=sys.stderr)
        return 2
    if args.offset < 0:
        print(f"cbir search: error: --offset must be >= 0, got {args.offset}", file=sys.stderr)
        return 2
    token = args.token if args.token is not None else os.environ.get("CBIR_TOKEN") or None
    tls_ca = args.tls_ca.read_bytes() if args.tls_ca else None
    channel, stub = connect(args.address, token=token, tls_ca=tls_ca, tls=args.tls, server_name=args.server_name)
    mode = {"lex": pb.LEXICOGRAPHIC, "hamming": pb.HAMMING, "hybrid": pb.HYBRID, "prefix": pb.PREFIX}[args.mode]
    req = pb.SearchRequest(k=args.k, offset=args.offset, mode=mode, prefix_bits=args.prefix_bits,
                           label_filter=args.label, return_codes=True, return_metadata=True,
                           cursor=args.cursor.encode())
    if args.radius is not None:
        req.radius = args.radius
    try:
        if args.image is not None:
            req.image = args.image.read_bytes()
        elif args.id is not None:
            req.id = args.id
        else:
            try:
                data = bytes.fromhex(args.code)
            except ValueError:
                raise ValueError(f"--code must be hex, got {args.code!r}") from None
            nbits = args.nbits
            if nbits is None:
                nbits = stub.GetStats(pb.GetStatsRequest(), timeout=args.timeout).layout.nbits
            req.code.data, req.code.nbits = data, nbits
        t0 = time.perf_counter()
        resp = stub.Search(req, timeout=args.timeout)
        ms = (time.perf_counter() - t0) * 1e3
    except grpc.RpcError as e:
        print(f"cbir search: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return 0
    q = resp.query_code
    print(f"query code: {_code_str(q.data, q.nbits)} ({q.nbits} bits)")
    print(format_table(resp, q.nbits))
    extra = f"; next page: --cursor {resp.next_cursor.decode(errors='replace')}" if resp.next_cursor else ""
    print(f"{len(resp.hits)} hits ({args.mode}) in {ms:.1f} ms{extra}")
    return 0
