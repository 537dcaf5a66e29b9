"""Writes, snapshots, reopening, derived-structure persistence and atomic builds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from _helpers import queries_for, random_codes, ref_ids, ref_radius

from cbir.codes import CodeLayout, Codes
from cbir.indexer import IndexWriter, build_index, open_index, read_manifest
from cbir.indexer import build as build_mod
from cbir.indexer import derived as derived_mod
from cbir.indexer import env as env_mod
from cbir.indexer import writer as writer_mod
from cbir.indexer.reader import IndexReader


def _check_all(r, model: dict, nbits: int, rng) -> None:
    """Every search path of reader ``r`` equals brute force over ``model`` (id -> code bytes)."""
    ids = np.array(sorted(model), dtype=np.int64)
    codes = Codes.from_bytes([model[i] for i in ids], nbits) if len(ids) else Codes.empty(nbits)
    assert r.count() == len(ids)
    for q in queries_for(rng, codes, nbits, 2):
        assert np.array_equal(r.search_lex(q, 20).ids, ref_ids(q, codes, ids, 20, "lex"))
        ref = ref_ids(q, codes, ids, 15, "hamming")
        for m in ("mih", "faiss", "auto"):
            assert np.array_equal(r.search_hamming(q, k=15, method=m).ids, ref)
            assert np.array_equal(r.search_hamming(q, radius=3, method=m).ids, ref_radius(q, codes, ids, 3))
    page = r.search_prefix("", len(ids) + 1)
    assert sorted(page.ids.tolist()) == ids.tolist()


@pytest.mark.parametrize("nbits", [13, 64])
def test_add_delete_upsert_keep_everything_consistent(tmp_path, nbits):
    rng = np.random.default_rng(nbits)
    layout = CodeLayout(nbits=nbits, class_bits=2)
    r = None
    with IndexWriter(tmp_path / "ix", layout=layout, model_hash="abc") as w:
        r = open_index(tmp_path / "ix")
        model: dict[int, bytes] = {}
        next_id = 0
        for step in range(12):
            op = ["add", "add", "delete", "upsert"][step % 4]
            if op == "add":
                n = int(rng.integers(1, 120))
                codes = random_codes(rng, n, nbits, "clustered")
                ids = np.arange(next_id, next_id + n)
                next_id += n
                meta = [{"path": f"img{i}.jpg", "label": int(i % 3)} for i in ids]
                assert w.add(ids, codes, meta) == n
                model.update(zip(ids.tolist(), codes.to_bytes_list()))
            elif op == "delete":
                victims = rng.choice(next_id, size=20, replace=False)
                expected = sum(int(v) in model for v in victims)
                assert w.delete(victims) == expected
                for v in victims:
                    model.pop(int(v), None)
            else:
                ids = rng.choice(next_id + 10, size=15, replace=False)  # some new ids
                next_id += 10
                codes = random_codes(rng, 15, nbits, "uniform")
                assert w.upsert(ids, codes) == 15
                model.update(zip(ids.tolist(), codes.to_bytes_list()))
            # the old snapshot is unchanged until refresh
            assert r.refresh()
            _check_all(r, model, nbits, rng)
        # adding an existing id fails and writes nothing
        gen = w.generation
        some = next(iter(model))
        with pytest.raises(ValueError, match="already exists"):
            w.add([10**9, some], random_codes(rng, 2, nbits, "uniform"))
        assert w.generation == gen
        assert not r.refresh()
        item = r.get(next(i for i in model if i < 120))
        assert item is not None and item.code.to_bytes_list()[0] == model[item.id]
        r.close()
    # reopen after writes: same content, manifest counts updated
    man = read_manifest(tmp_path / "ix")
    assert man["count"] == len(model) and man["model_hash"] == "abc"
    with open_index(tmp_path / "ix") as r2:
        _check_all(r2, model, nbits, rng)
        assert r2.layout == layout


def test_meta_and_conf_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    codes = random_codes(rng, 50, 10, "uniform")
    conf = rng.random((50, 10)).astype(np.float32)
    meta = [{"path": f"/x/{i}.png", "labels": [1, 2]} if i % 2 else None for i in range(50)]
    build_index(
        tmp_path / "ix",
        np.arange(50) + 7,
        codes,
        meta,
        conf=conf,
        layout=CodeLayout(nbits=10, class_bits=1, class_names=("a", "b")),
    )
    with open_index(tmp_path / "ix", readonly=False) as r:
        it = r.get(8)
        assert it.meta == {"path": "/x/1.png", "labels": [1, 2]}
        assert np.allclose(it.conf, conf[1], atol=1e-3)
        assert r.get(7).meta is None and r.get(1000) is None
        assert r.layout.class_names == ("a", "b")
        r.upsert([8], codes[:1], [{"new": True}])
        assert r.get(8).meta == {"new": True} and r.get(8).conf is None
        assert r.get(8).code == codes[0]
        r.delete([8, 9, 12345])
        assert r.get(8) is None and r.count() == 48


def test_reader_keeps_a_consistent_snapshot_during_writes(tmp_path):
    rng = np.random.default_rng(1)
    codes = random_codes(rng, 300, 16, "clustered")
    build_index(tmp_path / "ix", np.arange(300), codes)
    r = open_index(tmp_path / "ix")
    q = codes[:1]
    before = (r.search_lex(q, 50).ids, r.search_hamming(q, k=50).ids, r.count())
    # a writer in another process adds and deletes items
    script = textwrap.dedent(f"""
        import numpy as np
        from cbir.codes import Codes
        from cbir.indexer import IndexWriter
        with IndexWriter({str(tmp_path / "ix")!r}) as w:
            w.add(np.arange(1000, 1200), Codes(np.repeat({codes.packed[0].tolist()!r}, 200).reshape(-1, 2).astype(np.uint8)[:200], 16))
            w.delete(np.arange(0, 100))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    after_same = (r.search_lex(q, 50).ids, r.search_hamming(q, k=50).ids, r.count())
    for a, b in zip(before, after_same):
        assert np.array_equal(a, b)
    assert r.refresh()
    assert r.count() == 400
    assert not np.array_equal(r.search_lex(q, 50).ids, before[0])
    r.close()


