"""Built-in methods; importing this package registers them (see cbir.models.registry)."""

from cbir.models.methods import ce, crpca, ddtl, dhhe, dmuh, hegh, itq, lsh, regu  # noqa: F401
