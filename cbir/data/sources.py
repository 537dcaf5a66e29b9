"""Data sources and retrieval protocols: named datasets, image folders, manifests, ``.npz``.

``load_dataset(name_or_path)`` returns :class:`DatasetSplits` (train / database / query).
Named protocols (fixed, so every report uses the same split):

* ``digits``: scikit-learn's 1,797 8x8 digits, upscaled (bilinear) to ``image_size``
  (default 32); query = 30 per class (300) chosen with seed 0; database = train = the other
  1,497. Never h-flipped.
* ``cifar10-subset``: ``cifar10-subset.npz`` from :func:`shared_datasets_dir` (or ``root``);
  query = the 846 ``test`` images, database = train = the 4,660 ``train`` images.
* ``mnist``: ``mnist-test.npz``; database = train = the first 9,000, query = the last 1,000.

A directory (class = sub-folder), a ``.csv``/``.jsonl`` manifest or an ``.npz`` file are split
into query / database with a stratified ``query_fraction`` (random when multi-label), ``seed``
- unless they carry their own split: a directory laid out as ``root/train/<class>/...`` and
``root/query/<class>/...`` (``test``/``queries`` for the query side, ``database``/``val`` for
the other), a manifest with a ``split`` column / key (``train``/``database`` or
``query``/``test``), an ``.npz`` with a ``split`` array. Those splits are used as given.
By default ``train`` carries :func:`train_transform` and ``database``/``query`` carry
:func:`eval_transform`; use ``ImageSet.with_transform`` for anything else.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cbir.data.imageset import ImageSet
from cbir.data.transforms import eval_transform, resize_uint8, train_transform

__all__ = [
    "shared_datasets_dir",
    "DatasetSplits",
    "load_dataset",
    "split_validation",
    "stratified_split",
    "NAMED_DATASETS",
    "DEFAULT_IMAGE_SIZE",
]

log = logging.getLogger("cbir.data")

DEFAULT_IMAGE_SIZE = 32
NAMED_DATASETS = ("digits", "cifar10-subset", "mnist")
_NAMED_FILES = {"cifar10-subset": "cifar10-subset.npz", "mnist": "mnist-test.npz"}
_ALIASES = {
    "cifar10_subset": "cifar10-subset",
    "cifar10-subset.npz": "cifar10-subset",
    "mnist-test": "mnist",
    "mnist-test.npz": "mnist",
    "sklearn-digits": "digits",
}
# Pre-resize in-memory images at load time only while they stay small.
_MAX_PRERESIZE = 64


# ----------------------------------------------------------------------------------------
def shared_datasets_dir() -> Path | None:
    """The shared datasets folder: ``$CBIR_DATASETS`` if set, else ``<repo root>/../shared/
    datasets``, else ``./../shared/datasets`` from the working directory; ``None`` if none
    of these is an existing directory."""
    env = os.environ.get("CBIR_DATASETS")
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            return p.resolve()
        log.warning("CBIR_DATASETS=%s is not a directory; ignoring it", env)
    repo_root = Path(__file__).resolve().parent.parent.parent
    for cand in (repo_root / ".." / "shared" / "datasets", Path.cwd() / ".." / "shared" / "datasets"):
        if cand.is_dir():
            return cand.resolve()
    return None


def _searched_dirs(root) -> list[str]:
    if root is not None:
        return [str(Path(root))]
    out = []
    env = os.environ.get("CBIR_DATASETS")
    if env:
        out.append(f"$CBIR_DATASETS={env}")
    repo_root = Path(__file__).resolve().parent.parent.parent
    out.append(str((repo_root / ".." / "shared" / "datasets").resolve()))
    out.append(str((Path.cwd() / ".." / "shared" / "datasets").resolve()))
    return out


# ----------------------------------------------------------------------------------------
@dataclass
class DatasetSplits:
    """A retrieval protocol: ``train`` (for fitting), ``database`` (indexed) and ``query``."""

    name: str
    train: ImageSet
    database: ImageSet
    query: ImageSet
    image_size: int
    flip_ok: bool

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def multilabel(self) -> bool:
        return self.train.multilabel

    def train_transform(self, strength: float = 1.0):
        """The training augmentation for this dataset (h-flip only when ``flip_ok``)."""
        return train_transform(self.image_size, flip=self.flip_ok, strength=strength)

    def eval_transform(self):
        return eval_transform(self.image_size)

    def describe(self) -> str:
        kind = "multi-label" if self.multilabel else "single-label"
        return (
            f"{self.name}: {self.num_classes} classes ({kind}), train {len(self.train)}, "
            f"database {len(self.database)}, query {len(self.query)}, "
            f"image size {self.image_size}"
        )


def _make_splits(name, full: ImageSet, train_idx, query_idx, image_size, flip_ok, db_idx=None) -> DatasetSplits:
    full = full.with_transform(None)
    train = full.subset(train_idx)
    database = train if db_idx is None else full.subset(db_idx)
    query = full.subset(query_idx)
    train.name, database.name, query.name = f"{name}/train", f"{name}/database", f"{name}/query"
    ev = eval_transform(image_size)
    return DatasetSplits(
        name=name,
        train=train.with_transform(train_transform(image_size, flip=flip_ok)),
        database=database.with_transform(ev),
        query=query.with_transform(ev),
        image_size=image_size,
        flip_ok=flip_ok,
    )


# ----------------------------------------------------------------------------------------
def stratified_split(
    labels: np.ndarray, fraction: float | None = None, seed: int = 0, per_class: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split item indices into ``(rest, picked)``, picking ``per_class`` items of each class
    or ``round(fraction * n_c)`` (at least 1 when a class has 2 or more items). Multi-label
    ``(N, m)`` labels are split at random (``fraction`` of all items). Both index arrays are
    sorted; the split depends only on ``labels`` and ``seed``."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        if fraction is None:
            raise ValueError("multi-label splits need a fraction")
        k = int(round(fraction * n))
        k = min(max(k, 1 if n >= 2 and fraction > 0 else 0), max(n - 1, 0))
        picked = np.sort(rng.permutation(n)[:k])
    else:
        picked_parts = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if per_class is not None:
                k = min(per_class, len(members))
            else:
                k = int(round(fraction * len(members)))
                if fraction > 0 and len(members) >= 2:
                    k = max(k, 1)
                k = min(k, len(members) - 1) if len(members) >= 2 else 0
            picked_parts.append(members[rng.permutation(len(members))[:k]])
        picked = np.sort(np.concatenate(picked_parts)) if picked_parts else np.empty(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[picked] = False
    return np.flatnonzero(mask).astype(np.int64), picked.astype(np.int64)


def split_validation(imageset: ImageSet, fraction: float = 0.1, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Hold out a validation part of a training set (stratified by class; random for
    multi-label) for model selection that never touches the query set.
    Returns ``(train_part, val_part)``, both with the transform of ``imageset``."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rest, val = stratified_split(imageset.labels, fraction=fraction, seed=seed)
    return imageset.subset(rest), imageset.subset(val)


# ----------------------------------------------------------------------------------------
def _to_chw3(images: np.ndarray, where: str) -> torch.Tensor:
    """Array of images (N,H,W) grey, (N,H,W,C) HWC or (N,C,H,W) -> uint8 tensor (N,3,H,W)."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 3:
        t = torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3):
        t = torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(0, 3, 1, 2)
    elif a.ndim == 4 and a.shape[1] in (1, 3, 4):
        t = torch.from_numpy(np.ascontiguousarray(a[:, :3]))
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4):
        t = torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(0, 3, 1, 2)
    else:
        raise ValueError(
            f"{where}: cannot interpret images of shape {a.shape} (expected (N,H,W), (N,H,W,C) or (N,C,H,W))"
        )
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    return t.contiguous()