def test_map_size_grows_automatically(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "INITIAL_MAP", 1 << 16)
    monkeypatch.setattr(env_mod, "WRITE_MAP", 1 << 16)
    rng = np.random.default_rng(2)
    with IndexWriter(tmp_path / "ix", layout=CodeLayout(nbits=32)) as w:
        for s in range(0, 30000, 10000):
            w.add(np.arange(s, s + 10000), random_codes(rng, 10000, 32, "uniform"), [{"p": "x" * 20}] * 10000)
        assert w.count() == 30000
    with open_index(tmp_path / "ix") as r:
        assert r.count() == 30000


def test_derived_structures_are_persisted_and_catch_up_from_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(derived_mod, "PERSIST_MIN", 0)
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 400, 24, "clustered")
    ids = np.arange(400)
    build_index(tmp_path / "ix", ids, codes)
    dd = tmp_path / "ix" / "derived"
    assert (dd / "g1" / "state.json").exists()
    q = codes[:1]
    with open_index(tmp_path / "ix", readonly=False) as r:
        a = r.search_hamming(q, k=10, method="mih").ids
        assert (dd / "g1" / "mih.json").exists()  # MIH tables saved beside the codes
        # small writes: the base stays g1, the change log is replayed on top of it
        r.add([5000], codes[:1])
        r.delete([int(a[0])])
        r.upsert([int(a[1])], codes[200:201])
        v = r.derived()
        assert (v.base.generation, v.generation) == (1, 4) and v.delta_size == 4
        assert not (dd / "g4").exists()
        model = dict(zip(ids.tolist(), codes.to_bytes_list()))
        model[5000] = codes.to_bytes_list()[0]
        del model[int(a[0])]
        model[int(a[1])] = codes.to_bytes_list()[200]
        _check_all(r, model, 24, rng)
        b = r.search_hamming(q, k=10, method="mih").ids
        assert 5000 in b.tolist() and int(a[0]) not in b.tolist()
    # reopen: g1 loaded from disk + log replayed -> the same answers
    with open_index(tmp_path / "ix") as r:
        assert np.array_equal(r.search_hamming(q, k=10, method="mih").ids, b)
        assert r.derived().base.generation == 1
        _check_all(r, model, 24, rng)
    assert derived_mod.Derived.load(dd, 4, 24) is None  # never persisted


