"""What a ``cbir bench`` run is given: :class:`BenchConfig`, and the query / database sets it
loads (:func:`load_bench_data`) with labels in one shared vocabulary."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("cbir.bench")

FORMAT = "cbir-bench/1"
DEFAULT_JITTER = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_OCCLUSION = (0.05, 0.1, 0.2, 0.3, 0.4)
DEFAULT_KS = (1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
SERVER_MAX_K = 10_000  # the server's default cap on k (mAP@all through it needs k = N)
PLOT_FILES = ("pr_curve.png", "precision_at_k.png", "retention.png", "bucket_sizes.png", "prefix_entropy.png")


@dataclass
class BenchConfig:
    """Everything that determines a ``cbir bench`` run (written into ``report.json``)."""

    model: str
    dataset: str | None = None  # named protocol / folder / manifest / .npz (split)
    queries: str | None = None  # a whole source used as queries ...
    database: str | None = None  # ... and a whole source used as the database
    data_root: str | None = None
    query_fraction: float = 0.1  # split of folders/manifests given as --dataset
    seed: int = 0
    k: int = 1000
    ks: Sequence[int] = DEFAULT_KS
    out: str | None = None
    index: str | None = None
    address: str | None = None
    allow_overlap: bool = False
    limit_queries: int | None = None
    limit_database: int | None = None
    robustness: bool = True
    robustness_images: int = 500
    jitter: Sequence[float] = DEFAULT_JITTER
    occlusion: Sequence[float] = DEFAULT_OCCLUSION
    plots: bool = True
    device: str = "auto"
    batch_size: int = 256
    num_workers: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.dataset is not None and (self.queries is not None or self.database is not None):
            raise ValueError("give either --dataset or --queries/--database, not both")
        if (self.queries is None) != (self.database is None):
            raise ValueError("--queries and --database go together (each a whole source)")
        if isinstance(self.k, bool) or int(self.k) < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        for name in ("limit_queries", "limit_database"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.address and self.limit_database is not None:
            raise ValueError("--address measures the server's whole index: --limit-database cannot be used with it")
        if self.robustness_images < 1:
            raise ValueError("robustness_images must be >= 1")
        if any(not 0 <= s <= 1 for s in self.occlusion):
            raise ValueError("occlusion strengths are area fractions in [0, 1]")
        if any(s < 0 for s in self.jitter):
            raise ValueError("jitter strengths must be >= 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("ks", "jitter", "occlusion"):
            d[key] = list(d[key])
        return d


# ============================================================================================
# data
# ============================================================================================
@dataclass
class BenchData:
    """The query and database sets of a run, labels already in one shared vocabulary."""

    query: Any  # ImageSet
    database: Any  # ImageSet
    query_labels: np.ndarray  # (Q,) int or (Q, L) uint8 multi-hot
    db_labels: np.ndarray
    class_names: tuple[str, ...]
    multilabel: bool
    name: str
    train_size: int | None
    query_source_size: int
    database_source_size: int
    source: dict = field(default_factory=dict)
    # positions of the query / database items in their whole source set (before the limits);
    # an index or server built for this database uses these positions as item ids
    query_positions: np.ndarray | None = None
    database_positions: np.ndarray | None = None


def _whole_source(src: str, root, image_size: int):
    """Every item of a data source as one ImageSet (train/database/query of its split)."""
    import torch

    from cbir.data import ImageSet, load_dataset

    sp = load_dataset(src, root=root, image_size=image_size)
    parts = [sp.train, sp.query]
    if sp.database is not sp.train and len(sp.database) != len(sp.train):
        parts.insert(1, sp.database)
    labels = np.concatenate([p.labels for p in parts])
    if all(p.in_memory for p in parts):
        return ImageSet(
            labels,
            sp.class_names,
            images=torch.cat([p.images for p in parts if p.images is not None]),
            multilabel=sp.multilabel,
            name=Path(src).stem or src,
        )
    if any(p.in_memory for p in parts):  # pragma: no cover - sources are all-files or all-memory
        raise ValueError(f"{src}: mixed in-memory and file-backed splits")
    paths = [x for p in parts for x in (p.paths or [])]  # all file-backed here
    return ImageSet(labels, sp.class_names, paths=paths, multilabel=sp.multilabel, name=Path(src).stem or src)


def _to_vocab(imageset, vocab: list[str], multilabel: bool) -> np.ndarray:
    """Labels of ``imageset`` re-expressed in the vocabulary ``vocab``."""
    pos = np.array([vocab.index(c) for c in imageset.class_names], dtype=np.int64)
    lab = imageset.labels
    if not multilabel:
        return pos[lab] if len(lab) else lab.astype(np.int64)
    out = np.zeros((len(imageset), len(vocab)), dtype=np.uint8)
    if imageset.multilabel:
        rows, cols = np.nonzero(lab)
        out[rows, pos[cols]] = 1
    else:
        out[np.arange(len(lab)), pos[lab]] = 1
    return out


def _limit(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Sorted random subset of ``limit`` positions out of ``n`` (None: all)."""
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[: int(limit)])