def _maybe_resize(t: torch.Tensor, image_size: int) -> torch.Tensor:
    """Pre-resize a uint8 (N,3,H,W) tensor with the evaluation geometry
    (:func:`cbir.data.transforms.resize_uint8`, so an npz gives the pixels its image files
    would) when that stays small; otherwise keep it and let the transform resize per item."""
    if tuple(t.shape[-2:]) == (image_size, image_size) or image_size > _MAX_PRERESIZE:
        return t
    out = [resize_uint8(chunk, image_size) for chunk in torch.split(t, 2048)]
    return torch.cat(out) if out else t


def _npz_class_names(z, labels: np.ndarray, multilabel: bool) -> tuple[str, ...]:
    if "class_names" in z.files:
        return tuple(str(c) for c in z["class_names"].tolist())
    m = labels.shape[1] if multilabel else (int(labels.max()) + 1 if labels.size else 0)
    return tuple(str(i) for i in range(m))


def _load_npz_arrays(path: Path, image_size: int):
    with np.load(path, allow_pickle=False) as z:
        for key in ("images", "labels"):
            if key not in z.files:
                raise ValueError(
                    f"{path}: no '{key}' array (found {sorted(z.files)}); an .npz source needs 'images' and 'labels'"
                )
        labels = z["labels"]
        if labels.size == 0 or z["images"].shape[0] == 0:
            raise ValueError(f"{path}: the dataset is empty")
        multilabel = labels.ndim == 2
        class_names = _npz_class_names(z, labels, multilabel)
        images = _maybe_resize(_to_chw3(z["images"], str(path)), image_size)
        split = z["split"].astype(str) if "split" in z.files else None
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    full = ImageSet(labels, class_names, images=images, multilabel=multilabel, name=path.stem)
    return full, split