def test_large_delta_or_pruned_log_rebuilds_the_derived_structures(tmp_path, monkeypatch):
    monkeypatch.setattr(derived_mod, "PERSIST_MIN", 0)
    monkeypatch.setattr(writer_mod, "LOG_KEEP", 3)
    rng = np.random.default_rng(9)
    codes = random_codes(rng, 300, 20, "uniform")
    build_index(tmp_path / "ix", np.arange(300), codes)
    dd = tmp_path / "ix" / "derived"
    model = dict(zip(range(300), codes.to_bytes_list()))
    with open_index(tmp_path / "ix") as r, IndexWriter(tmp_path / "ix") as w:
        r.derived()
        monkeypatch.setattr(IndexReader, "DELTA_MIN", 5)
        monkeypatch.setattr(IndexReader, "DELTA_FRACTION", 0.0)
        new = random_codes(rng, 8, 20, "uniform")
        w.add(np.arange(1000, 1008), new)
        model.update(zip(range(1000, 1008), new.to_bytes_list()))
        r.refresh()
        assert r.derived().base.generation == 2  # delta of 8 > 5: rebuilt (and persisted)
        assert (dd / "g2" / "state.json").exists() and not (dd / "g1").exists()
        _check_all(r, model, 20, rng)
        monkeypatch.setattr(IndexReader, "DELTA_MIN", 10_000)
        for i in range(5):  # 5 generations, only 3 log records kept
            w.delete([i])
            del model[i]
        r.refresh()
        assert r.derived().base.generation == 7
        _check_all(r, model, 20, rng)


def test_stats_use_metrics_coverage(tmp_path):
    from cbir.metrics import coverage_report

    rng = np.random.default_rng(4)
    codes = random_codes(rng, 500, 12, "dups")
    build_index(
        tmp_path / "ix",
        np.arange(500),
        codes,
        model_hash="h1",
        layout=CodeLayout(nbits=12, class_bits=2),
        build_params={"batch_size": 4},
    )
    with open_index(tmp_path / "ix") as r:
        st = r.stats()
        assert st["count"] == 500 and st["nbits"] == 12 and st["model_hash"] == "h1"
        ref = coverage_report(codes)
        assert st["coverage"].keys() == ref.keys()
        for key, val in ref.items():  # same figures (float sums may differ in the last ulp)
            assert st["coverage"][key] == (pytest.approx(val) if isinstance(val, float) else val)
        assert st["disk_bytes"] > 0 and st["disk_bytes_per_item"] == st["disk_bytes"] / 500
        assert st["build"]["batch_size"] == 4
        json.dumps(st)


