"""Distributed engines (optional: ``pip install -e ".[distributed]"``).

:mod:`cbir.distributed.ray_encode`: encode an :class:`~cbir.data.ImageSet` with Ray Data
(``cbir index build --engine ray``). Ray is imported only when one of these runs.
"""