def _find_named_file(name: str, root) -> Path:
    fname = _NAMED_FILES[name]
    base = Path(root) if root is not None else shared_datasets_dir()
    if base is not None:
        p = base / fname
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"dataset '{name}' needs the file {fname}; looked in: {', '.join(_searched_dirs(root))}. "
        "Set CBIR_DATASETS (or pass root=) to the folder that holds it."
    )


def _load_digits(image_size: int) -> DatasetSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N,8,8)
    t = resize_uint8(torch.from_numpy(imgs).unsqueeze(1), image_size)
    t = t.expand(-1, 3, -1, -1).contiguous()
    labels = d.target.astype(np.int64)
    names = tuple(str(int(c)) for c in d.target_names)
    full = ImageSet(labels, names, images=t, name="digits")
    rest, query = stratified_split(labels, per_class=30, seed=0)
    return _make_splits("digits", full, rest, query, image_size, flip_ok=False)


def _load_cifar_subset(path: Path, image_size: int) -> DatasetSplits:
    full, split = _load_npz_arrays(path, image_size)
    if split is None:
        raise ValueError(f"{path}: no 'split' array; cannot apply the cifar10-subset protocol")
    train_idx = np.flatnonzero(split == "train")
    query_idx = np.flatnonzero(split == "test")
    return _make_splits("cifar10-subset", full, train_idx, query_idx, image_size, flip_ok=True)