def load_bench_data(cfg: BenchConfig, image_size: int, model_dataset: str | None = None) -> BenchData:
    """Load the query and database sets named by ``cfg`` (``--dataset`` or
    ``--queries``/``--database``; neither: the model's training dataset), apply the limits."""
    from cbir.data import load_dataset

    source: dict[str, Any]
    if cfg.queries is not None:
        if cfg.database is None:
            raise ValueError("--queries and --database go together (each a whole source)")
        q_full = _whole_source(cfg.queries, cfg.data_root, image_size)
        d_full = _whole_source(cfg.database, cfg.data_root, image_size)
        vocab = list(q_full.class_names) + [c for c in d_full.class_names if c not in q_full.class_names]
        multilabel = q_full.multilabel or d_full.multilabel
        name = f"{q_full.name} -> {d_full.name}"
        train_size = None
        source = {"queries": cfg.queries, "database": cfg.database}
    else:
        dataset = cfg.dataset or model_dataset
        if dataset is None:
            raise ValueError("no data: pass --dataset NAME or --queries SRC --database SRC")
        sp = load_dataset(
            dataset, root=cfg.data_root, image_size=image_size, query_fraction=cfg.query_fraction, seed=cfg.seed
        )
        q_full, d_full = sp.query, sp.database
        vocab = list(sp.class_names)
        multilabel = sp.multilabel
        name = sp.name
        train_size = len(sp.train)
        source = {"dataset": dataset, "query_fraction": cfg.query_fraction, "seed": cfg.seed}
    qsel = _limit(len(q_full), cfg.limit_queries, cfg.seed)
    dsel = _limit(len(d_full), cfg.limit_database, cfg.seed + 1)
    query = q_full if qsel is None else q_full.subset(qsel)
    database = d_full if dsel is None else d_full.subset(dsel)
    return BenchData(
        query=query,
        database=database,
        query_labels=_to_vocab(query, vocab, multilabel),
        db_labels=_to_vocab(database, vocab, multilabel),
        class_names=tuple(vocab),
        multilabel=bool(multilabel),
        name=name,
        train_size=train_size,
        query_source_size=len(q_full),
        database_source_size=len(d_full),
        source=source,
        query_positions=np.arange(len(q_full), dtype=np.int64) if qsel is None else qsel.astype(np.int64),
        database_positions=np.arange(len(d_full), dtype=np.int64) if dsel is None else dsel.astype(np.int64),
    )


def item_keys(imageset, positions: np.ndarray) -> tuple[list[str], str]:
    """Identity keys for the overlap check: the resolved file path of a file-backed item, the
    SHA-1 of the raw ``uint8`` pixels of an in-memory item."""
    if imageset.in_memory:
        imgs = imageset.images
        return [hashlib.sha1(imgs[int(i)].numpy().tobytes()).hexdigest() for i in positions], "pixels"
    return [os.path.realpath(imageset.paths[int(i)]) for i in positions], "path"
