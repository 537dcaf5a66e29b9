"""cbir: content-based image retrieval with deep, ordered binary hash codes."""

from cbir.codes import CodeLayout, Codes

__version__ = "0.1.0"
__all__ = ["Codes", "CodeLayout", "__version__"]
