"""`cbir index build --engine ray` (issue 14, item 2): Ray Data encodes a collection into the
same codes as the single-process path, byte for byte, on a local Ray started here."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import save_tiny_model

from cbir.cli import main

ray = pytest.importorskip("ray", reason='needs Ray Data: pip install -e ".[distributed]"')


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


def _images(root, n_per_class=11):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (20 + i, 24 + 2 * i, 3), dtype=np.uint8)).save(
                root / c / f"{i:02d}.png"
            )
    (root / "cat" / "05b.png").write_bytes(b"not a png")  # unreadable, mid-batch
    (root / "dog" / "zz.jpg").write_bytes(b"")


def test_work_units_cover_the_chunks_in_equal_shares():
    from cbir.distributed.ray_encode import work_units

    assert work_units(64, 2, max_chunks=64) == [(0, 32), (32, 32)]  # one task per worker
    assert work_units(200, 2, max_chunks=64) == [(0, 50), (50, 50), (100, 50), (150, 50)]  # a multiple of 2
    assert work_units(5, 2) == [(0, 3), (3, 2)] and work_units(1, 4) == [(0, 1)] and work_units(0, 2) == []
    assert work_units(7, 2, chunks_per_task=3) == [(0, 3), (3, 3), (6, 1)]


def test_ray_encode_equals_single_process(tmp_path, model_path, local_ray, capsys, caplog):
    from cbir.cli.index_cmd import _image_folder
    from cbir.data import SkipLog
    from cbir.distributed.ray_encode import encode_with_ray
    from cbir.indexer import open_index
    from cbir.models.hasher import Hasher

    _images(tmp_path / "imgs")
    iset = _image_folder(tmp_path / "imgs")
    h = Hasher.load(model_path, device="cpu", batch_size=5)
    s1, s2 = SkipLog(), SkipLog()
    c1, f1, i1 = h.encode_imageset(iset, batch_size=5, skip_log=s1)
    c2, f2, i2 = encode_with_ray(model_path, iset, batch_size=5, skip_log=s2)
    assert len(i1) == 22 and s1.count == 2
    assert c2.packed.tobytes() == c1.packed.tobytes() and c2.nbits == c1.nbits  # byte for byte
    assert np.array_equal(i2, i1) and np.allclose(f2, f1, atol=1e-6)
    assert s2.items == s1.items  # unreadable images reported (path, reason) and skipped
    # one batch per task (5 tasks, 2 at once, results arriving out of order): the same codes
    c3, f3, i3 = encode_with_ray(model_path, iset, batch_size=5, chunks_per_task=1)
    assert c3.packed.tobytes() == c1.packed.tobytes() and np.array_equal(i3, i1) and np.allclose(f3, f1, atol=1e-6)
    c4, _, i4 = encode_with_ray(model_path, iset.subset([]), batch_size=5)  # nothing to encode
    assert len(c4) == 0 and len(i4) == 0 and c4.nbits == c1.nbits
    # the CLI: --engine ray (sharded too) builds the index of the local engine
    base = [
        "index",
        "build",
        "--model",
        str(model_path),
        "--images",
        str(tmp_path / "imgs"),
        "--batch-size",
        "4",
        "--no-progress",
    ]
    assert main(base + ["--out", str(tmp_path / "local")]) == 0
    assert main(base + ["--out", str(tmp_path / "ray"), "--engine", "ray", "--shards", "2"]) == 0
    assert "indexed 22 images (2 unreadable skipped)" in capsys.readouterr().out
    with open_index(tmp_path / "local") as a, open_index(tmp_path / "ray") as b:
        pa, pb = a.search_prefix("", 100), b.search_prefix("", 100)
        assert np.array_equal(pa.ids, pb.ids) and pa.codes.packed.tobytes() == pb.codes.packed.tobytes()
        assert b.manifest["build"]["engine"] == "ray" and b.manifest["build"]["skipped"] == 2
        assert b.get(int(pa.ids[0])).meta == a.get(int(pa.ids[0])).meta
