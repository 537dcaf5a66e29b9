"""A user's own train/query split is honoured: split folders and manifest split columns."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from cbir.data import load_dataset


def _img(p, seed):
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(p)
    return str(p)


def test_split_folders_are_splits_not_classes(tmp_path):
    root = tmp_path / "photos"
    train = [_img(root / "train" / c / f"{i}.png", i) for c in ("cat", "dog") for i in range(4)]
    query = [_img(root / "query" / c / f"q{i}.png", 10 + i) for c in ("cat", "dog", "owl") for i in range(2)]
    sp = load_dataset(root)
    assert sp.class_names == ("cat", "dog", "owl")  # one vocabulary over both splits
    assert sorted(sp.train.paths) == sorted(train) and sorted(sp.query.paths) == sorted(query)
    assert set(sp.query.paths).isdisjoint(sp.train.paths)
    names = np.array(sp.class_names)
    assert [p.split("/")[-2] for p in sp.query.paths] == list(names[sp.query.labels])
    assert [p.split("/")[-2] for p in sp.train.paths] == list(names[sp.train.labels])


def test_test_and_database_are_split_names_too(tmp_path):
    root = tmp_path / "set"
    for i in range(3):
        _img(root / "database" / "a" / f"{i}.png", i)
        _img(root / "test" / "a" / f"{i}.png", 5 + i)
    sp = load_dataset(root)
    assert len(sp.database) == 3 and len(sp.query) == 3 and sp.class_names == ("a",)


def test_a_class_named_train_beside_other_classes_warns_and_stays_a_class(tmp_path, caplog):
    root = tmp_path / "set"
    for c in ("train", "cat", "dog"):
        for i in range(10):
            _img(root / c / f"{i}.png", i)
    with caplog.at_level(logging.WARNING):
        sp = load_dataset(root)
    assert sp.class_names == ("cat", "dog", "train")
    assert "look like split folders" in caplog.text


def test_manifest_split_column_csv_and_jsonl(tmp_path):
    rows = [(_img(tmp_path / f"{i}.png", i), "ab"[i % 2], "query" if i < 4 else "train") for i in range(12)]
    csv = tmp_path / "m.csv"
    csv.write_text("path,label,split\n" + "".join(f"{p},{lab},{s}\n" for p, lab, s in rows))
    jl = tmp_path / "m.jsonl"
    jl.write_text("".join(json.dumps({"path": p, "labels": [lab], "split": s}) + "\n" for p, lab, s in rows))
    for m in (csv, jl):
        sp = load_dataset(m)
        assert sorted(sp.query.paths) == sorted(p for p, _, s in rows if s == "query")
        assert sorted(sp.train.paths) == sorted(p for p, _, s in rows if s == "train")


def test_manifest_split_errors(tmp_path):
    p = [_img(tmp_path / f"{i}.png", i) for i in range(4)]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label,split\n{p[0]},a,query\n{p[1]},a,\n{p[2]},a,train\n")
    with pytest.raises(ValueError, match="empty on some rows"):
        load_dataset(bad)
    bad.write_text(f"path,label,split\n{p[0]},a,holdout\n")
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        load_dataset(bad)
    bad.write_text(f"path,label,split\n{p[0]},a,train\n{p[1]},b,train\n")
    with pytest.raises(ValueError, match="both train/database and query/test"):
        load_dataset(bad)
