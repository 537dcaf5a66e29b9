"""`--out` never costs the user a file: issue "The index under writes and at scale", item 1.

Every case writes files the user owns, runs a build against them, and checks each one is still
there byte for byte (or that the build was refused before anything changed).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from _helpers import save_tiny_model

from cbir.cli import main
from cbir.codes import Codes
from cbir.indexer import build_index, open_index
from cbir.indexer.publish import OutputExistsError, exchange, foreign_entries


def _codes(n, seed=0):
    return Codes(np.random.default_rng(seed).integers(0, 256, (n, 2), dtype=np.uint8), 16)


def _snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _user_files(root: Path) -> dict[str, str]:
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "notes.txt").write_text("my notes")
    return _snapshot(root)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model.pt", ("cat", "dog"), nbits=7, depth=6)


def _build_cli(model, images, out, *extra):
    return main(
        [
            "index",
            "build",
            "--model",
            str(model),
            "--images",
            str(images),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--no-progress",
            *extra,
        ]
    )


def test_out_equal_to_image_folder_is_refused(tmp_path, model_path, capsys):
    d = tmp_path / "D"
    before = _user_files(d)
    assert _build_cli(model_path, d, d) == 2
    err = capsys.readouterr().err
    assert "inside the image source" in err and "--force" in err
    assert _snapshot(d) == before


def test_out_inside_image_folder_is_refused(tmp_path, model_path, capsys):
    d = tmp_path / "D"
    before = _user_files(d)
    assert _build_cli(model_path, d, d / "ix") == 2
    assert "inside the image source" in capsys.readouterr().err
    assert _snapshot(d) == before and not (d / "ix").exists()


def test_out_with_user_files_is_refused(tmp_path, model_path, capsys):
    imgs, other = tmp_path / "imgs", tmp_path / "other"
    _user_files(imgs)
    before = _user_files(other)
    assert _build_cli(model_path, imgs, other) == 2
    err = capsys.readouterr().err
    assert "not a cbir index" in err and "notes.txt" in err
    assert err.startswith("cbir index build: error:")  # names the sub-command, one line
    assert len(err.strip().splitlines()) == 1
    assert _snapshot(other) == before


def test_force_into_image_folder_keeps_every_file(tmp_path, model_path):
    d = tmp_path / "D"
    before = _user_files(d)
    assert _build_cli(model_path, d, d, "--force") == 0
    after = _snapshot(d)
    assert {k: after[k] for k in before} == before  # every user file, byte for byte
    with open_index(d) as r:
        assert r.count() == 6
    # a second forced build replaces only the index's own entries
    assert _build_cli(model_path, d / "cat", d, "--force") == 0
    assert {k: _snapshot(d)[k] for k in before} == before
    with open_index(d) as r:
        assert r.count() == 3


def test_out_a_file_is_refused_even_with_force(tmp_path):
    f = tmp_path / "ix"
    f.write_text("precious")
    for force in (False, True):
        with pytest.raises(OutputExistsError, match="not a directory"):
            build_index(f, np.arange(3), _codes(3), force=force)
    assert f.read_text() == "precious"


def test_index_with_a_user_file_inside_is_not_replaced(tmp_path):
    out = tmp_path / "ix"
    build_index(out, np.arange(5), _codes(5))
    (out / "README").write_text("mine")
    (out / "lmdb" / "backup.txt").write_text("mine too")
    with pytest.raises(OutputExistsError, match="README"):
        build_index(out, np.arange(7), _codes(7, 1))
    # --force may not overwrite a directory of the index that holds a foreign file
    with pytest.raises(OutputExistsError, match="lmdb/backup.txt"):
        build_index(out, np.arange(7), _codes(7, 1), force=True)
    os.remove(out / "lmdb" / "backup.txt")
    build_index(out, np.arange(7), _codes(7, 1), force=True)
    assert (out / "README").read_text() == "mine"
    with open_index(out) as r:
        assert r.count() == 7


def test_foreign_manifest_is_not_an_index(tmp_path):
    out = tmp_path / "ix"
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(OutputExistsError):
        build_index(out, np.arange(3), _codes(3))
    with pytest.raises(OutputExistsError, match="manifest.json"):
        build_index(out, np.arange(3), _codes(3), force=True)
    assert (out / "manifest.json").read_text() == '{"format": "something-else"}'


def test_empty_dir_and_existing_index_are_replaced(tmp_path):
    out = tmp_path / "ix"
    out.mkdir()
    build_index(out, np.arange(4), _codes(4))
    assert foreign_entries(out) == []
    with open_index(out) as r:
        assert r.count() == 4
    build_index(out, np.arange(9), _codes(9, 2))  # a plain cbir index: replaced
    with open_index(out) as r:
        assert r.count() == 9
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]  # no temp or old directory left


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    (b / "y").write_text("b")
    if not exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here (two-rename fallback used)")
    assert (a / "y").read_text() == "b" and (b / "x").read_text() == "a"


def test_cleanup_never_removes_foreign_lookalikes(tmp_path):
    """A directory merely *named* like cbir's temp dirs but holding user files survives."""
    fake = tmp_path / ".ix.tmp-999999999-abcd"
    fake.mkdir()
    (fake / "photo.jpg").write_bytes(b"\xff\xd8")
    old = tmp_path / ".ix.old-999999999-abcd"
    old.mkdir()
    (old / "doc.txt").write_text("keep")
    build_index(tmp_path / "ix", np.arange(3), _codes(3))
    assert (fake / "photo.jpg").exists() and (old / "doc.txt").read_text() == "keep"
