"""`cbir index build` / `cbir index stats` end to end with a tiny real (untrained) model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _helpers import save_tiny_model

from cbir.cli import main
from cbir.codes import rank
from cbir.indexer import open_index


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


def _images(root, n_per_class=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(arr, "RGB").save(root / c / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")


def test_index_build_and_stats(tmp_path, model_path, capsys, caplog):
    from cbir.models.hasher import Hasher

    _images(tmp_path / "imgs")
    out = tmp_path / "ix"
    rc = main(
        [
            "index",
            "build",
            "--model",
            str(model_path),
            "--images",
            str(tmp_path / "imgs"),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 0
    cap = capsys.readouterr()
    assert "indexed 12 images (1 unreadable skipped)" in cap.out
    reports = [r.getMessage() for r in caplog.records if "broken.png" in r.getMessage()]
    reports += [ln for ln in (cap.out + cap.err).splitlines() if "broken.png" in ln]
    assert len(reports) == 1 and "unreadable" in reports[0]  # reported once, with its reason
    h = Hasher.load(model_path, device="cpu")
    with open_index(out) as r:
        assert r.count() == 12 and r.model_hash == h.content_hash
        assert r.layout == h.layout
        assert r.manifest["build"]["skipped"] == 1
        ids = np.array(sorted(int(i) for i in r.search_prefix("", 100).ids))
        items = [r.get(int(i)) for i in ids]
        assert {it.meta["label"] for it in items} == {"cat", "dog"}
        assert all(it.meta["path"].endswith(".png") and it.conf is not None for it in items)
        # the stored codes are the model's codes of those files
        from PIL import Image

        codes, _ = h.encode([Image.open(it.meta["path"]) for it in items])
        assert np.array_equal(codes.packed, np.concatenate([it.code.packed for it in items]))
        q = codes[:1]
        assert np.array_equal(r.search_lex(q, 12).ids, ids[rank(q, codes, 12, ids=ids)[0]])
    rc = main(["index", "stats", str(out), "--json"])
    st = json.loads(capsys.readouterr().out)
    assert rc == 0 and st["count"] == 12 and st["coverage"]["n"] == 12
    assert main(["index", "stats", str(out)]) == 0
    assert "unique codes" in capsys.readouterr().out


def test_index_build_errors(tmp_path, model_path, capsys):
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                str(model_path),
                "--images",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "ix"),
            ]
        )
        == 2
    )
    assert main(["index", "stats", str(tmp_path)]) == 2
    assert "not a cbir index" in capsys.readouterr().err


def test_index_compact(tmp_path, capsys):
    from cbir.codes import CodeLayout, Codes
    from cbir.indexer import IndexWriter

    rng = np.random.default_rng(0)
    with IndexWriter(tmp_path / "ix", layout=CodeLayout(16)) as w:
        for _ in range(20):
            w.upsert(
                np.arange(500), Codes(rng.integers(0, 256, (500, 2), dtype=np.uint8), 16), [{"p": "x" * 100}] * 500
            )
    before = (tmp_path / "ix" / "lmdb" / "data.mdb").stat().st_size
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["index", "compact", str(tmp_path / "ix")]) == 0
    assert "compacted" in capsys.readouterr().out
    assert (tmp_path / "ix" / "lmdb" / "data.mdb").stat().st_size < before
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "keep.txt"]
    with open_index(tmp_path / "ix") as r:
        assert r.count() == 500 and r.get(499).meta == {"p": "x" * 100}
    assert main(["index", "compact", str(tmp_path / "nothing")]) == 2


def test_index_build_sharded(tmp_path, model_path, capsys):
    """--shards 4: the same items and codes as a plain build, split by their leading bits."""
    _images(tmp_path / "imgs")
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
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert main(base + ["--out", str(tmp_path / "sh"), "--shards", "4"]) == 0
    assert "(4 shards)" in capsys.readouterr().out
    with open_index(tmp_path / "plain") as a, open_index(tmp_path / "sh") as b:
        assert type(b).__name__ == "ShardedReader" and b.count() == a.count() == 12
        pa, pb = a.search_prefix("", 100), b.search_prefix("", 100)
        assert np.array_equal(pa.ids, pb.ids) and pa.codes == pb.codes
        for i in pa.ids[:3]:
            assert b.get(int(i)).meta == a.get(int(i)).meta
        q = pa.codes[5:6]
        assert np.array_equal(a.search_lex(q, 12).ids, b.search_lex(q, 12).ids)
        assert np.array_equal(a.search_hamming(q, k=12).ids, b.search_hamming(q, k=12).ids)
        assert b.manifest["build"]["skipped"] == 1 and b.model_hash == a.model_hash
    assert main(["index", "stats", str(tmp_path / "sh"), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["count"] == 12 and len(st["shards"]) == 4 and st["coverage"]["n"] == 12
    assert main(["index", "stats", str(tmp_path / "sh")]) == 0
    assert "shards       4 by the leading 2 bits" in capsys.readouterr().out
    assert main(["index", "compact", str(tmp_path / "sh")]) == 0
    assert main(base + ["--out", str(tmp_path / "bad"), "--shards", "3"]) == 2
    assert "power of two" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_index_build_engine_ray_without_ray(tmp_path, model_path, capsys, monkeypatch):
    """Without Ray installed, --engine ray is one clear error saying how to install it."""
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray -> ImportError
    _images(tmp_path / "imgs", 1)
    rc = main(
        [
            "index",
            "build",
            "--model",
            str(model_path),
            "--images",
            str(tmp_path / "imgs"),
            "--out",
            str(tmp_path / "ix"),
            "--engine",
            "ray",
            "--no-progress",
        ]
    )
    assert rc == 2 and 'pip install -e ".[distributed]"' in capsys.readouterr().err
    assert not (tmp_path / "ix").exists()
