"""``cbir bench`` reports: every retrieval, coverage and robustness figure of one model.

:func:`build_report` encodes the query and database sets with a model (or reads the database
codes from an index), computes every figure with :mod:`cbir.metrics` (nothing is re-defined
here; the definitions are the docstrings there) and :func:`write_report` writes

* ``report.json`` - everything (the schema is the dict returned by :func:`build_report`);
* ``report.md`` - the same figures as Markdown tables;
* PNG plots: ``pr_curve.png`` (precision-recall over Hamming radius), ``precision_at_k.png``,
  ``retention.png`` (hash-code retention vs prefix depth, colour jitter and occlusion),
  ``bucket_sizes.png`` (bucket-size histogram of the database codes) and
  ``prefix_entropy.png`` (entropy of the depth-``d`` prefixes).

Figures
-------
* Ranked retrieval, for both engine orders (``lex``: lexicographic; ``hamming``: Hamming then
  lexicographic then id): mAP@k, mAP@all, P@k and recall@k curves.
* **The headline: tie-aware mAP@k and mAP@all** for both orders (He et al., CVPR 2018):
  expected AP over all orders of tied items (lex: identical codes; Hamming: equal distance),
  independent of database order. The id-order mAP figures follow them: with many shared
  codes they move with database order alone, so they are never the headline.
* Hamming-ball retrieval: precision/recall for every radius ``r = 0..B``, and P@H<=2 with the
  fraction of queries whose radius-2 ball is empty (those score 0 and count).
* Coverage of the database codes (thesis Table 3.5): entropy, unique %, average collision
  count, per-depth prefix entropy and balance, per-bit balance, bit correlation; unique % and
  collisions beside what random codes give at the same N and B
  (:func:`cbir.metrics.random_expectation`; below the class prefix when there are class bits).
* Robustness (thesis §3.3.2): for colour jitter and occlusion of increasing strength, the
  fraction of query images whose code prefix of depth ``d`` is unchanged, for every ``d``.
  Perturbations are applied to the raw ``uint8`` pixels, then the model's eval transform.
* Run facts: train / query / database sizes, the overlap check (a query whose pixels (in-memory
  sets) or file (file-backed sets) also occur in the database is an error unless
  ``allow_overlap``), the model's content hash, wall times.

Relevance is "same class", or "at least one shared label" for multi-label data.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cbir.codes import Codes

__all__ = [
    "BenchConfig",
    "BenchData",
    "load_bench_data",
    "build_report",
    "write_report",
    "write_plots",
    "headline",
    "headline_table",
    "compare_rows",
    "compare_table",
    "run_compare",
    "GrpcSearcher",
    "find_models",
    "report_markdown",
    "robustness_report",
    "perturb_jitter",
    "perturb_occlusion",
    "FORMAT",
]

log = logging.getLogger("cbir.bench")

FORMAT = "cbir-bench/1"
DEFAULT_JITTER = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_OCCLUSION = (0.05, 0.1, 0.2, 0.3, 0.4)
DEFAULT_KS = (1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
SERVER_MAX_K = 10_000  # the server's default cap on k (mAP@all through it needs k = N)
PLOT_FILES = ("pr_curve.png", "precision_at_k.png", "retention.png", "bucket_sizes.png",
              "prefix_entropy.png")


@dataclass
class BenchConfig:
    """Everything that determines a ``cbir bench`` run (written into ``report.json``)."""

    model: str
    dataset: str | None = None          # named protocol / folder / manifest / .npz (split)
    queries: str | None = None          # a whole source used as queries ...
    database: str | None = None         # ... and a whole source used as the database
    data_root: str | None = None
    query_fraction: float = 0.1         # split of folders/manifests given as --dataset
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

    query: Any                      # ImageSet
    database: Any                   # ImageSet
    query_labels: np.ndarray        # (Q,) int or (Q, L) uint8 multi-hot
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
        return ImageSet(labels, sp.class_names, images=torch.cat([p.images for p in parts]),
                        multilabel=sp.multilabel, name=Path(src).stem or src)
    if any(p.in_memory for p in parts):  # pragma: no cover - sources are all-files or all-memory
        raise ValueError(f"{src}: mixed in-memory and file-backed splits")
    paths = [x for p in parts for x in p.paths]
    return ImageSet(labels, sp.class_names, paths=paths, multilabel=sp.multilabel,
                    name=Path(src).stem or src)


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

    if cfg.queries is not None:
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
        sp = load_dataset(dataset, root=cfg.data_root, image_size=image_size,
                          query_fraction=cfg.query_fraction, seed=cfg.seed)
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
        query=query, database=database,
        query_labels=_to_vocab(query, vocab, multilabel),
        db_labels=_to_vocab(database, vocab, multilabel),
        class_names=tuple(vocab), multilabel=bool(multilabel), name=name, train_size=train_size,
        query_source_size=len(q_full), database_source_size=len(d_full), source=source,
        query_positions=np.arange(len(q_full), dtype=np.int64) if qsel is None else qsel.astype(np.int64),
        database_positions=np.arange(len(d_full), dtype=np.int64) if dsel is None else dsel.astype(np.int64),
    )


def _item_keys(imageset, positions: np.ndarray) -> tuple[list[str], str]:
    """Identity keys for the overlap check: the resolved file path of a file-backed item, the
    SHA-1 of the raw ``uint8`` pixels of an in-memory item."""
    if imageset.in_memory:
        imgs = imageset.images
        return [hashlib.sha1(imgs[int(i)].numpy().tobytes()).hexdigest() for i in positions], "pixels"
    return [os.path.realpath(imageset.paths[int(i)]) for i in positions], "path"


# ============================================================================================
# robustness perturbations (raw uint8 CHW tensors in, uint8 CHW tensors out)
# ============================================================================================
def _hue_shift(x, shift):
    """Shift the hue of a float ``(n, 3, H, W)`` batch in [0, 1] by ``shift`` (``(n,)``, turns)."""
    import torch

    try:
        from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
    except ImportError:  # pragma: no cover - older/newer torchvision: per image, public API
        from torchvision.transforms.v2 import functional as TF

        return torch.stack([TF.adjust_hue(im, float(f)) for im, f in zip(x, shift)])
    hsv = _rgb_to_hsv(x)
    h, sat, v = hsv.unbind(dim=-3)
    h = (h + shift[:, None, None]).remainder(1.0)
    return _hsv_to_rgb(torch.stack([h, sat, v], dim=-3))


def _by_shape(images: list):
    """Group indices of same-shape images (so perturbations run as batches)."""
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    return groups.values()


def perturb_jitter(images: list, strength: float, rng: np.random.Generator) -> list:
    """Colour jitter of ``strength`` s on a list of ``uint8`` ``(3, H, W)`` tensors: per image,
    brightness, contrast and saturation factors drawn uniformly from ``[max(0, 1 - s), 1 + s]``
    and a hue shift from ``[-s/4, s/4]`` (at most half a turn), applied in that order with
    torchvision's definitions (contrast: blend with the mean grey level; saturation: blend
    with the grey image; hue: shift in HSV), computed in float and rounded back to ``uint8``."""
    import torch

    s = float(strength)
    n = len(images)
    lo, h = max(0.0, 1.0 - s), min(0.5, s / 4.0)
    fb, fc, fs = (torch.from_numpy(rng.uniform(lo, 1.0 + s, n)).float() for _ in range(3))
    fh = torch.from_numpy(rng.uniform(-h, h, n)).float()
    out: list = [None] * n
    if s == 0:
        return [im.clone() for im in images]
    w = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
    for idx in _by_shape(images):
        ii = torch.tensor(idx)
        x = torch.stack([images[i] for i in idx]).float() / 255.0
        v = lambda f: f[ii].view(-1, 1, 1, 1)  # noqa: E731
        x = (x * v(fb)).clamp_(0, 1)
        grey = (x * w).sum(dim=1, keepdim=True)
        x = (v(fc) * x + (1 - v(fc)) * grey.mean(dim=(1, 2, 3), keepdim=True)).clamp_(0, 1)
        grey = (x * w).sum(dim=1, keepdim=True)
        x = (v(fs) * x + (1 - v(fs)) * grey).clamp_(0, 1)
        if h > 0:
            x = _hue_shift(x, fh[ii])
        y = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        for j, i in enumerate(idx):
            out[i] = y[j]
    return out


def perturb_occlusion(images: list, strength: float, rng: np.random.Generator) -> list:
    """Occlusion of ``strength`` a on a list of ``uint8`` ``(3, H, W)`` tensors: per image, a
    black square covering the fraction ``a`` of the image area (side ``round(sqrt(a H W))``,
    clipped to the image) at a uniformly random position."""
    out = []
    for img in images:
        o = img.clone()
        _, hh, ww = o.shape
        side = int(round(np.sqrt(float(strength) * hh * ww)))
        sh, sw = min(side, hh), min(side, ww)
        if sh and sw:
            y = int(rng.integers(0, hh - sh + 1))
            x = int(rng.integers(0, ww - sw + 1))
            o[:, y : y + sh, x : x + sw] = 0
        out.append(o)
    return out


def _raw_images(imageset, positions) -> tuple[list, list[int]]:
    """Raw ``uint8`` CHW tensors of the readable items among ``positions``."""
    from torchvision.transforms.v2 import functional as TF

    from cbir.data import CorruptImageError

    imgs, kept = [], []
    for i in positions:
        i = int(i)
        if imageset.in_memory:
            imgs.append(imageset.images[i])
        else:
            try:
                imgs.append(TF.pil_to_tensor(imageset.get_pil(i)))
            except CorruptImageError:
                continue
        kept.append(i)
    return imgs, kept


def _encode_raw(hasher, imgs: list, chunk: int = 256) -> Codes:
    parts = [hasher.encode_tensor(hasher.preprocess(imgs[s : s + chunk]))[0]
             for s in range(0, len(imgs), chunk)]
    return Codes.concat(parts) if parts else Codes.empty(hasher.nbits)


def robustness_report(hasher, imageset, positions, jitter, occlusion, seed: int = 0,
                      progress: bool = True) -> dict:
    """Hash-code retention (:func:`cbir.metrics.code_retention`) per depth for every strength
    of colour jitter and occlusion, on the query images at ``positions``."""
    from tqdm.auto import tqdm

    from cbir.metrics import bit_flip_rate, code_retention

    imgs, kept = _raw_images(imageset, positions)
    if not imgs:
        return {"n_images": 0, "jitter": [], "occlusion": []}
    clean = _encode_raw(hasher, imgs)
    out: dict[str, Any] = {"n_images": len(imgs), "seed": seed,
                           "definition": "retention[d-1] = fraction of images whose first d bits "
                                         "are unchanged by the perturbation (cbir.metrics.code_retention)"}
    jobs = [("jitter", s, perturb_jitter) for s in jitter] + [("occlusion", s, perturb_occlusion) for s in occlusion]
    bar = tqdm(jobs, desc="robustness", unit="level", disable=not progress, leave=False)
    for li, (kind, s, fn) in enumerate(bar):
        rng = np.random.default_rng([seed, li])
        pert = _encode_raw(hasher, fn(imgs, s, rng))
        ret = code_retention(clean, pert)
        out.setdefault(kind, []).append({
            "strength": float(s),
            "retention": [float(v) for v in ret],
            "bit_flip_rate": [float(v) for v in bit_flip_rate(clean, pert)],
        })
    out.setdefault("jitter", [])
    out.setdefault("occlusion", [])
    return out


# ============================================================================================
# searchers for --address (the gRPC server) and --index
# ============================================================================================
class GrpcSearcher:
    """A :class:`cbir.metrics.Searcher` over a running ``cbir serve``: each chunk of queries is
    one ``BatchSearch`` call of code queries (``Search`` semantics per request) in ``order``.

    Returns the servers's item ids (pass ``db_ids`` to the metric functions to map them to
    database rows); rows are padded with ``-1``.
    """

    def __init__(self, address: str, order: str = "lex", token: str | None = None,
                 timeout: float = 120.0, max_batch: int = 256):
        try:
            import grpc  # noqa: F401

            from cbir.v1 import search_pb2, search_pb2_grpc  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ValueError(f"--address is not available: the gRPC stubs cannot be imported ({exc})") from None
        self.address = address
        self.order = order
        self.token = token
        self.timeout = timeout
        self.max_batch = max_batch
        self._channel = None
        self._stub = None
        self.calls = 0
        self.wall_s = 0.0

    def _connect(self):
        if self._stub is None:
            import grpc

            from cbir.v1 import search_pb2_grpc

            try:
                from cbir.server import connect
            except ImportError:  # pragma: no cover - the stubs alone are enough without a token
                if self.token:
                    raise ValueError("--address with a token needs cbir.server (not importable)") from None
                opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
                self._channel = grpc.insecure_channel(self.address, options=opts)
                self._stub = search_pb2_grpc.SearchServiceStub(self._channel)
            else:
                self._channel, self._stub = connect(self.address, token=self.token, max_message_bytes=64 << 20)
        return self._stub

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") and exc.code() else "ERROR"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise ValueError(f"server at {self.address}: {code}: {details}") from None

    def stats(self):
        from cbir.v1 import search_pb2 as pb

        return self._call(self._connect().GetStats, pb.GetStatsRequest())

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def search(self, query: Codes, k: int) -> np.ndarray:
        from cbir.v1 import search_pb2 as pb

        stub = self._connect()
        mode = pb.HAMMING if self.order == "hamming" else pb.LEXICOGRAPHIC
        out = np.full((len(query), int(k)), -1, dtype=np.int64)
        t0 = time.perf_counter()
        step = max(1, min(self.max_batch, 200_000 // max(1, int(k))))  # keep responses ~< 4 MB
        for s in range(0, len(query), step):
            reqs = [pb.SearchRequest(code=pb.Code(data=query.packed[i].tobytes(), nbits=query.nbits),
                                     k=int(k), mode=mode)
                    for i in range(s, min(s + step, len(query)))]
            resp = self._call(stub.BatchSearch, pb.BatchSearchRequest(requests=reqs))
            self.calls += 1
            for j, r in enumerate(resp.responses):
                ids = [h.id for h in r.hits][: int(k)]
                out[s + j, : len(ids)] = ids
        self.wall_s += time.perf_counter() - t0
        return out


def _server_available() -> str | None:
    """None when the gRPC client pieces exist, else the reason they do not."""
    try:
        import grpc  # noqa: F401

        from cbir.v1 import search_pb2, search_pb2_grpc  # noqa: F401
    except ImportError as exc:
        return f"gRPC stubs not importable ({exc})"
    return None


def _index_database(path: str, hasher, data: "BenchData", spot_check: int = 32) -> tuple[Codes, np.ndarray, np.ndarray, dict]:
    """Database codes read from a ``cbir index`` directory (:mod:`cbir.indexer`) instead of
    encoding the database.

    Index items are matched to the benchmark's database rows by their file path when the
    database is file-backed and every item's metadata has a ``path`` (as ``cbir index build``
    writes it), otherwise by id: the ids must be the positions of the items in the benchmark's
    whole database set (what ``cbir index build --dataset SRC`` assigns for the same ``SRC``).
    Index items that match no database row (e.g. outside ``--limit-database``) are ignored.
    The model content hash stored in the index must equal the model's, and a spot check
    re-encodes up to ``spot_check`` database images and compares them with the stored codes.

    Returns ``(codes, rows, ids, facts)``: the stored codes of the matched items in database
    order, their rows in ``data.database``, their index ids and facts for the report.
    """
    try:
        from cbir.indexer import open_index
    except ImportError:
        raise ValueError("--index is not available: cbir.indexer.open_index cannot be imported in this "
                         "build; run without --index (the database is encoded instead)") from None
    reader = open_index(path)
    try:
        if reader.nbits != hasher.nbits:
            raise ValueError(f"index {path} holds {reader.nbits}-bit codes, the model makes {hasher.nbits}-bit codes")
        if reader.model_hash and reader.model_hash != hasher.content_hash:
            raise ValueError(f"index {path} was built with model {reader.model_hash[:12]}, not "
                             f"{hasher.content_hash[:12]}; its codes are not this model's")
        # every item, through the public prefix scan (empty prefix = all, ascending code order)
        id_parts, code_parts, cursor = [], [], None
        while True:
            page = reader.search_prefix("", limit=65536, cursor=cursor)
            id_parts.append(np.asarray(page.ids, dtype=np.int64))
            code_parts.append(page.codes.packed)
            cursor = page.next_cursor
            if not cursor:
                break
        ids = np.concatenate(id_parts)
        packed = np.ascontiguousarray(np.concatenate(code_parts), dtype=np.uint8)
        count, model_hash = int(reader.count()), reader.model_hash
        metas = None
        if not data.database.in_memory and len(ids):
            metas = [it.meta if it is not None else None for it in reader.get_many(ids)]
    finally:
        reader.close()
    n_rows = len(data.database)
    if metas is not None and all(isinstance(m, dict) and m.get("path") for m in metas):
        matched_by = "path"
        row_of_path = {os.path.realpath(p): r for r, p in enumerate(data.database.paths)}
        rows = np.array([row_of_path.get(os.path.realpath(m["path"]), -1) for m in metas], dtype=np.int64)
    else:
        matched_by = "id"
        n_source = data.database_source_size
        if ids.size and (ids.min() < 0 or ids.max() >= n_source):
            raise ValueError(f"index {path}: item ids must be the positions 0..{n_source - 1} of the benchmark's "
                             f"database items (found ids {int(ids.min())}..{int(ids.max())}); build the index "
                             "from the same database source (`cbir index build --dataset SRC`)")
        row_of = np.full(n_source, -1, dtype=np.int64)
        row_of[data.database_positions] = np.arange(n_rows)
        rows = row_of[ids]
    keep = rows >= 0
    rows, packed, ids = rows[keep], packed[keep], ids[keep]
    order = np.argsort(rows, kind="stable")
    rows, packed, ids = rows[order], packed[order], ids[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]  # one index item per database row
    rows, packed, ids = rows[first], packed[first], ids[first]
    if len(rows) == 0:
        raise ValueError(f"index {path} holds none of the benchmark's database items (matched by {matched_by})")
    codes = Codes(packed, hasher.nbits)
    sample = np.unique(rows[np.linspace(0, len(rows) - 1, min(spot_check, len(rows))).astype(np.int64)])
    imgs, kept = _raw_images(data.database, sample)
    if imgs:
        enc = _encode_raw(hasher, imgs)
        stored = codes[np.searchsorted(rows, np.asarray(kept))]
        mismatched = int((enc.packed != stored.packed).any(axis=1).sum())
        if mismatched:
            raise ValueError(f"index {path}: {mismatched} of {len(kept)} spot-checked database images encode to "
                             "other codes than the index stores (built from other data or another model)")
    facts = {"path": str(path), "count": count, "model_hash": model_hash, "matched_by": matched_by,
             "used": int(len(rows)), "missing_from_index": int(n_rows - len(rows)), "spot_checked": len(kept)}
    return codes, rows, ids, facts


# ============================================================================================
# the report
# ============================================================================================
def _ks(cfg_ks, k: int, n: int) -> list[int]:
    ks = sorted({int(x) for x in cfg_ks if int(x) <= n} | {min(int(k), n)})
    return ks or [1]


def _model_train_info(model_path: str) -> dict:
    """The dataset sizes recorded by ``cbir train`` in ``config.json`` next to the model."""
    p = Path(model_path)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("dataset", {}) or {}
    except (OSError, ValueError):
        return {}


def _f(x) -> float:
    return float(x)


def build_report(cfg: BenchConfig, hasher=None) -> dict:
    """Run the benchmark described by ``cfg`` and return the report dict (see module doc).

    ``hasher``: an already loaded :class:`~cbir.models.hasher.Hasher` (else ``cfg.model`` is
    loaded). Raises ``ValueError`` on an overlap between queries and database (unless
    ``cfg.allow_overlap``) and on inconsistent inputs.
    """
    import torch
    from tqdm.auto import tqdm

    from cbir import metrics as M
    from cbir.models.hasher import Hasher

    cfg.validate()
    t_start = time.perf_counter()
    walls: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        walls[name] = round(time.perf_counter() - t0, 3)
        return time.perf_counter()

    t = time.perf_counter()
    if hasher is None:
        hasher = Hasher.load(cfg.model, device=cfg.device, batch_size=cfg.batch_size)
    model_cfg = hasher.config or {}
    t = lap("load_model", t)
    data = load_bench_data(cfg, hasher.image_size, model_dataset=model_cfg.get("dataset"))
    t = lap("load_data", t)

    # -- overlap check (before any expensive work) -------------------------------------------
    qk, how = _item_keys(data.query, np.arange(len(data.query)))
    dk, how_d = _item_keys(data.database, np.arange(len(data.database)))
    if how != how_d:  # one set in memory, the other on disk: compare pixels
        qk = [hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in _raw_images(data.query, range(len(data.query)))[0]]
        dk = [hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in _raw_images(data.database, range(len(data.database)))[0]]
        how = "pixels"
    try:
        hits = M.check_overlap(qk, dk, allow=cfg.allow_overlap)
    except ValueError as exc:
        raise ValueError(f"overlap check ({how}): {exc} (bench: --allow-overlap)") from None
    t = lap("overlap_check", t)

    # -- encode ------------------------------------------------------------------------------
    with torch.inference_mode():
        q_codes, _, q_idx = hasher.encode_imageset(data.query, progress=cfg.progress, desc="encode queries",
                                                   num_workers=cfg.num_workers)
        t = lap("encode_queries", t)
        db_source, index_facts = "encoded", None
        db_item_ids = None  # ids of the database rows in an index / the server (default: positions)
        if cfg.index:
            db_codes, db_idx, db_item_ids, index_facts = _index_database(cfg.index, hasher, data)
            db_source = f"index {cfg.index}"
        else:
            db_codes, _, db_idx = hasher.encode_imageset(data.database, progress=cfg.progress,
                                                         desc="encode database", num_workers=cfg.num_workers)
        t = lap("encode_database", t)
    if len(q_codes) == 0 or len(db_codes) == 0:
        raise ValueError(f"nothing to score: {len(q_codes)} readable queries, {len(db_codes)} readable "
                         "database images")
    ql = data.query_labels[q_idx]
    dl = data.db_labels[db_idx]
    n, nq, B = len(db_codes), len(q_codes), q_codes.nbits
    kk = min(int(cfg.k), n)
    ks = _ks(cfg.ks, cfg.k, n)

    # -- retrieval ---------------------------------------------------------------------------
    orders = ("lex", "hamming")
    steps = tqdm(total=12, desc="retrieval metrics", unit="metric", disable=not cfg.progress, leave=False)
    ret: dict[str, Any] = {"k_requested": int(cfg.k), "k": kk, "ks": ks}
    ret["map_at_k"], ret["map_all"], ret["precision_at_k"], ret["recall_at_k"] = {}, {}, {}, {}
    for order in orders:
        ret["map_at_k"][order] = M.mean_average_precision(q_codes, ql, db_codes, dl, kk, order=order)
        steps.update()
        ret["map_all"][order] = M.mean_average_precision(q_codes, ql, db_codes, dl, None, order=order)
        steps.update()
        ret["precision_at_k"][order] = [_f(v) for v in M.precision_at_k(q_codes, ql, db_codes, dl, ks, order=order)]
        steps.update()
        ret["recall_at_k"][order] = [_f(v) for v in M.recall_at_k(q_codes, ql, db_codes, dl, ks, order=order)]
        steps.update()
    # tie-aware (expected AP over every order of tied items): the figures that do not depend on
    # database order. lex ties = identical codes; Hamming ties = equal distance.
    ret["tie_aware_map_at_k"], ret["tie_aware_map_all"] = {}, {}
    for order in orders:
        ret["tie_aware_map_at_k"][order] = M.tie_aware_average_precision(q_codes, ql, db_codes, dl, kk, order)
        ret["tie_aware_map_all"][order] = M.tie_aware_average_precision(q_codes, ql, db_codes, dl, None, order)
        steps.update()
    pr = M.precision_recall_by_radius(q_codes, ql, db_codes, dl)
    ret["pr_by_radius"] = {"radius": [int(v) for v in pr.radius], "precision": [_f(v) for v in pr.precision],
                           "recall": [_f(v) for v in pr.recall],
                           "empty_fraction": [_f(v) for v in pr.empty_fraction]}
    steps.update()
    rp = M.precision_within_radius(q_codes, ql, db_codes, dl, 2)
    ret["p_at_h2"] = {"radius": 2, "precision": rp.precision, "empty_fraction": rp.empty_fraction,
                      "note": "a query whose Hamming ball of radius 2 is empty scores 0 and counts"}
    steps.update()
    rc = M.relevant_counts(ql, dl)
    ret["queries_without_relevant_items"] = int((rc == 0).sum())
    ret["mean_relevant_per_query"] = float(rc.mean())
    steps.close()
    t = lap("retrieval", t)

    # -- coverage ------------------------------------------------------------------------------
    coverage = {"database": M.coverage_report(db_codes), "queries": M.coverage_report(q_codes)}
    # the yardstick: uniformly random codes at the same N and B, and random path bits below the
    # observed class prefixes (what a tree that spreads each class perfectly at random gives)
    cb = int(hasher.layout.class_bits or 0)
    coverage["database"]["random"] = [M.random_expectation(db_codes, 0)]
    if 0 < cb < B:
        coverage["database"]["random"].append(M.random_expectation(db_codes, cb))
    coverage["database"]["bit_correlation"] = [[round(float(v), 6) for v in row] for row in M.bit_correlation(db_codes)]
    t = lap("coverage", t)

    # -- robustness ------------------------------------------------------------------------------
    robust = None
    if cfg.robustness and (cfg.jitter or cfg.occlusion):
        pos = np.arange(len(data.query))[q_idx]
        if len(pos) > cfg.robustness_images:
            pos = np.sort(np.random.default_rng(cfg.seed + 2).permutation(pos)[: cfg.robustness_images])
        robust = robustness_report(hasher, data.query, pos, cfg.jitter, cfg.occlusion, seed=cfg.seed,
                                   progress=cfg.progress)
    t = lap("robustness", t)

    # -- the server path ---------------------------------------------------------------------
    server = None
    if cfg.address:
        if db_item_ids is None:
            db_item_ids = data.database_positions[db_idx]
        server = _server_figures(cfg, hasher, q_codes, ql, dl, db_item_ids, ks, ret)
        t = lap("server", t)

    layout = hasher.layout
    train_info = _model_train_info(cfg.model)
    report = {
        "format": FORMAT,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": cfg.to_dict(),
        "model": {
            "path": str(cfg.model),
            "method": hasher.method_name,
            "backbone": getattr(hasher.spec, "backbone", None),
            "content_hash": hasher.content_hash,
            "nbits": int(B),
            "layout": layout.to_dict(),
            "image_size": hasher.image_size,
            "trained_on": model_cfg.get("dataset"),
            "train_size": train_info.get("train"),
        },
        "data": {
            "name": data.name,
            "source": data.source,
            "multilabel": data.multilabel,
            "num_labels": len(data.class_names),
            "relevance": "shares at least one label" if data.multilabel else "same class",
            "train_size": data.train_size if data.train_size is not None else train_info.get("train"),
            "query_size": int(nq),
            "database_size": int(n),
            "query_source_size": data.query_source_size,
            "database_source_size": data.database_source_size,
            "unreadable_queries": int(len(data.query) - nq),
            "unreadable_database": None if index_facts else int(len(data.database) - len(db_idx)),
            "database_codes": db_source,
            "index": index_facts,
        },
        "overlap": {"checked_by": how, "overlapping_queries": int(len(hits)), "allowed": bool(cfg.allow_overlap)},
        "retrieval": ret,
        "coverage": coverage,
        "robustness": robust,
        "server": server,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "device": str(hasher.device), "threads": torch.get_num_threads(),
                        "host": platform.node()},
        "wall_s": walls,
    }
    walls["total"] = round(time.perf_counter() - t_start, 3)
    report["headline"] = headline(report)
    return report


def _server_figures(cfg, hasher, q_codes, ql, dl, db_ids, ks, ret) -> dict:
    """Ranked-retrieval figures (mAP@k, P@k, recall@k in both orders) measured through the
    server's ``BatchSearch`` calls with code queries, and whether they equal the in-process
    figures exactly. ``db_ids`` is the server's id of every database row: the ids of the
    ``--index`` items when an index is given (the index the server serves; items matched by
    path or id, see :func:`_index_database`), else the rows' positions in the benchmark's whole
    database set (the ids ``cbir index build --dataset SRC`` assigns). The server's model content
    hash, when reported, must be the model's. Code-based figures (Hamming-ball, tie-aware,
    coverage) need every database code and are computed in process only."""
    from cbir import metrics as M

    why = _server_available()
    if why:
        raise ValueError(f"--address is not available: {why}")
    out: dict[str, Any] = {"address": cfg.address}
    n = len(dl)
    kk = ret["k"]
    for order in ("lex", "hamming"):
        s = GrpcSearcher(cfg.address, order=order, token=os.environ.get("CBIR_TOKEN") or None)
        try:
            if order == "lex":
                st = s.stats()
                out["server_count"] = int(st.count)
                out["server_model_content_hash"] = st.model_content_hash
                if st.model_content_hash and st.model_content_hash != hasher.content_hash:
                    raise ValueError(f"the server at {cfg.address} runs model {st.model_content_hash[:12]}, "
                                     f"not {hasher.content_hash[:12]}; its figures would not be comparable")
                if int(st.count) != n:
                    log.warning("server holds %d items, the benchmark database %d", st.count, n)
            fig = {
                "map_at_k": M.mean_average_precision(q_codes, ql, None, dl, kk, searcher=s, db_ids=db_ids),
                "precision_at_k": [_f(v) for v in M.precision_at_k(q_codes, ql, None, dl, ks, searcher=s,
                                                                    db_ids=db_ids)],
                "recall_at_k": [_f(v) for v in M.recall_at_k(q_codes, ql, None, dl, ks, searcher=s,
                                                              db_ids=db_ids)],
            }
            if n <= SERVER_MAX_K:  # the whole ranking fits in one Search response
                fig["map_all"] = M.mean_average_precision(q_codes, ql, None, dl, None, searcher=s, db_ids=db_ids)
            fig["search_calls"], fig["search_wall_s"] = s.calls, round(s.wall_s, 3)
        finally:
            s.close()
        fig["equal_in_process"] = bool(
            np.isclose(fig["map_at_k"], ret["map_at_k"][order], rtol=0, atol=1e-12)
            and ("map_all" not in fig or np.isclose(fig["map_all"], ret["map_all"][order], rtol=0, atol=1e-12))
            and np.allclose(fig["precision_at_k"], ret["precision_at_k"][order], rtol=0, atol=1e-12)
            and np.allclose(fig["recall_at_k"], ret["recall_at_k"][order], rtol=0, atol=1e-12))
        out[order] = fig
    out["equal_in_process"] = bool(out["lex"]["equal_in_process"] and out["hamming"]["equal_in_process"])
    return out


# ============================================================================================
# headline, tables
# ============================================================================================
def headline(report: dict) -> dict:
    """The figures of the printed table and of ``cbir bench compare`` (flat dict)."""
    r, cov = report["retrieval"], report["coverage"]["database"]
    return {
        "method": report["model"]["method"],
        "bits": report["model"]["nbits"],
        "model": report["model"]["content_hash"][:12],
        "k": r["k"],
        "map_at_k_lex": r["map_at_k"]["lex"],
        "map_at_k_hamming": r["map_at_k"]["hamming"],
        "map_all_lex": r["map_all"]["lex"],
        "map_all_hamming": r["map_all"]["hamming"],
        "tie_aware_map_at_k_lex": r["tie_aware_map_at_k"]["lex"],
        "tie_aware_map_at_k_hamming": r["tie_aware_map_at_k"]["hamming"],
        "tie_aware_map_all_lex": r["tie_aware_map_all"]["lex"],
        "tie_aware_map_all_hamming": r["tie_aware_map_all"]["hamming"],
        "p_at_h2": r["p_at_h2"]["precision"],
        "p_at_h2_empty": r["p_at_h2"]["empty_fraction"],
        "entropy": cov["entropy_bits"],
        "unique_percent": cov["unique_percent"],
        "collisions": cov["average_collision_count"],
        "random_unique_percent": _yardstick(cov)["unique_percent"],
        "random_collisions": _yardstick(cov)["average_collision_count"],
    }


def _yardstick(cov: dict) -> dict:
    """The random-code expectation codes are compared with: random bits below the class prefix
    when the layout has class bits, else uniformly random codes."""
    rnd = cov.get("random") or [{"fixed_bits": 0, "unique_percent": float("nan"),
                                 "average_collision_count": float("nan")}]
    return rnd[-1]


def _md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _text_table(header: list[str], rows: list[list]) -> str:
    cols = [header] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cols) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * x for x in w)] + [fmt(r) for r in cols[1:]])


def _headline_rows(report: dict) -> list[list[str]]:
    h, r = report["headline"], report["retrieval"]
    k = h["k"]
    rows = [
        [f"tie-aware mAP@{k} (lexicographic)", f"{h['tie_aware_map_at_k_lex']:.4f}"],
        [f"tie-aware mAP@{k} (Hamming)", f"{h['tie_aware_map_at_k_hamming']:.4f}"],
        ["tie-aware mAP@all (lexicographic)", f"{h['tie_aware_map_all_lex']:.4f}"],
        ["tie-aware mAP@all (Hamming)", f"{h['tie_aware_map_all_hamming']:.4f}"],
        [f"mAP@{k} (lex, ties by id: order-dependent)", f"{h['map_at_k_lex']:.4f}"],
        [f"mAP@{k} (Hamming, ties by code/id)", f"{h['map_at_k_hamming']:.4f}"],
        ["mAP@all (lex / Hamming, ties by id)", f"{h['map_all_lex']:.4f} / {h['map_all_hamming']:.4f}"],
        ["P@H<=2 (empty balls score 0)", f"{h['p_at_h2']:.4f} ({100 * h['p_at_h2_empty']:.1f} % empty)"],
    ]
    for kk in (10, 100):
        if kk in r["ks"]:
            i = r["ks"].index(kk)
            rows.append([f"P@{kk} (lex / Hamming)", f"{r['precision_at_k']['lex'][i]:.4f} / "
                                                    f"{r['precision_at_k']['hamming'][i]:.4f}"])
    i = r["ks"].index(k)
    rows.append([f"recall@{k} (lex / Hamming)", f"{r['recall_at_k']['lex'][i]:.4f} / {r['recall_at_k']['hamming'][i]:.4f}"])
    cov = report["coverage"]["database"]
    rows += [
        ["code entropy (bits)", f"{h['entropy']:.3f} (max {cov['max_entropy_bits']:.3f})"],
        ["unique codes", f"{cov['unique_codes']} / {cov['n']} ({h['unique_percent']:.2f} %)"],
        ["average collision count", f"{h['collisions']:.3f}"],
        [f"random codes at this N, B ({_yardstick_name(cov)})",
         f"{h['random_unique_percent']:.2f} % unique, {h['random_collisions']:.3f} collisions"],
        ["unique % / random unique %", f"{h['unique_percent'] / h['random_unique_percent']:.3f}"
         if h["random_unique_percent"] > 0 else "n/a"],
        ["largest bucket", f"{cov['largest_bucket']}"],
    ]
    rob = report.get("robustness")
    if rob and rob.get("n_images"):
        for kind in ("jitter", "occlusion"):
            if rob[kind]:
                last = rob[kind][-1]
                rows.append([f"retention, full code ({kind} {last['strength']:g})", f"{last['retention'][-1]:.3f}"])
    srv = report.get("server")
    if srv:
        rows.append([f"server {srv['address']}: mAP@{k} lex / Hamming",
                     f"{srv['lex']['map_at_k']:.4f} / {srv['hamming']['map_at_k']:.4f} "
                     f"({'equal' if srv['equal_in_process'] else 'DIFFERENT'})"])
    return rows


def _yardstick_name(cov: dict) -> str:
    fb = _yardstick(cov)["fixed_bits"]
    return f"random bits below the {fb} class bits" if fb else "uniformly random"


def _title(report: dict) -> str:
    m, d = report["model"], report["data"]
    return (f"{m['method']} ({m['backbone']}), {m['nbits']} bits, model {m['content_hash'][:12]} | {d['name']}: "
            f"{d['query_size']} queries x {d['database_size']} database (train {d['train_size']})"
            f"{', multi-label' if d['multilabel'] else ''}")


def headline_table(report: dict) -> str:
    """The table ``cbir bench`` prints."""
    return _title(report) + "\n" + _text_table(["metric", "value"], _headline_rows(report))


def _fmt(v, nd=4):
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def report_markdown(report: dict) -> str:
    r, cov, d, m = report["retrieval"], report["coverage"]["database"], report["data"], report["model"]
    parts = [f"# cbir bench report\n\n{_title(report)}\n\nCreated {report['created_utc']}; definitions: "
             "`cbir.metrics` docstrings. Relevance: " + d["relevance"] + ".\n"]
    parts.append("## Headline\n\n" + _md_table(["metric", "value"], _headline_rows(report)))
    rows = [[k, _fmt(r["precision_at_k"]["lex"][i]), _fmt(r["precision_at_k"]["hamming"][i]),
             _fmt(r["recall_at_k"]["lex"][i]), _fmt(r["recall_at_k"]["hamming"][i])] for i, k in enumerate(r["ks"])]
    parts.append("## P@k and recall@k\n\n" + _md_table(["k", "P@k lex", "P@k Hamming", "R@k lex", "R@k Hamming"], rows))
    pr = r["pr_by_radius"]
    rows = [[rad, _fmt(pr["precision"][rad]), _fmt(pr["recall"][rad]), f"{100 * pr['empty_fraction'][rad]:.1f}"]
            for rad in pr["radius"]]
    parts.append("## Hamming-ball retrieval (precision / recall by radius)\n\nAn empty ball scores precision 0.\n\n"
                 + _md_table(["radius", "precision", "recall", "empty balls %"], rows))
    rows = [[f"{i + 1}", _fmt(cov["prefix_entropy"][i], 3), _fmt(cov["prefix_balance"][i], 3),
             _fmt(cov["bit_balance"][i], 3)] for i in range(cov["nbits"])]
    parts.append("## Coverage of the database codes\n\n" + _md_table(
        ["figure", "value"],
        [["codes", cov["n"]], ["unique codes", f"{cov['unique_codes']} ({cov['unique_percent']:.2f} %)"],
         ["entropy (bits)", f"{cov['entropy_bits']:.3f} of max {cov['max_entropy_bits']:.3f}"],
         ["average collision count", f"{cov['average_collision_count']:.3f}"],
         ["largest bucket", cov["largest_bucket"]],
         ["mean abs bit correlation", f"{cov['mean_abs_bit_correlation']:.3f}"]])
        + "\n\nPer depth d (prefix entropy and balance) and per bit d (balance = fraction of 1s):\n\n"
        + _md_table(["d", "prefix entropy", "prefix balance", "bit balance"], rows))
    hist = cov["bucket_size_histogram"]
    parts.append("Bucket sizes:\n\n" + _md_table(["bucket size", "buckets"],
                                                 [[s, b] for s, b in zip(hist["sizes"], hist["buckets"])]))
    rob = report.get("robustness")
    if rob and rob.get("n_images"):
        depths = sorted({1, 2, 4, 8, 12, 16, 24, 32, 48, 64} & set(range(1, m["nbits"] + 1)) | {m["nbits"]})
        rows = [[f"{kind} {e['strength']:g}"] + [f"{e['retention'][dd - 1]:.3f}" for dd in depths]
                for kind in ("jitter", "occlusion") for e in rob[kind]]
        parts.append(f"## Hash-code retention ({rob['n_images']} query images)\n\nFraction of images whose "
                     "first d bits are unchanged (jitter: brightness/contrast/saturation factors in [1-s, 1+s], "
                     "hue in [-s/4, s/4]; occlusion: black square over a fraction s of the area).\n\n"
                     + _md_table(["perturbation"] + [f"d={dd}" for dd in depths], rows))
    srv = report.get("server")
    if srv:
        rows = [[o, _fmt(srv[o]["map_at_k"]), _fmt(r["map_at_k"][o]), _fmt(srv[o].get("map_all", "n/a")),
                 _fmt(r["map_all"][o]), srv[o]["equal_in_process"], srv[o]["search_calls"], srv[o]["search_wall_s"]]
                for o in ("lex", "hamming")]
        parts.append(f"## Through the server at {srv['address']}\n\nmAP@k, mAP@all, P@k and recall@k measured "
                     "with the server's BatchSearch (code queries); 'equal' compares all of them with the "
                     "in-process figures.\n\n" + _md_table(
                         ["order", f"mAP@{r['k']} server", "in-process", "mAP@all server", "in-process", "equal",
                          "BatchSearch calls", "wall s"], rows))
    ov = report["overlap"]
    facts = [["model", f"{m['path']} ({m['method']}, hash {m['content_hash']})"],
             ["data source", json.dumps(d["source"])],
             ["train / query / database", f"{d['train_size']} / {d['query_size']} / {d['database_size']}"],
             ["unreadable images skipped", f"{d['unreadable_queries']} queries, {d['unreadable_database']} database"],
             ["database codes", d["database_codes"]],
             ["queries without any relevant item", r["queries_without_relevant_items"]],
             ["overlap check", f"by {ov['checked_by']}: {ov['overlapping_queries']} overlapping queries"
                               f"{' (allowed)' if ov['allowed'] else ''}"]]
    facts += [[f"wall time {k}", f"{v:.2f} s"] for k, v in report["wall_s"].items()]
    parts.append("## Run\n\n" + _md_table(["fact", "value"], facts, "ll"))
    if report.get("files"):
        parts.append("Plots: " + ", ".join(f"[{f}]({f})" for f in report["files"].get("plots", [])))
    return "\n\n".join(parts) + "\n"


# ============================================================================================
# plots
# ============================================================================================
def write_plots(report: dict, out: Path) -> list[str]:
    """Write the PNG plots of ``report`` into ``out``; returns the file names."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out = Path(out)
    r, cov = report["retrieval"], report["coverage"]["database"]
    title = f"{report['model']['method']} {report['model']['nbits']} bits - {report['data']['name']}"
    written = []

    def save(fig, name):
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    pr = r["pr_by_radius"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(pr["recall"], pr["precision"], "o-", ms=3)
    for rad in (0, 1, 2, 4, 8):
        if rad < len(pr["radius"]):
            ax.annotate(f"r={rad}", (pr["recall"][rad], pr["precision"][rad]), fontsize=7)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (empty ball = 0)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("PR over Hamming radius", fontsize=9)
    ax.grid(alpha=0.3)
    save(fig, "pr_curve.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    for order in ("lex", "hamming"):
        ax.plot(r["ks"], r["precision_at_k"][order], "o-", ms=3, label=order)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("P@k")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "precision_at_k.png")

    rob = report.get("robustness") or {}
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, kind in zip(axes, ("jitter", "occlusion")):
        for e in rob.get(kind, []):
            ax.plot(range(1, len(e["retention"]) + 1), e["retention"], "o-", ms=2, label=f"{e['strength']:g}")
        ax.set_xlabel("prefix depth d (bits)")
        ax.set_title(f"{kind}", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if rob.get(kind):
            ax.legend(title="strength", fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel("code retention")
    save(fig, "retention.png")

    hist = cov["bucket_size_histogram"]
    fig, ax = plt.subplots(figsize=(5, 4))
    if len(hist["sizes"]) <= 30:  # one bar per occurring size, evenly spaced
        pos = np.arange(len(hist["sizes"]))
        ax.bar(pos, hist["buckets"])
        ax.set_xticks(pos, [str(v) for v in hist["sizes"]], fontsize=6, rotation=90)
    else:
        ax.bar(hist["sizes"], hist["buckets"])
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("bucket size (items sharing one code)")
    ax.set_ylabel("number of buckets")
    save(fig, "bucket_sizes.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    d = np.arange(1, cov["nbits"] + 1)
    ax.plot(d, cov["prefix_entropy"], "o-", ms=3, label="database")
    qcov = report["coverage"].get("queries")
    if qcov:
        ax.plot(d, qcov["prefix_entropy"], "s--", ms=2, label="queries")
    ax.plot(d, np.minimum(d, np.log2(cov["n"])), ":", color="grey", label="max min(d, log2 N)")
    ax.set_xlabel("prefix depth d (bits)")
    ax.set_ylabel("prefix entropy (bits)")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "prefix_entropy.png")
    return written


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_report(report: dict, out: str | Path, plots: bool = True) -> dict:
    """Write ``report.json``, ``report.md`` and (``plots``) the PNG plots into ``out``.
    Returns ``{"json": path, "markdown": path, "plots": [names]}`` (also stored in the report)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = write_plots(report, out) if plots else []
    report["files"] = {"json": "report.json", "markdown": "report.md", "plots": names}
    report["wall_s"]["write"] = round(time.perf_counter() - t0, 3)
    (out / "report.md").write_text(report_markdown(report))
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=_json_default))
    tmp.replace(out / "report.json")
    return {"json": out / "report.json", "markdown": out / "report.md", "plots": [out / n for n in names]}


# ============================================================================================
# compare
# ============================================================================================
def find_models(paths: Sequence[str]) -> list[Path]:
    """Expand ``cbir bench compare`` arguments: a checkpoint file, a directory holding
    ``model.pt``, a directory of such directories, or a ``report.json`` (used as is)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            out.append(p)
        elif p.is_dir() and (p / "model.pt").is_file():
            out.append(p / "model.pt")
        elif p.is_dir() and (p / "report.json").is_file():
            out.append(p / "report.json")
        elif p.is_dir():
            found = sorted(p.glob("*/model.pt")) or sorted(p.glob("*/report.json"))
            if not found:
                raise FileNotFoundError(f"{p}: no model.pt (or */model.pt, */report.json) inside")
            out += found
        else:
            raise FileNotFoundError(f"no model or report at {p}")
    return out


def compare_rows(reports: Sequence[dict]) -> list[dict]:
    rows = []
    for rep in reports:
        h = dict(rep["headline"])
        h["data"] = rep["data"]["name"]
        h["queries"], h["database"] = rep["data"]["query_size"], rep["data"]["database_size"]
        h["path"] = rep["model"]["path"]
        rows.append(h)
    return rows


_COMPARE_COLS = [
    ("method", "method", None), ("bits", "bits", None), ("model", "model", None),
    ("mAP@{k} lex", "map_at_k_lex", 4), ("mAP@{k} Ham", "map_at_k_hamming", 4),
    ("tie-aware mAP@{k} lex", "tie_aware_map_at_k_lex", 4), ("tie-aware mAP@{k} Ham", "tie_aware_map_at_k_hamming", 4),
    ("tie-aware mAP@all lex", "tie_aware_map_all_lex", 4), ("tie-aware mAP@all Ham", "tie_aware_map_all_hamming", 4),
    ("mAP@{k} lex (id ties)", "map_at_k_lex", 4), ("mAP@{k} Ham (id ties)", "map_at_k_hamming", 4),
    ("P@H<=2", "p_at_h2", 4),
    ("empty H<=2 %", "p_at_h2_empty", "pct"), ("entropy", "entropy", 3), ("unique %", "unique_percent", 2),
    ("random unique %", "random_unique_percent", 2), ("collisions", "collisions", 3),
    ("random collisions", "random_collisions", 3),
]


def _compare_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    ks = {r["k"] for r in rows}
    k = ks.pop() if len(ks) == 1 else "k"
    header = [c[0].format(k=k) for c in _COMPARE_COLS]
    body = []
    for r in rows:
        cells = []
        for _, key, nd in _COMPARE_COLS:
            v = r[key]
            cells.append(f"{100 * v:.1f}" if nd == "pct" else (f"{v:.{nd}f}" if nd else str(v)))
        body.append(cells)
    return header, body


def compare_table(rows: list[dict], markdown: bool = False) -> str:
    """One table in the shape of the thesis's Tables 3.4/3.5 across models."""
    header, body = _compare_cells(rows)
    return _md_table(header, body, "lrl" + "r" * (len(header) - 3)) if markdown else _text_table(header, body)


def run_compare(model_paths: Sequence[str], base: BenchConfig, out: str | Path, hasher_loader=None) -> tuple[list[dict], dict]:
    """Bench every model of ``model_paths`` (see :func:`find_models`) on the data of ``base``,
    writing each report into ``out/<n>-<method>/``, then ``compare.md`` and ``compare.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    reports = []
    data_desc = set()
    models = find_models(model_paths)
    errors = []
    for i, p in enumerate(tqdm(models, desc="compare", unit="model", disable=not base.progress or len(models) < 2,
                               leave=False)):
        try:
            if p.name == "report.json":
                rep = json.loads(p.read_text())
                if rep.get("format") != FORMAT:
                    raise ValueError(f"not a {FORMAT} report")
            else:
                cfg = dataclasses.replace(base, model=str(p))
                rep = build_report(cfg)
                sub = out / f"{i:02d}-{rep['model']['method']}-{rep['model']['content_hash'][:8]}"
                write_report(rep, sub, plots=base.plots)
                rep["report_dir"] = str(sub)
        except (ValueError, FileNotFoundError, KeyError) as exc:  # one bad model does not stop the others
            log.error("bench compare: %s: %s", p, exc)
            errors.append({"path": str(p), "error": str(exc)})
            continue
        data_desc.add((rep["data"]["name"], rep["data"]["query_size"], rep["data"]["database_size"]))
        reports.append(rep)
    rows = compare_rows(reports)
    if len(data_desc) > 1:
        log.warning("the models were benchmarked on different data: %s", sorted(data_desc))
    summary = {"format": FORMAT + "/compare", "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "rows": rows, "reports": [r.get("report_dir") for r in reports],
               "same_data": len(data_desc) <= 1, "errors": errors}
    dd = sorted(data_desc)
    md = ["# cbir bench compare", "",
          "Data: " + "; ".join(f"{a} ({q} queries x {n} database)" for a, q, n in dd) + ".",
          "tie-aware: expected AP over every order of tied items (lex: identical codes tie; Hamming: "
          "equal distances tie), independent of database order; mAP@k (id ties): DeepHash AP@k with ties "
          "broken by id, which depends on database order; random: the expectation for random codes; "
          "P@H<=2: empty balls score 0; entropy in bits; collisions: average collision count.", "",
          compare_table(rows, markdown=True), ""]
    md += ["Reports:", ""] + [f"- {r.get('report_dir') or r['model']['path']}" for r in reports] + [""]
    if errors:
        md += ["Failed:", ""] + [f"- {e['path']}: {e['error']}" for e in errors] + [""]
    (out / "compare.md").write_text("\n".join(md))
    (out / "compare.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    return rows, summary