def _load_mnist(path: Path, image_size: int) -> DatasetSplits:
    full, _ = _load_npz_arrays(path, image_size)
    n = len(full)
    n_query = 1000 if n > 1000 else max(1, n // 10)
    idx = np.arange(n)
    return _make_splits("mnist", full, idx[: n - n_query], idx[n - n_query :], image_size, flip_ok=False)


def _load_npz_generic(path: Path, image_size: int, query_fraction: float, seed: int, flip_ok: bool) -> DatasetSplits:
    full, split = _load_npz_arrays(path, image_size)
    name = path.stem
    if split is not None and np.isin(split, ("test", "query")).any():
        query_idx = np.flatnonzero(np.isin(split, ("test", "query")))
        train_idx = np.flatnonzero(~np.isin(split, ("test", "query")))
    else:
        train_idx, query_idx = stratified_split(full.labels, fraction=query_fraction, seed=seed)
    return _make_splits(name, full, train_idx, query_idx, image_size, flip_ok=flip_ok)


# -- image folders and manifests ---------------------------------------------------------
def _image_extensions() -> set[str]:
    """File extensions of the formats Pillow can open, minus those cbir never opens."""
    from cbir.data.images import NEVER_FORMATS

    Image.init()
    return {e.lower() for e, f in Image.registered_extensions().items() if f in Image.OPEN and f not in NEVER_FORMATS}


def image_files(root: Path) -> list[Path]:
    """Every image file under ``root`` (recursively), sorted; hidden files and folders skipped.
    The one rule for what counts as an image in a folder (datasets and ``cbir index build``)."""
    exts = _image_extensions()
    return sorted(
        p
        for p in Path(root).rglob("*")
        if p.is_file()
        and p.suffix.lower() in exts
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _label_key(s: str):
    """Sort labels numerically when they are integers, else alphabetically."""
    return (0, int(s), "") if re.fullmatch(r"-?\d+", s) else (1, 0, s)


def _load_folder(root: Path) -> ImageSet:
    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    paths: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    for d in class_dirs:
        files = image_files(d)
        if not files:
            log.warning("image folder %s: class folder '%s' holds no image files; ignored", root, d.name)
            continue
        names.append(d.name)
        paths += [str(p) for p in files]
        labels += [len(names) - 1] * len(files)
    if not paths:
        loose = [p for p in image_files(root) if p.parent == root]
        if loose:
            raise ValueError(
                f"image folder {root} has {len(loose)} image file(s) but no class sub-folders: "
                "the labels come from sub-folder names (root/<class>/<image>); "
                "use a CSV/JSONL manifest for other layouts"
            )
        raise ValueError(
            f"image folder {root} is empty: no image files found in class "
            f"sub-folders (root/<class>/<image>; extensions Pillow reads)"
        )
    return ImageSet(np.array(labels, dtype=np.int64), names, paths=paths, name=root.name)


#: sub-folder names read as a split (``root/<split>/<class>/<image>``) rather than as classes
_QUERY_SPLITS = ("query", "queries", "test")
_TRAIN_SPLITS = ("train", "database", "db", "val", "validation")


def _split_folders(root: Path) -> dict[str, list[Path]] | None:
    """``{"train": [...], "query": [...]}`` when ``root``'s sub-folders are split names (at least
    one query and one train/database folder, nothing else), else None (class folders)."""
    subs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    kinds = {
        d: ("query" if d.name.lower() in _QUERY_SPLITS else "train" if d.name.lower() in _TRAIN_SPLITS else None)
        for d in subs
    }
    named = [d for d, k in kinds.items() if k]
    if not named:
        return None
    if len(named) < len(subs) or {kinds[d] for d in named} != {"train", "query"}:
        log.warning(
            "image folder %s: sub-folder(s) %s look like split folders but the layout is "
            "not root/<train|query>/<class>/<image> throughout; reading every sub-folder "
            "as a class",
            root,
            ", ".join(sorted(d.name for d in named)),
        )
        return None
    return {k: sorted((d for d in named if kinds[d] == k), key=lambda d: d.name) for k in ("train", "query")}


def _load_split_folder(root: Path, parts: dict[str, list[Path]]):
    """The splits of ``root/<split>/<class>/<image>``: one class vocabulary (sorted union of
    the class folder names), train/database and query positions from the split folders."""
    sets = {k: [_load_folder(d) for d in ds] for k, ds in parts.items()}
    names = sorted({c for ss in sets.values() for x in ss for c in x.class_names})
    index = {c: i for i, c in enumerate(names)}
    paths, labels, split = [], [], []
    for k, ss in sets.items():
        for x in ss:
            remap = np.array([index[c] for c in x.class_names], dtype=np.int64)
            paths += x.paths
            labels.append(remap[x.labels])
            split += [k] * len(x)
    full = ImageSet(np.concatenate(labels), names, paths=paths, name=root.name)
    split = np.array(split)
    return full, np.flatnonzero(split == "train"), np.flatnonzero(split == "query")


def _split_labels(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip() != ""]
    return [s.strip() for s in re.split(r"[|;]", str(value)) if s.strip() != ""]


def _split_value(value, where: str) -> str | None:
    """A manifest's split cell -> "train" / "query" / None (empty)."""
    v = str(value or "").strip().lower()
    if not v:
        return None
    if v in _QUERY_SPLITS:
        return "query"
    if v in _TRAIN_SPLITS:
        return "train"
    raise ValueError(
        f"{where}: unknown split {value!r}; use one of {', '.join(_TRAIN_SPLITS + _QUERY_SPLITS)} (or leave it empty)"
    )


def _read_manifest(path: Path) -> list[tuple[str, list[str], int, str | None]]:
    rows: list[tuple[str, list[str], int, str | None]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "path" not in fields:
                raise ValueError(
                    f"{path}: a CSV manifest needs a header with a 'path' column "
                    f"and a 'labels' (or 'label') column; got {reader.fieldnames}"
                )
            if "labels" not in fields and "label" not in fields:
                raise ValueError(f"{path}: no 'labels' (or 'label') column: the manifest has no labels")
            for lineno, row in enumerate(reader, start=2):
                row = {(k or "").strip().lower(): v for k, v in row.items()}
                p = (row.get("path") or "").strip()
                if not p:
                    continue
                labs = _split_labels(row.get("labels") if "labels" in row else row.get("label"))
                rows.append((p, labs, lineno, _split_value(row.get("split"), f"{path}:{lineno}")))
    else:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from None
                if not isinstance(obj, dict) or not obj.get("path"):
                    raise ValueError(
                        f"{path}:{lineno}: each line needs an object with a 'path' and 'labels' (or 'label')"
                    )
                labs = obj.get("labels", obj.get("label"))
                if labs is not None and not isinstance(labs, (list, tuple)):
                    labs = [labs]
                rows.append(
                    (str(obj["path"]), _split_labels(labs), lineno, _split_value(obj.get("split"), f"{path}:{lineno}"))
                )
    return rows


def _load_manifest(path: Path) -> tuple[ImageSet, np.ndarray | None]:
    """The manifest's items, and its split per item ("train"/"query") when it has one."""
    rows = _read_manifest(path)
    if not rows:
        raise ValueError(f"manifest {path} is empty: no rows with a path")
    labelled = [r for r in rows if r[1]]
    if not labelled:
        raise ValueError(f"manifest {path} has no labels: every row's label field is empty")
    if len(labelled) < len(rows):
        missing = [str(r[2]) for r in rows if not r[1]]
        log.warning(
            "manifest %s: %d row(s) without labels ignored (lines %s%s)",
            path,
            len(missing),
            ", ".join(missing[:10]),
            ", ..." if len(missing) > 10 else "",
        )
    multilabel = any(len(set(r[1])) > 1 for r in labelled)
    names = sorted({lab for r in labelled for lab in r[1]}, key=_label_key)
    index = {n: k for k, n in enumerate(names)}
    base = path.parent
    paths = []
    for p, *_ in labelled:
        q = Path(p).expanduser()
        paths.append(str(q if q.is_absolute() else base / q))
    if multilabel:
        labels = np.zeros((len(labelled), len(names)), dtype=np.uint8)
        for i, r in enumerate(labelled):
            labels[i, [index[lab] for lab in r[1]]] = 1
    else:
        labels = np.array([index[r[1][0]] for r in labelled], dtype=np.int64)
    split = None
    given = [r[3] for r in labelled]
    if any(v is not None for v in given):
        if any(v is None for v in given):
            lines = [str(r[2]) for r in labelled if r[3] is None][:10]
            raise ValueError(
                f"manifest {path}: the split column is empty on some rows (lines "
                f"{', '.join(lines)}); give every row a split or none"
            )
        split = np.array(given)
        if not (split == "query").any() or not (split == "train").any():
            raise ValueError(f"manifest {path}: the split column needs both train/database and query/test rows")
    return ImageSet(labels, names, paths=paths, multilabel=multilabel, name=path.stem), split


# ----------------------------------------------------------------------------------------
def load_dataset(
    name_or_path: str | os.PathLike,
    root: str | Path | None = None,
    image_size: int | None = None,
    query_fraction: float = 0.1,
    seed: int = 0,
    flip_ok: bool | None = None,
) -> DatasetSplits:
    """Load a dataset and its retrieval protocol (see the module docstring).

    ``name_or_path``: ``digits``, ``cifar10-subset``, ``mnist``, a directory of class
    sub-folders, a ``.csv``/``.jsonl`` manifest or an ``.npz`` file. ``root`` overrides the
    shared datasets folder for the named files. ``image_size`` defaults to 32.
    ``query_fraction``/``seed`` apply to folders, manifests and split-less ``.npz`` files
    (the named protocols are fixed). ``flip_ok`` defaults to False for digits/MNIST and True
    otherwise. A bare known name always selects the named protocol (``./digits`` would be a
    folder of that name).
    """
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0 < query_fraction < 1:
        raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
    raw = str(name_or_path)
    key = _ALIASES.get(raw.lower(), raw.lower())
    path = Path(raw).expanduser()

    # A bare known name always means the named protocol; write ./digits for a folder so named.
    if key == "digits":
        splits = _load_digits(size)
    elif key in _NAMED_FILES and not (raw.endswith(".npz") and path.is_file()):
        f = _find_named_file(key, root)
        splits = _load_cifar_subset(f, size) if key == "cifar10-subset" else _load_mnist(f, size)
    elif path.is_dir():
        parts = _split_folders(path)
        if parts is not None:  # root/<train|query>/<class>/<image>: the user's own split
            full, rest, query = _load_split_folder(path, parts)
        else:
            full = _load_folder(path)
            rest, query = stratified_split(full.labels, fraction=query_fraction, seed=seed)
        splits = _make_splits(path.name, full, rest, query, size, flip_ok=True if flip_ok is None else flip_ok)
    elif path.is_file():
        suf = path.suffix.lower()
        if suf in (".csv", ".jsonl", ".ndjson"):
            full, msplit = _load_manifest(path)
            if msplit is not None:  # the manifest's own split
                rest, query = np.flatnonzero(msplit == "train"), np.flatnonzero(msplit == "query")
            else:
                rest, query = stratified_split(full.labels, fraction=query_fraction, seed=seed)
            splits = _make_splits(path.stem, full, rest, query, size, flip_ok=True if flip_ok is None else flip_ok)
        elif suf == ".npz" and path.name in _NAMED_FILES.values():
            # the shared files keep their protocol wherever they are
            splits = (
                _load_cifar_subset(path, size)
                if path.name == _NAMED_FILES["cifar10-subset"]
                else _load_mnist(path, size)
            )
        elif suf == ".npz":
            splits = _load_npz_generic(path, size, query_fraction, seed, flip_ok=True if flip_ok is None else flip_ok)
        else:
            raise ValueError(f"{path}: unsupported dataset file type '{suf}' (use a folder, .csv, .jsonl or .npz)")
    else:
        raise FileNotFoundError(
            f"dataset '{raw}' not found: not a known name ({', '.join(NAMED_DATASETS)}) "
            f"and no such file or directory (cwd {Path.cwd()}). Named files are looked up "
            "in the shared datasets folder; set CBIR_DATASETS to point elsewhere."
        )
    if flip_ok is not None and bool(flip_ok) != splits.flip_ok:
        splits = _reflip(splits, bool(flip_ok))
    return splits


def _reflip(splits: DatasetSplits, flip_ok: bool) -> DatasetSplits:
    splits.flip_ok = flip_ok
    splits.train = splits.train.with_transform(train_transform(splits.image_size, flip=flip_ok))
    return splits
