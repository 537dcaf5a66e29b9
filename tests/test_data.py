"""Tests of cbir.data: protocols, sources, corrupt-file handling, transforms (real data, no mocks)."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cbir.data import (
    Batch,
    CorruptImageError,
    ImageSet,
    SkipLog,
    Skipped,
    TwoViews,
    decode_image,
    eval_transform,
    load_dataset,
    make_loader,
    shared_datasets_dir,
    split_validation,
    train_transform,
)


# -- helpers -----------------------------------------------------------------------------
def _rgb(seed: int, size=(20, 16), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _union(splits) -> ImageSet:
    """database + query of a file-backed split, with the database (eval) transform."""
    return ImageSet(
        np.concatenate([splits.database.labels, splits.query.labels]),
        splits.class_names,
        paths=splits.database.paths + splits.query.paths,
        transform=splits.database.transform,
    )


@pytest.fixture
def image_folder(tmp_path):
    """3 classes of small real images (PNG, JPEG, grey, palette, RGBA) + 2 broken files."""
    root = tmp_path / "imgs"
    specs = {
        "cat": [("a.png", "PNG", "RGB"), ("b.jpg", "JPEG", "RGB"), ("c.png", "PNG", "L"), ("d.png", "PNG", "RGBA")],
        "dog": [("a.jpeg", "JPEG", "RGB"), ("b.png", "PNG", "P"), ("c.bmp", "BMP", "RGB"), ("d.png", "PNG", "RGB")],
        "fox": [("a.png", "PNG", "RGB"), ("b.png", "PNG", "RGB"), ("c.jpg", "JPEG", "L"), ("d.png", "PNG", "RGB")],
    }
    seed = 0
    for cls, files in specs.items():
        (root / cls).mkdir(parents=True)
        for fname, fmt, mode in files:
            seed += 1
            (root / cls / fname).write_bytes(_encode(_rgb(seed, mode=mode), fmt))
    # broken files: random bytes with an image extension, and a truncated JPEG
    (root / "cat" / "corrupt.png").write_bytes(np.random.default_rng(99).bytes(500))
    jpg = _encode(_rgb(123, size=(64, 64)), "JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "fox" / "notes.txt").write_text("not an image, ignored")  # unknown extension
    return root


# -- digits protocol ---------------------------------------------------------------------
def test_digits_protocol_sizes_and_stratification():
    s = load_dataset("digits")
    assert s.name == "digits" and s.image_size == 32 and s.flip_ok is False
    assert (len(s.train), len(s.database), len(s.query)) == (1497, 1497, 300)
    assert s.num_classes == 10 and not s.multilabel
    assert s.class_names == tuple(str(i) for i in range(10))
    assert np.array_equal(np.bincount(s.query.labels, minlength=10), np.full(10, 30))
    assert np.bincount(s.database.labels, minlength=10).sum() == 1497
    assert s.database.images.shape == (1497, 3, 32, 32) and s.database.images.dtype == torch.uint8
    x, y, i = s.query[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and i == 5
    assert isinstance(y, int) and y == int(s.query.labels[5])
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    # grey replicated to 3 channels
    assert torch.equal(s.query.images[:, 0], s.query.images[:, 1])
    xt, _, _ = s.train[0]
    assert xt.shape == (3, 32, 32) and xt.dtype == torch.float32


def test_digits_split_is_deterministic_and_disjoint():
    a, b = load_dataset("digits"), load_dataset("digits", seed=5)
    assert torch.equal(a.query.images, b.query.images)  # the named protocol is fixed
    assert np.array_equal(a.query.labels, b.query.labels)
    qa = {bytes(t.numpy().tobytes()) + bytes([int(l)]) for t, l in zip(a.query.images, a.query.labels)}
    da = {bytes(t.numpy().tobytes()) + bytes([int(l)]) for t, l in zip(a.database.images, a.database.labels)}
    # digits has a few exact duplicate images; the overlap may only come from those
    assert len(qa & da) <= 5
    c = load_dataset("digits", image_size=16)
    assert c.query.images.shape[-1] == 16 and c.query[0][0].shape == (3, 16, 16)


def test_split_validation_stratified_and_deterministic():
    s = load_dataset("digits")
    tr, va = split_validation(s.train, 0.2, seed=1)
    tr2, va2 = split_validation(s.train, 0.2, seed=1)
    assert len(tr) + len(va) == len(s.train)
    assert np.array_equal(va.labels, va2.labels) and torch.equal(va.images, va2.images)
    counts = np.bincount(va.labels, minlength=10)
    full = np.bincount(s.train.labels, minlength=10)
    assert np.all(np.abs(counts - 0.2 * full) <= 1)
    assert va.transform is s.train.transform  # keeps the transform
    _, va3 = split_validation(s.train, 0.2, seed=2)
    assert not torch.equal(va.images, va3.images)


# -- image folder with corrupt files -------------------------------------------------------
def test_image_folder_skips_corrupt_and_truncated(image_folder, caplog):
    s = load_dataset(str(image_folder), query_fraction=0.25, seed=0, image_size=24)
    assert s.class_names == ("cat", "dog", "fox")
    n_all = len(s.database) + len(s.query)
    assert n_all == 14  # 12 good + 2 broken; notes.txt ignored
    assert s.database.paths is not None and all(p.startswith(str(image_folder)) for p in s.database.paths)
    allset = _union(s)
    skip_log = SkipLog()
    seen, skipped_paths = [], []
    for part in (s.database, s.query):
        with caplog.at_level(logging.WARNING, logger="cbir.data"):
            for b in make_loader(part, batch_size=3, skip_log=skip_log):
                assert isinstance(b, Batch)
                assert b.images.shape[1:] == (3, 24, 24) and b.images.dtype == torch.float32
                assert b.targets.dtype == torch.int64 and b.indices.dtype == torch.int64
                assert len(b.images) == len(b.targets) == len(b.indices) >= 1
                seen += [part.paths[int(i)] for i in b.indices]
                skipped_paths += [p for p, _ in b.skipped]
    assert len(seen) == 12 and skip_log.count == 2
    assert sorted(skipped_paths) == sorted(p for p, _ in skip_log.items)
    names = {p.split("/")[-1]: r for p, r in skip_log.items}
    assert set(names) == {"corrupt.png", "truncated.jpg"}
    assert "truncated" in names["truncated.jpg"].lower()
    assert "2 unreadable" in skip_log.summary() and "corrupt.png" in skip_log.summary()
    assert sum("corrupt.png" in r.getMessage() for r in caplog.records) == 1
    # direct access: a Skipped record, never an exception
    k = next(i for i, p in enumerate(allset.paths) if p.endswith("corrupt.png"))
    rec = allset[k]
    assert isinstance(rec, Skipped) and rec.path.endswith("corrupt.png") and rec.reason
    assert rec.index == k
    with pytest.raises(CorruptImageError):
        allset.get_pil(k)
    good = next(i for i, p in enumerate(allset.paths) if p.endswith("a.png"))
    assert allset.get_pil(good).mode == "RGB"


def test_image_folder_loader_with_workers(image_folder):
    s = load_dataset(str(image_folder), query_fraction=0.25, seed=0, image_size=16)
    full = _union(s)  # database + query, so every broken file is in this set
    skip_log = SkipLog()
    n = 0
    loader = make_loader(full, batch_size=2, shuffle=True, num_workers=2, seed=0, skip_log=skip_log)
    for b in loader:
        n += len(b)
        assert b.images.shape[1:] == (3, 16, 16)
    assert n == 12 and skip_log.count == 2 and skip_log.occurrences == 2
    # a second epoch does not double-count the same files
    for _ in loader:
        pass
    assert skip_log.count == 2 and skip_log.occurrences == 4


def test_all_corrupt_batch_is_dropped(tmp_path):
    for k in range(2):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"bad{k}.png").write_bytes(b"\x89PNG not really" * k)
    (tmp_path / "c" / "ok.png").write_bytes(_encode(_rgb(1), "PNG"))
    ds = ImageSet(
        np.zeros(3, np.int64),
        ["c"],
        paths=sorted(str(p) for p in (tmp_path / "c").iterdir()),
        transform=eval_transform(8),
    )
    log = SkipLog()
    batches = list(make_loader(ds, batch_size=2, skip_log=log))  # [bad0, bad1], [ok]
    assert len(batches) == 1 and len(batches[0]) == 1 and log.count == 2
    assert any("empty" in r for _, r in log.items)


def test_seeded_shuffle_is_reproducible():
    s = load_dataset("digits")

    def order(seed):
        return torch.cat([b.indices for b in make_loader(s.database, 256, shuffle=True, seed=seed)])

    a, b, c = order(3), order(3), order(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.sort(a).values, torch.arange(len(s.database)))


def test_empty_folder_and_missing_sources(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_dataset(str(tmp_path))
    (tmp_path / "x.png").write_bytes(_encode(_rgb(0), "PNG"))
    with pytest.raises(ValueError, match="sub-folder"):
        load_dataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="CBIR_DATASETS"):
        load_dataset("cifar10-subset", root=tmp_path)
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "nope"))


# -- manifests -----------------------------------------------------------------------------
def _write_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        p = folder / f"im{k}.png"
        p.write_bytes(_encode(_rgb(k), "PNG"))
        out.append(p)
    return out


def test_csv_manifest_multilabel(tmp_path):
    imgs = _write_images(tmp_path / "pics", 10)
    labels = ["sky|sea", "sea", "tree;sky", "tree", "sky", "sea|tree", "sky", "sea", "tree", ""]
    lines = ["path,labels"]
    for k, (p, lab) in enumerate(zip(imgs, labels)):
        lines.append(f"{p if k == 0 else 'pics/' + p.name},{lab}")
    lines.append("pics/missing.png,sky")
    man = tmp_path / "m.csv"
    man.write_text("\n".join(lines) + "\n")
    s = load_dataset(str(man), query_fraction=0.2, seed=0, image_size=16)
    assert s.multilabel and s.class_names == ("sea", "sky", "tree")
    assert len(s.database) + len(s.query) == 10  # the unlabelled row is left out
    assert s.database.labels.dtype == np.uint8 and s.database.labels.shape[1] == 3
    both = _union(s)
    first = both.paths.index(str(imgs[0]))
    assert both.labels[first].tolist() == [1, 1, 0]
    log = SkipLog()
    got = list(make_loader(both, 4, skip_log=log))
    assert sum(len(b) for b in got) == 9 and log.count == 1
    assert "missing.png" in log.items[0][0]
    assert got[0].targets.dtype == torch.float32 and got[0].targets.shape[1] == 3


def test_jsonl_manifest_single_and_multi(tmp_path):
    imgs = _write_images(tmp_path, 6)
    single = tmp_path / "s.jsonl"
    single.write_text("\n".join(json.dumps({"path": p.name, "label": k % 2}) for k, p in enumerate(imgs)) + "\n\n")
    s = load_dataset(str(single), query_fraction=0.34, seed=0, image_size=8)
    assert not s.multilabel and s.class_names == ("0", "1")
    assert len(s.query) == 2 and sorted(s.query.labels.tolist()) == [0, 1]
    x, y, _ = s.query[0]
    assert x.shape == (3, 8, 8) and isinstance(y, int)
    multi = tmp_path / "m.jsonl"
    multi.write_text(
        "\n".join(json.dumps({"path": p.name, "labels": ["a", "b"][: 1 + k % 2]}) for k, p in enumerate(imgs))
    )
    m = load_dataset(str(multi), seed=0)
    assert m.multilabel and m.num_classes == 2
    nolab = tmp_path / "n.jsonl"
    nolab.write_text("\n".join(json.dumps({"path": p.name}) for p in imgs))
    with pytest.raises(ValueError, match="no labels"):
        load_dataset(str(nolab))
    empty = tmp_path / "e.csv"
    empty.write_text("path,labels\n")
    with pytest.raises(ValueError, match="empty"):
        load_dataset(str(empty))


# -- transforms ----------------------------------------------------------------------------
def test_two_views_and_transforms():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    tv = TwoViews(train_transform(32, flip=True))
    a, b = tv(x)
    assert a.shape == b.shape == (3, 32, 32) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    assert type(a) is torch.Tensor
    e = eval_transform(32)
    assert torch.equal(e(x), e(x))
    assert torch.allclose(e(x), x.float() / 127.5 - 1.0, atol=1e-6)
    pil = _rgb(3, size=(50, 30))
    assert e(pil).shape == (3, 32, 32)
    assert train_transform(24, flip=False, strength=0.0)(pil).shape == (3, 24, 24)
    s = load_dataset("digits")
    ds = s.train.with_transform(TwoViews(s.train.transform))
    assert ds.labels is s.train.labels and ds.images is s.train.images
    b = next(iter(make_loader(ds, 8)))
    assert isinstance(b.images, tuple) and b.images[0].shape == (8, 3, 32, 32)
    assert not torch.equal(b.images[0], b.images[1])


# -- decode_image --------------------------------------------------------------------------
def test_decode_image_formats_and_errors(monkeypatch):
    for fmt, mode in [
        ("PNG", "L"),
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("JPEG", "RGB"),
        ("BMP", "RGB"),
        ("GIF", "P"),
        ("TIFF", "RGB"),
        ("WEBP", "RGB"),
    ]:
        try:
            data = _encode(_rgb(1, mode=mode), fmt)
        except (OSError, KeyError):  # codec not built into this Pillow
            continue
        img = decode_image(data)
        assert img.mode == "RGB" and img.size == (20, 16)
    with pytest.raises(CorruptImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(CorruptImageError, match="not a recognised image"):
        decode_image(np.random.default_rng(0).bytes(300))
    jpg = _encode(_rgb(2, size=(64, 64)), "JPEG")
    with pytest.raises(CorruptImageError, match="truncated"):
        decode_image(jpg[: len(jpg) // 2])
    png = _encode(_rgb(2, size=(64, 64)), "PNG")
    with pytest.raises(CorruptImageError):
        decode_image(png[: len(png) // 2])
    assert issubclass(CorruptImageError, ValueError)
    with pytest.raises(CorruptImageError, match="decompression bomb"):
        decode_image(png, max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(CorruptImageError, match="decompression bomb"):
        decode_image(png)


# -- shared datasets -----------------------------------------------------------------------
def _shared():
    d = shared_datasets_dir()
    if d is None:
        pytest.skip("../shared/datasets not found (set CBIR_DATASETS to run this test)")
    return d


def test_cifar10_subset_protocol():
    d = _shared()
    if not (d / "cifar10-subset.npz").is_file():
        pytest.skip(f"cifar10-subset.npz not in {d}")
    s = load_dataset("cifar10-subset")
    assert (len(s.train), len(s.database), len(s.query)) == (4660, 4660, 846)
    assert s.flip_ok and s.image_size == 32 and s.num_classes == 10
    assert s.database.images.shape == (4660, 3, 32, 32)
    x, y, _ = s.query[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert s.query.get_pil(0).size == (32, 32)


def test_mnist_protocol():
    d = _shared()
    if not (d / "mnist-test.npz").is_file():
        pytest.skip(f"mnist-test.npz not in {d}")
    s = load_dataset("mnist")
    assert (len(s.train), len(s.database), len(s.query)) == (9000, 9000, 1000)
    assert not s.flip_ok and s.image_size == 32
    with np.load(d / "mnist-test.npz") as z:
        assert np.array_equal(s.query.labels, z["labels"][9000:])
    assert s.query[0][0].shape == (3, 32, 32)


def test_npz_path_source(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "toy.npz"
    np.savez(
        p,
        images=rng.integers(0, 256, (40, 12, 12, 3), dtype=np.uint8),
        labels=np.repeat(np.arange(4), 10),
        split=np.array(["train"] * 30 + ["test"] * 10),
    )
    s = load_dataset(str(p), image_size=16)
    assert len(s.query) == 10 and len(s.database) == 30 and s.num_classes == 4
    assert s.query[0][0].shape == (3, 16, 16)
    p2 = tmp_path / "grey.npz"
    np.savez(p2, images=rng.integers(0, 256, (20, 10, 10), dtype=np.uint8), labels=np.repeat(np.arange(2), 10))
    s2 = load_dataset(str(p2), query_fraction=0.2)
    assert len(s2.query) == 4 and s2.class_names == ("0", "1")
    empty = tmp_path / "empty.npz"
    np.savez(empty, images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="empty"):
        load_dataset(str(empty))
