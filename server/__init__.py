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

import importlib

# Exports are imported on first use, so ``cbir.server.multiproc`` (the --processes supervisor)
# can be imported without grpc, the indexer or torch.
_EXPORTS = {
    "CbirServer": "app",
    "ServerOptions": "app",
    "connect": "app",
    "create_server": "app",
    "serve_in_process": "app",
    "IndexBackend": "backend",
    "open_backend": "backend",
    "MicroBatchEncoder": "encoder",
    "Limits": "validate",
    "SearchServicer": "service",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
