"""cbir.server: the gRPC search service (``cbir.v1.SearchService``).

Public API::

    from cbir.server import create_server, serve_in_process, connect, ServerOptions

    server = create_server(index_dir_or_reader, hasher_or_model_path, "127.0.0.1:50051")
    ...; server.stop(grace=5)

    with serve_in_process(index_dir, model_path) as (address, stub):
        stub.Search(search_pb2.SearchRequest(code=..., k=10))

Stubs: ``cbir.v1.search_pb2`` / ``cbir.v1.search_pb2_grpc`` (regenerate with
``python -m cbir.server.gen_proto``).
"""

from .app import CbirServer, ServerOptions, connect, create_server, serve_in_process
from .backend import IndexBackend, open_backend
from .encoder import MicroBatchEncoder
from .service import Limits, SearchServicer

__all__ = [
    "CbirServer",
    "ServerOptions",
    "create_server",
    "serve_in_process",
    "connect",
    "IndexBackend",
    "open_backend",
    "MicroBatchEncoder",
    "Limits",
    "SearchServicer",
]
