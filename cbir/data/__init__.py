"""Data for cbir: sources (digits, shared .npz files, image folders, CSV/JSONL manifests),
retrieval protocols (train / database / query), transforms and a loader that skips corrupt
files (reported with path and reason, counted in a :class:`SkipLog`)."""

from cbir.data.images import CorruptImageError, decode_image
from cbir.data.imageset import Batch, ImageSet, Loader, SkipLog, Skipped, collate, make_loader
from cbir.data.sources import (
    DEFAULT_IMAGE_SIZE,
    NAMED_DATASETS,
    DatasetSplits,
    load_dataset,
    shared_datasets_dir,
    split_validation,
    stratified_split,
)
from cbir.data.transforms import MEAN, STD, TwoViews, eval_transform, train_transform

__all__ = [
    "shared_datasets_dir",
    "CorruptImageError",
    "decode_image",
    "ImageSet",
    "Skipped",
    "Batch",
    "SkipLog",
    "Loader",
    "collate",
    "make_loader",
    "DatasetSplits",
    "load_dataset",
    "split_validation",
    "stratified_split",
    "train_transform",
    "eval_transform",
    "TwoViews",
    "MEAN",
    "STD",
    "NAMED_DATASETS",
    "DEFAULT_IMAGE_SIZE",
]
