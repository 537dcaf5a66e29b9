"""Built-in methods; importing this package registers them (see cbir.models.registry)."""

from cbir.models.methods import ce, ddtl  # noqa: F401