def test_not_an_index(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_index(tmp_path)
    with pytest.raises(ValueError):
        build_index(tmp_path / "ix", [1, 1], random_codes(np.random.default_rng(0), 2, 8, "uniform"))
    assert not (tmp_path / "ix").exists()


_KILL_SCRIPT = """
import sys, time
import numpy as np
from cbir.codes import Codes
from cbir.indexer import build_index
from cbir.indexer import build as store
store.PUT_CHUNK = 2000
orig = store._bulk_chunk
state = {"n": 0}
def slow(*a, **kw):
    orig(*a, **kw)
    state["n"] += 1
    if state["n"] == 2:
        open(sys.argv[2], "w").close()   # tell the test we are mid-build
    time.sleep(0.05)
store._bulk_chunk = slow
rng = np.random.default_rng(0)
n = 200_000
build_index(sys.argv[1], np.arange(n), Codes(rng.integers(0, 256, (n, 4), dtype=np.uint8), 32))
"""


@pytest.mark.parametrize("with_old", [False, True])
def test_sigkill_mid_build_leaves_old_index_or_none(tmp_path, with_old):
    out = tmp_path / "ix"
    rng = np.random.default_rng(5)
    old_codes = random_codes(rng, 100, 32, "uniform")
    if with_old:
        build_index(out, np.arange(100), old_codes, model_hash="old")
    marker = tmp_path / "mid"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out), str(marker)])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "builder exited early"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(p.name.startswith(".ix.tmp-") for p in tmp_path.iterdir())  # killed mid-way
    if with_old:
        with open_index(out) as r:
            assert r.count() == 100 and r.model_hash == "old"
            assert np.array_equal(
                r.search_lex(old_codes[:1], 5).ids, ref_ids(old_codes[:1], old_codes, np.arange(100), 5, "lex")
            )
    else:
        assert not out.exists()
    # a clean restart removes the dead temporary directory and builds the new index
    build_index(out, np.arange(10), old_codes[:10], model_hash="new")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ix")) == []
    with open_index(out) as r:
        assert r.count() == 10 and r.model_hash == "new"


def test_rebuild_in_place_while_a_reader_is_open(tmp_path):
    rng = np.random.default_rng(6)
    a = random_codes(rng, 50, 16, "uniform")
    b = random_codes(rng, 80, 16, "uniform")
    build_index(tmp_path / "ix", np.arange(50), a)
    r1 = open_index(tmp_path / "ix")
    build_index(tmp_path / "ix", np.arange(80), b)  # replaces the directory
    r2 = open_index(tmp_path / "ix")
    assert r1.count() == 50 and r2.count() == 80  # the old reader keeps its snapshot
    assert np.array_equal(r2.search_lex(b[:1], 5).ids, ref_ids(b[:1], b, np.arange(80), 5, "lex"))
    r1.close()
    r2.close()


def test_map_growth_with_a_reader_open_in_the_same_process(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "INITIAL_MAP", 1 << 16)
    rng = np.random.default_rng(7)
    codes = random_codes(rng, 20000, 24, "uniform")
    build_index(tmp_path / "ix", np.arange(100), codes[:100])
    with open_index(tmp_path / "ix") as r, open_index(tmp_path / "ix", readonly=False) as w:
        before = r.search_lex(codes[:1], 10).ids
        for s in range(100, 20000, 4975):
            w.add(np.arange(s, s + 4975), codes[s : s + 4975], [{"x": "y" * 30}] * 4975)
        assert np.array_equal(r.search_lex(codes[:1], 10).ids, before)
        assert r.refresh() and r.count() == 20000 == w.count()
        assert np.array_equal(r.search_lex(codes[:1], 10).ids, ref_ids(codes[:1], codes, np.arange(20000), 10, "lex"))


def test_map_regrowth_in_process_moves_open_readers_to_the_newest_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(env_mod, "WRITE_MAP", 1 << 16)  # force MapFullError + growth
    monkeypatch.setattr(build_mod, "INITIAL_MAP", 1 << 16)
    rng = np.random.default_rng(8)
    codes = random_codes(rng, 12000, 24, "uniform")
    build_index(tmp_path / "ix", np.arange(100), codes[:100])
    with open_index(tmp_path / "ix") as r, open_index(tmp_path / "ix", readonly=False) as w:
        r.search_lex(codes[:1], 10)
        for s in range(100, 12000, 2975):
            w.add(np.arange(s, s + 2975), codes[s : s + 2975], [{"x": "y" * 30}] * 2975)
        # the resize invalidated r's transaction: r moved on to a consistent newer snapshot
        n = r.count() if r.get(11999) is None else 12000
        got = r.search_lex(codes[:1], 10).ids
        assert r.count() == 12000 and n == 12000
        assert np.array_equal(got, ref_ids(codes[:1], codes, np.arange(12000), 10, "lex"))
