"""Sharded indexes (issue 14, item 3): every search mode equals the brute-force reference
ranking over the whole collection (cbir.codes.rank, ties included), empty shards included."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
from _helpers import queries_for, random_codes, random_ids, ref_ids, ref_radius
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbir.codes import CodeLayout, Codes
from cbir.indexer import (
    IndexWriter,
    ShardedReader,
    build_index,
    build_sharded_index,
    open_index,
)
from cbir.indexer.publish import OutputExistsError, foreign_entries
from cbir.indexer.reader import IndexReader
from cbir.indexer.sharded import shard_of

NBITS = st.sampled_from([1, 3, 8, 12, 21, 64, 70])
KIND = st.sampled_from(["uniform", "clustered", "dups"])
SHARDS = st.sampled_from([2, 4, 8])
SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
LABELS = ("a", "b", "c")


def _build(tmp, codes, ids, shards, class_bits=0, meta=None):
    layout = CodeLayout(nbits=codes.nbits, class_bits=min(class_bits, codes.nbits))
    shards = min(shards, 1 << codes.nbits)
    path = build_sharded_index(f"{tmp}/ix", ids, codes, shards, meta=meta, layout=layout)
    return open_index(path)


def _data(nbits, n, kind, seed):
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n, nbits, kind)
    ids = random_ids(rng, n)
    labs = np.asarray(LABELS)[rng.integers(0, 3, n)] if n else np.zeros(0, str)
    return rng, codes, ids, labs


def _pages(fn, k):
    """All hits of a cursor-paged lex search, page by page."""
    got, cursor = [], ""
    for _ in range(10_000):
        res = fn(k, cursor)
        assert len(res) <= k
        got += res.ids.tolist()
        if res.next_cursor is None:
            return got
        cursor = res.next_cursor
    raise AssertionError("paging did not end")


@SETTINGS
@given(nbits=NBITS, n=st.integers(0, 250), kind=KIND, seed=st.integers(0, 2**32 - 1), shards=SHARDS)
def test_sharded_lex_and_prefix_match_brute_force(nbits, n, kind, seed, shards):
    rng, codes, ids, labs = _data(nbits, n, kind, seed)
    meta = [{"label": str(v)} for v in labs]
    with tempfile.TemporaryDirectory() as tmp, _build(tmp, codes, ids, shards, meta=meta) as r:
        assert isinstance(r, ShardedReader) and r.count() == n == len(r)
        assert sum(s.count() for s in r.shards) == n
        sel = np.isin(labs, ["a", "c"])
        for q in queries_for(rng, codes, nbits, 3):
            for k in {0, 1, 3, 17, n, n + 5}:
                got = r.search_lex(q, k)
                ref = ref_ids(q, codes, ids, k, "lex")
                assert np.array_equal(got.ids, ref), (k, got.ids[:8], ref[:8])
                pos = {int(i): j for j, i in enumerate(ids)}
                rows = [pos[int(i)] for i in got.ids]
                assert np.array_equal(got.codes.packed, codes.packed[rows])
                x = codes.packed[rows] ^ q.packed[0]
                assert np.array_equal(got.distances, np.bitwise_count(x).sum(1))
            full = ref_ids(q, codes, ids, None, "lex")
            for off in (0, 2, 7, n):
                assert np.array_equal(r.search_lex(q, 6, offset=off).ids, full[off : off + 6])
            # cursor paging walks the whole ranking, across shard boundaries
            for k in (1, 4):
                assert _pages(lambda kk, c, q=q: r.search_lex(q, kk, cursor=c), k) == full.tolist()
            # label filters
            sub = np.flatnonzero(sel)
            fref = ref_ids(q, codes[sub], ids[sub], None, "lex") if len(sub) else np.zeros(0, np.int64)
            assert np.array_equal(r.search_lex(q, 9, labels=["a", "c"]).ids, fref[:9])
            assert np.array_equal(r.search_lex(q, 5, offset=3, labels=["a", "c"]).ids, fref[3:8])
            got = _pages(lambda kk, c, q=q: r.search_lex(q, kk, cursor=c, labels=["a", "c"]), 3)
            assert got == fref.tolist()
            assert np.array_equal(r.ids_with_labels(["a", "c"]), np.sort(ids[sel]))
        # prefix listings, paged, across shards
        bits = codes.to_bits()
        src = bits[0] if n else np.zeros(nbits, np.uint8)
        zero = Codes(np.zeros((1, codes.nbytes), np.uint8), nbits)
        for p in sorted({0, 1, 2, nbits // 2, nbits}):
            pre = src[: min(p, nbits)]
            match = np.flatnonzero((bits[:, : len(pre)] == pre).all(axis=1))
            ref = ref_ids(zero, codes[match], ids[match], None, "lex") if len(match) else np.zeros(0)
            for limit in (1, 3, n + 1):
                got, cursor = [], None
                while True:
                    page = r.search_prefix("".join(map(str, pre)), limit, cursor)
                    assert len(page) <= limit
                    got += page.ids.tolist()
                    cursor = page.next_cursor
                    if cursor is None:
                        break
                assert got == ref.tolist(), (p, limit)
            m = match[sel[match]]
            lref = ref_ids(zero, codes[m], ids[m], None, "lex") if len(m) else np.zeros(0)
            assert np.array_equal(r.search_prefix("".join(map(str, pre)), n + 1, labels=["a", "c"]).ids, lref)
            page = r.search_prefix("".join(map(str, pre)), 0)
            assert len(page) == 0 and (page.next_cursor is None) == (len(ref) == 0)


@SETTINGS
@given(nbits=NBITS, n=st.integers(0, 250), kind=KIND, seed=st.integers(0, 2**32 - 1), shards=SHARDS)
def test_sharded_hamming_matches_brute_force(nbits, n, kind, seed, shards):
    rng, codes, ids, labs = _data(nbits, n, kind, seed)
    meta = [{"label": str(v)} for v in labs]
    with tempfile.TemporaryDirectory() as tmp, _build(tmp, codes, ids, shards, meta=meta) as r:
        Q = queries_for(rng, codes, nbits, 2)
        sub = np.flatnonzero(labs == "b")
        for q in Q:
            for k in {0, 1, 5, n, n + 3}:
                ref = ref_ids(q, codes, ids, k, "hamming")
                for method in ("auto", "mih", "faiss", "brute"):
                    got = r.search_hamming(q, k=k, method=method)
                    assert np.array_equal(got.ids, ref), (method, k)
                    assert got.order == "hamming"
                    assert np.array_equal(got.distances, np.bitwise_count(got.codes.packed ^ q.packed[0]).sum(1))
                lref = ref_ids(q, codes[sub], ids[sub], k, "hamming") if len(sub) else np.zeros(0)
                assert np.array_equal(r.search_hamming(q, k=k, labels="b").ids, lref)
            for radius in {0, 1, nbits // 4, nbits}:
                ref = ref_radius(q, codes, ids, radius)
                for method in ("auto", "mih", "faiss"):
                    assert np.array_equal(r.search_hamming(q, radius=radius, method=method).ids, ref)
                assert np.array_equal(r.search_hamming(q, k=3, radius=radius).ids, ref[:3])
        for k, radius in ((4, None), (None, 2), (3, 5)):
            batch = r.search_hamming_batch(Q, k=k, radius=radius, method="faiss")
            assert [b.ids.tolist() for b in batch] == [r.search_hamming(q, k=k, radius=radius).ids.tolist() for q in Q]


@SETTINGS
@given(
    nbits=NBITS, n=st.integers(0, 200), kind=KIND, seed=st.integers(0, 2**32 - 1), cb=st.integers(0, 5), shards=SHARDS
)
def test_sharded_hybrid_matches_brute_force(nbits, n, kind, seed, cb, shards):
    rng, codes, ids, labs = _data(nbits, n, kind, seed)
    cb = min(cb, nbits)
    meta = [{"label": str(v)} for v in labs]
    with tempfile.TemporaryDirectory() as tmp, _build(tmp, codes, ids, shards, cb, meta) as r:
        for q in queries_for(rng, codes, nbits, 2):
            for k in (0, 1, 4, n + 2):
                for labels in (None, ["a"]):
                    keep = np.ones(n, bool) if labels is None else labs == "a"
                    if cb:
                        keep &= (codes.to_bits()[:, :cb] == q.to_bits()[0, :cb]).all(axis=1)
                    s = np.flatnonzero(keep)
                    ref = ref_ids(q, codes[s], ids[s], k, "hamming") if len(s) else np.zeros(0)
                    assert np.array_equal(r.search_hybrid(q, k, labels=labels).ids, ref), (k, labels)
            if nbits >= 2:  # an explicit class_bits smaller than the shard bits
                s = np.flatnonzero((codes.to_bits()[:, :1] == q.to_bits()[0, :1]).all(axis=1))
                ref = ref_ids(q, codes[s], ids[s], 7, "hamming") if len(s) else np.zeros(0)
                assert np.array_equal(r.search_hybrid(q, 7, class_bits=1).ids, ref)


def test_sharded_uncertain_lex_get_stats_and_empty_shards(tmp_path):
    rng = np.random.default_rng(3)
    nbits, n = 20, 400
    codes = random_codes(rng, n, nbits, "clustered")
    ids = np.arange(n) * 3
    conf = rng.random((n, nbits)).astype(np.float32)
    meta = [{"label": "a" if i % 2 else "b", "i": int(i)} for i in range(n)]
    layout = CodeLayout(nbits, class_bits=2)
    single = open_index(build_index(tmp_path / "one", ids, codes, meta, conf, layout))
    with single, open_index(build_sharded_index(tmp_path / "ix", ids, codes, 8, meta, conf, layout)) as r:
        for _ in range(8):
            q = codes[int(rng.integers(n))]
            qc = rng.random(nbits).astype(np.float32)
            for off in (0, 5):  # wildcard bits may fall on the shard bits: merged, not concatenated
                got = r.search_lex(q, 25, offset=off, conf=qc, conf_threshold=0.5, probe_budget=8)
                assert np.array_equal(
                    got.ids, single.search_lex(q, 25, offset=off, conf=qc, conf_threshold=0.5, probe_budget=8).ids
                )
        for i in (0, 3, 597, 1197, 2, -1):
            a, b = r.get(i), single.get(i)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.meta == b.meta and a.code == b.code and np.array_equal(a.conf, b.conf)
        assert [x.id if x else None for x in r.get_many([3, 4, 6])] == [3, None, 6]
        st_, st1 = r.stats(), single.stats()
        assert st_["count"] == n and st_["coverage"] == st1["coverage"]
        assert sum(s["count"] for s in st_["shards"]) == n and len(st_["shards"]) == 8
        assert r.has_label_index and r.model_hash == single.model_hash
    # a collection that fills only some shards: the others are empty, complete indexes
    codes = Codes.from_bits(np.concatenate([np.zeros((30, 12), np.uint8), np.ones((5, 12), np.uint8)]))
    with open_index(build_sharded_index(tmp_path / "sparse", np.arange(35), codes, 16)) as r:
        assert [s.count() for s in r.shards] == [30] + [0] * 14 + [5]
        q = Codes.from_bits(np.eye(1, 12, 6, dtype=np.uint8))
        assert np.array_equal(r.search_lex(q, 40).ids, ref_ids(q, codes, np.arange(35), 40, "lex"))
        assert np.array_equal(r.search_hamming(q, k=40).ids, ref_ids(q, codes, np.arange(35), 40, "hamming"))
        assert len(r.search_prefix("0101", 10)) == 0
    with open_index(build_sharded_index(tmp_path / "none", np.zeros(0, np.int64), Codes.empty(12), 4)) as r:
        q = Codes.from_bits(np.ones((1, 12), np.uint8))
        assert r.count() == 0 and len(r.search_lex(q, 5)) == 0 and len(r.search_hamming(q, k=5)) == 0
        assert r.search_lex(q, 5, cursor="").next_cursor is None and r.stats()["coverage"] is None


def test_sharded_layout_partition_and_arguments(tmp_path):
    rng = np.random.default_rng(0)
    codes = random_codes(rng, 300, 16, "uniform")
    ids = rng.permutation(300)
    path = build_sharded_index(tmp_path / "ix", ids, codes, 4, build_params={"source": "t"})
    man = json.loads((path / "manifest.json").read_text())
    assert man["shard_bits"] == 2 and [e["path"] for e in man["shards"]] == [f"shards/{j:04d}" for j in range(4)]
    assert sum(e["count"] for e in man["shards"]) == 300 and man["count"] == 300
    assert foreign_entries(path) == []
    lead = shard_of(codes.packed, 2)
    for j in range(4):  # each shard is a complete index of its own, holding its leading bits
        with open_index(path / "shards" / f"{j:04d}") as s:
            got = np.sort(s.search_prefix("", 1000).ids)
            assert np.array_equal(got, np.sort(ids[lead == j]))
            assert s.manifest["build"]["shard"] == j and s.manifest["build"]["source"] == "t"
    for bad, msg in ((3, "power of two"), (0, "power of two"), (1 << 17, "leading bits")):
        with pytest.raises(ValueError, match=msg):
            build_sharded_index(tmp_path / "bad", ids, codes, bad)
    with pytest.raises(ValueError, match="unique"):
        build_sharded_index(tmp_path / "bad", np.zeros(300, np.int64), codes, 2)
    assert not (tmp_path / "bad").exists()
    # shards=1 is a plain index
    assert isinstance(open_index(build_sharded_index(tmp_path / "one", ids, codes, 1)), IndexReader)


def test_sharded_index_is_read_only(tmp_path):
    codes = random_codes(np.random.default_rng(1), 50, 8, "uniform")
    path = build_sharded_index(tmp_path / "ix", np.arange(50), codes, 2)
    with pytest.raises(ValueError, match="read-only.*rebuild"):
        open_index(path, readonly=False)
    with pytest.raises(ValueError, match="sharded index, which is read-only"):
        IndexWriter(path)
    with pytest.raises(ValueError, match="open it with cbir.indexer.open_index"):
        IndexReader(path)
    with open_index(path) as r:
        for fn, args in (
            (r.add, ([99], codes[:1])),
            (r.upsert, ([1], codes[:1])),
            (r.delete, ([1],)),
            (r.update_meta, ([1], [{}])),
        ):
            with pytest.raises(PermissionError, match="read-only"):
                fn(*args)
        assert r.count() == 50


def test_sharded_publish_replace_refresh_and_out_safety(tmp_path):
    rng = np.random.default_rng(2)
    c1, c2 = random_codes(rng, 80, 10, "uniform"), random_codes(rng, 40, 10, "uniform")
    out = tmp_path / "ix"
    build_index(out, np.arange(80), c1)  # a plain index is replaced by a sharded one ...
    r = open_index(build_sharded_index(out, np.arange(80), c1, 4))
    assert isinstance(r, ShardedReader) and not (out / "lmdb").exists()
    build_sharded_index(out, np.arange(40), c2, 2)  # ... rebuilt in place with other shards
    assert r.refresh() and r.count() == 40 and len(r.shards) == 2
    q = c2[:1]
    assert np.array_equal(r.search_lex(q, 40).ids, ref_ids(q, c2, np.arange(40), 40, "lex"))
    assert not r.refresh()
    r.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]  # no temp dirs left
    build_index(out, np.arange(40), c2)  # and back to a plain index
    assert isinstance(open_index(out), IndexReader) and not (out / "shards").exists()
    # a user's file inside shards/ makes the directory foreign: refused, nothing deleted
    build_sharded_index(out, np.arange(40), c2, 2)
    (out / "shards" / "0001" / "mine.txt").write_text("mine")
    (out / "shards" / "notes").write_text("notes")
    assert foreign_entries(out) == ["shards/0001/mine.txt", "shards/notes"]
    with pytest.raises(OutputExistsError):
        build_sharded_index(out, np.arange(40), c2, 2)
    assert (out / "shards" / "0001" / "mine.txt").read_text() == "mine"
    # --force into a folder of the user's: only the index entries are written, the rest stays
    user = tmp_path / "user"
    user.mkdir()
    (user / "photo.txt").write_text("keep")
    build_sharded_index(user, np.arange(40), c2, 4, force=True)
    assert (user / "photo.txt").read_text() == "keep"
    with open_index(user) as r2:
        assert r2.count() == 40


def test_sharded_compact(tmp_path):
    from cbir.indexer import compact_index

    codes = random_codes(np.random.default_rng(4), 100, 12, "uniform")
    path = build_sharded_index(tmp_path / "ix", np.arange(100), codes, 4)
    out = compact_index(path)
    assert out["shards"] == 4 and out["after"] > 0
    with open_index(path) as r:
        assert r.count() == 100
