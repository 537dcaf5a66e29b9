"""One preprocessing path: the same pixels give the same tensor and the same code whether they
arrive in an .npz, as image files, or as the bytes of a gRPC payload (issue "Codes worth
indexing", item 6)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from cbir.data import ImageSet, eval_transform, load_dataset, shared_datasets_dir
from cbir.data.images import decode_image
from cbir.data.transforms import resize_uint8


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hasher():
    from cbir.models.hasher import Hasher
    from cbir.models.registry import MethodSpec, create_method, resolve_params

    torch.manual_seed(0)
    spec = MethodSpec(
        backbone="convnet",
        num_classes=10,
        nbits=16,
        depth=12,
        class_names=tuple(str(i) for i in range(10)),
        backbone_kwargs=(("width", 8),),
    )
    params = resolve_params("ddtl", None)
    return Hasher(create_method("ddtl", spec, params), "ddtl", spec, params, image_size=32, device="cpu", batch_size=64)


@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28), (40, 30, 3), (20, 52, 3), (8, 8)])
def test_resize_batched_equals_per_image_and_file_path(shape):
    rng = np.random.default_rng(sum(shape))
    arrs = rng.integers(0, 256, (6, *shape), dtype=np.uint8)
    t = torch.from_numpy(arrs)
    t = t.unsqueeze(1).expand(-1, 3, -1, -1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    batched = resize_uint8(t.contiguous(), 32)
    tf = eval_transform(32)
    for i, a in enumerate(arrs):
        via_file = tf(decode_image(_png_bytes(a)))
        via_tensor = tf(batched[i])
        assert torch.equal(via_file, via_tensor), f"image {i} of shape {shape}"
        assert torch.equal(resize_uint8(t[i].contiguous(), 32), batched[i])


def test_npz_and_folder_give_equal_codes(tmp_path, hasher):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (40, 28, 28, 3), dtype=np.uint8)  # needs resizing to 32
    labels = np.repeat(np.arange(4), 10)
    split = np.where(np.arange(40) % 5 == 0, "test", "train")
    np.savez(tmp_path / "set.npz", images=imgs, labels=labels, split=split)
    npz = load_dataset(tmp_path / "set.npz", image_size=32)
    paths = []
    for i, a in enumerate(imgs):
        p = tmp_path / f"{i}.png"
        p.write_bytes(_png_bytes(a))
        paths.append(str(p))
    files = ImageSet(labels, tuple("abcd"), paths=paths)
    for part, idx in ((npz.database, np.flatnonzero(split == "train")), (npz.query, np.flatnonzero(split == "test"))):
        assert np.array_equal(part.labels, labels[idx])
        c_npz, _ = hasher.encode(part)
        c_files, _ = hasher.encode(files.subset(idx))
        c_bytes, _ = hasher.encode([decode_image(open(paths[j], "rb").read()) for j in idx])
        assert np.array_equal(c_npz.packed, c_files.packed)
        assert np.array_equal(c_npz.packed, c_bytes.packed)


def _shared(name):
    root = shared_datasets_dir()
    if root is None or not (root / name).is_file():
        pytest.skip(f"{name} not found in ../shared/datasets (set CBIR_DATASETS)")
    return root / name


@pytest.mark.parametrize("dataset,file", [("cifar10-subset", "cifar10-subset.npz"), ("mnist", "mnist-test.npz")])
def test_shared_sets_npz_vs_files_vs_payload_100_percent_equal(tmp_path, hasher, dataset, file):
    """Real query images (CIFAR 32x32 as is; MNIST 28x28 grey, resized to 32): all codes equal."""
    with np.load(_shared(file)) as z:
        raw = z["images"]
        idx = (
            np.flatnonzero(z["split"] == "test") if "split" in z.files else np.arange(len(raw) - 1000, len(raw))
        )  # MNIST: the last 1,000 are queries
    q = load_dataset(dataset, image_size=32).query
    assert len(q) == len(idx)
    c_npz, _ = hasher.encode(q)
    payloads = [_png_bytes(raw[j]) for j in idx]
    paths = []
    for j, b in zip(idx, payloads):
        p = tmp_path / f"{j}.png"
        p.write_bytes(b)
        paths.append(str(p))
    c_files, _ = hasher.encode(ImageSet(q.labels, q.class_names, paths=paths))
    c_bytes, _ = hasher.encode([decode_image(b) for b in payloads])
    eq_files = float((c_npz.packed == c_files.packed).all(axis=1).mean())
    eq_bytes = float((c_npz.packed == c_bytes.packed).all(axis=1).mean())
    print(f"{dataset}: {len(idx)} queries, npz==files {eq_files:.4f}, npz==payload {eq_bytes:.4f}")
    assert (eq_files, eq_bytes) == (1.0, 1.0), f"{dataset}: files {eq_files:.4f}, payload {eq_bytes:.4f}"


def test_eval_loader_transforms_whole_batches_exactly_as_image_by_image(tmp_path):
    """The evaluation loader applies the transform to each batch at once (grouped by size);
    mixed sizes, grey images and a corrupt file in one batch give the per-image tensors, in
    order, with the corrupt file reported and left out."""
    from cbir.data import SkipLog
    from cbir.models.hasher import eval_loader

    rng = np.random.default_rng(7)
    shapes = [(48, 48, 3), (32, 32, 3), (48, 48, 3), (40, 30), (32, 32, 3), (20, 52, 3), (48, 48, 3)]
    paths = []
    for i, shape in enumerate(shapes):
        p = tmp_path / f"{i}.png"
        p.write_bytes(_png_bytes(rng.integers(0, 256, shape, dtype=np.uint8)))
        paths.append(str(p))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    paths.insert(3, str(bad))
    iset = ImageSet(paths=paths, labels=np.zeros(len(paths), np.int64), class_names=("x",))
    tf = eval_transform(32)
    log = SkipLog()
    batches = list(eval_loader(iset, tf, batch_size=5, skip_log=log))
    got = torch.cat([b.images for b in batches])
    idx = torch.cat([b.indices for b in batches]).tolist()
    assert idx == [0, 1, 2, 4, 5, 6, 7] and log.count == 1
    want = torch.stack([tf(decode_image(open(paths[i], "rb").read())) for i in idx])
    assert got.dtype == torch.float32 and torch.equal(got, want)
