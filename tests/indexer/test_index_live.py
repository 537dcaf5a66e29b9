"""The index under writes: exact searches after deletes/upserts (every method, batches, hybrid,
label filters), lex cursor paging, posting lists, in-place rebuild/compaction, fork, log bounds."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest
from _helpers import queries_for, random_codes, random_ids, ref_ids, ref_radius
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbir.codes import CodeLayout, Codes
from cbir.indexer import IndexWriter, build_index, compact_index, open_index
from cbir.indexer import derived as derived_mod
from cbir.indexer import writer as writer_mod
from cbir.indexer.derived import Derived, View

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
METHODS = ("auto", "mih", "faiss", "brute")
CLASSES = ("cat", "dog", "eel")


def _meta(ids, rng):
    out = []
    for i in ids:
        r = int(rng.integers(0, 4))
        out.append(None if r == 3 else ({"label": r} if i % 2 else {"labels": [CLASSES[r], "x"]}))
    return out


def _labels_of(m):
    if not m:
        return set()
    vals = m.get("labels", m.get("label"))
    vals = vals if isinstance(vals, list) else [vals]
    out = {str(v) for v in vals}
    out |= {CLASSES[v] for v in vals if isinstance(v, int) and 0 <= v < 3}
    return out


class Model:
    """The reference: id -> (code bytes, meta)."""

    def __init__(self, nbits):
        self.nbits, self.items = nbits, {}

    def arrays(self, labels=None):
        ids = np.array(
            sorted(i for i, (_c, m) in self.items.items() if labels is None or _labels_of(m) & set(labels)),
            dtype=np.int64,
        )
        codes = Codes.from_bytes([self.items[i][0] for i in ids], self.nbits) if len(ids) else Codes.empty(self.nbits)
        return ids, codes


def _check(r, model: Model, rng, cb: int, labels=None):
    ids, codes = model.arrays(labels)
    Q = queries_for(rng, codes if len(codes) else model.arrays()[1], model.nbits, 2)
    for q in Q:
        for k in (1, 7, 40):
            ref = ref_ids(q, codes, ids, k, "hamming")
            for m in METHODS:
                assert np.array_equal(r.search_hamming(q, k=k, method=m, labels=labels).ids, ref), (m, k)
            assert np.array_equal(r.search_lex(q, k, labels=labels).ids, ref_ids(q, codes, ids, k, "lex"))
            if cb:
                same = (codes.to_bits()[:, :cb] == q.to_bits()[0, :cb]).all(axis=1) if len(ids) else []
                sub = np.flatnonzero(same)
                href = ref_ids(q, codes[sub], ids[sub], k, "hamming") if len(sub) else np.zeros(0)
                assert np.array_equal(r.search_hybrid(q, k, labels=labels).ids, href)
        rad = model.nbits // 5
        for m in METHODS:
            assert np.array_equal(
                r.search_hamming(q, radius=rad, method=m, labels=labels).ids, ref_radius(q, codes, ids, rad)
            )
    for m in ("auto", "faiss"):
        batch = r.search_hamming_batch(Q, k=9, method=m, labels=labels)
        assert [b.ids.tolist() for b in batch] == [ref_ids(q, codes, ids, 9, "hamming").tolist() for q in Q]
        batch = r.search_hamming_batch(Q, radius=3, method=m, labels=labels)
        assert [b.ids.tolist() for b in batch] == [ref_radius(q, codes, ids, 3).tolist() for q in Q]


@SETTINGS
@given(
    nbits=st.sampled_from([8, 13, 32, 64, 70]),
    kind=st.sampled_from(["uniform", "clustered", "dups"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_path_is_exact_after_deletes_and_upserts(tmp_path_factory, nbits, kind, seed):
    """Base persisted with MIH/FAISS, then deletes/upserts/adds replayed: all paths = brute force."""
    rng = np.random.default_rng(seed)
    tmp = tmp_path_factory.mktemp("ix")
    n = 400
    cb = 2
    codes = random_codes(rng, n, nbits, kind)
    ids = random_ids(rng, n)
    meta = _meta(ids, rng)
    layout = CodeLayout(nbits=nbits, class_bits=cb, class_names=CLASSES)
    old = derived_mod.PERSIST_MIN
    derived_mod.PERSIST_MIN = 0
    try:
        build_index(tmp / "ix", ids, codes, meta=meta, layout=layout)
        model = Model(nbits)
        model.items = {int(i): (c, m) for i, c, m in zip(ids, codes.to_bytes_list(), meta)}
        with open_index(tmp / "ix", readonly=False) as r:
            assert r.derived().base.saved_dir is not None  # built and saved at build time
            _check(r, model, rng, cb)
            for step in range(3):
                live = np.array(sorted(model.items), dtype=np.int64)
                victims = rng.choice(live, size=min(25, len(live)), replace=False)
                r.delete(victims)
                for v in victims.tolist():
                    del model.items[v]
                live = np.array(sorted(model.items), dtype=np.int64)
                up = rng.choice(live, size=10, replace=False)
                uc = random_codes(rng, 10, nbits, kind)
                um = _meta(up, rng)
                r.upsert(up, uc, um)
                model.items.update({int(i): (c, m) for i, c, m in zip(up, uc.to_bytes_list(), um)})
                new = np.arange(2**41 + 100 * step, 2**41 + 100 * step + 15)
                nc = random_codes(rng, 15, nbits, kind)
                nm = _meta(new, rng)
                r.add(new, nc, nm)
                model.items.update({int(i): (c, m) for i, c, m in zip(new, nc.to_bytes_list(), nm)})
                v = r.derived()
                assert v.base.generation == 1 and len(v.deleted) > 0  # replayed, not rebuilt
                _check(r, model, rng, cb)
            _check(r, model, rng, cb, labels=["cat"])
            _check(r, model, rng, cb, labels=["dog", "1"])
            assert len(r.search_hamming(codes[:1], k=5, labels=["nobody"])) == 0
    finally:
        derived_mod.PERSIST_MIN = old


def test_broad_label_filter_uses_the_candidate_loop(tmp_path, monkeypatch):
    """A filter selecting more than FILTER_BRUTE_MAX ids goes through MIH/FAISS/lex paging."""
    import cbir.indexer.hamming as hm
    import cbir.indexer.lexmodes as lm

    monkeypatch.setattr(lm, "FILTER_BRUTE_MAX", 10)
    monkeypatch.setattr(hm, "FILTER_BRUTE_MAX", 10)
    rng = np.random.default_rng(1)
    n, nbits = 3000, 24
    codes = random_codes(rng, n, nbits, "clustered")
    ids = np.arange(n) * 3
    meta = _meta(ids, rng)
    build_index(tmp_path / "ix", ids, codes, meta=meta, layout=CodeLayout(nbits, 2, class_names=CLASSES))
    model = Model(nbits)
    model.items = {int(i): (c, m) for i, c, m in zip(ids, codes.to_bytes_list(), meta)}
    with open_index(tmp_path / "ix", readonly=False) as r:
        r.delete(ids[::7])
        for i in ids[::7].tolist():
            del model.items[i]
        _check(r, model, rng, 2, labels=["cat", "eel"])
        # lex cursor paging and prefix paging with a filter
        lid, lcodes = model.arrays(["dog"])
        q = codes[:1]
        ref = ref_ids(q, lcodes, lid, None, "lex")
        got, cur = [], ""
        while True:
            res = r.search_lex(q, 37, cursor=cur, labels=["dog"])
            got += res.ids.tolist()
            cur = res.next_cursor
            if cur is None:
                break
        assert got == ref.tolist()
        _page_all_prefix(r, "1", ["dog"], lid, lcodes, limit=41)


def _page_all_prefix(r, prefix, labels, ids, codes, limit):
    bits = codes.to_bits()
    p = len(prefix)
    match = np.flatnonzero((bits[:, :p] == np.array([int(c) for c in prefix])).all(axis=1))
    zero = Codes(np.zeros((1, codes.nbytes), np.uint8), codes.nbits)
    ref = ref_ids(zero, codes[match], ids[match], None, "lex")
    got, cursor = [], None
    while True:
        page = r.search_prefix(prefix, limit, cursor, labels=labels)
        assert len(page) <= limit
        got += page.ids.tolist()
        cursor = page.next_cursor
        if cursor is None:
            break
    assert got == ref.tolist()


@SETTINGS
@given(
    nbits=st.sampled_from([5, 16, 64, 70]),
    n=st.integers(0, 250),
    kind=st.sampled_from(["uniform", "clustered", "dups"]),
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 40),
)
def test_lex_cursor_pages_are_the_ranking(tmp_path_factory, nbits, n, kind, seed, k):
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n, nbits, kind)
    ids = random_ids(rng, n)
    meta = [{"label": "a" if i % 3 else "b"} for i in ids]
    with open_index(build_index(tmp_path_factory.mktemp("ix") / "ix", ids, codes, meta=meta)) as r:
        for q in queries_for(rng, codes, nbits, 2):
            ref = ref_ids(q, codes, ids, None, "lex")
            got, cur, pages = [], "", 0
            while True:
                res = r.search_lex(q, k, cursor=cur)
                got += res.ids.tolist()
                pages += 1
                cur = res.next_cursor
                if cur is None:
                    break
            assert got == ref.tolist() and pages <= len(ref) // k + 1
            sel = np.array([i % 3 == 0 for i in ids], dtype=bool)
            ref_b = ref_ids(q, codes[np.flatnonzero(sel)], ids[sel], None, "lex") if sel.any() else []
            got, cur = [], ""
            while True:
                res = r.search_lex(q, k, cursor=cur, labels="b")
                got += res.ids.tolist()
                cur = res.next_cursor
                if cur is None:
                    break
            assert got == list(ref_b)
            if n:
                _page_all_prefix(r, "0", ["b"], ids[sel], codes[np.flatnonzero(sel)], limit=k) if sel.any() else None
    with pytest.raises(ValueError, match="cursor"):
        open_index(
            build_index(tmp_path_factory.mktemp("ix") / "ix", [1], random_codes(rng, 1, 8, "uniform"))
        ).search_lex(np.zeros(8, np.uint8), 3, cursor="zz")


def test_prefix_ranges_beyond_64_bits(tmp_path):
    rng = np.random.default_rng(2)
    nbits = 100
    base = random_codes(rng, 60, nbits, "uniform").to_bits()
    bits = base[rng.integers(0, 60, 3000)].copy()
    bits[:, 80:] = rng.integers(0, 2, (3000, 20))  # long shared prefixes: 80 bits
    codes = Codes.from_bits(bits)
    ids = np.arange(3000)
    with open_index(build_index(tmp_path / "ix", ids, codes, layout=CodeLayout(nbits, class_bits=72))) as r:
        v = r.derived()
        for q in codes[:20]:
            lo, hi = r._prefix_range(v.base, q.packed[0], 72)
            same = (bits[:, :72] == q.to_bits()[0, :72]).all(axis=1)
            assert hi - lo == same.sum() > 0
            got = r.search_hybrid(q, 10)
            sub = np.flatnonzero(same)
            assert np.array_equal(got.ids, ref_ids(q, codes[sub], ids[sub], 10, "hamming"))


def test_label_posting_list_follows_every_write(tmp_path):
    rng = np.random.default_rng(3)
    layout = CodeLayout(16, 0, class_names=("cat", "dog"))
    with IndexWriter(tmp_path / "ix", layout=layout) as w:
        w.add([1, 2, 3], random_codes(rng, 3, 16, "uniform"), [{"label": 0}, {"labels": ["dog", "red"]}, None])
    with open_index(tmp_path / "ix", readonly=False) as r:
        assert r.ids_with_labels("cat").tolist() == [1]
        assert r.ids_with_labels(["dog"]).tolist() == [2]
        assert r.ids_with_labels(["0", "red"]).tolist() == [1, 2]
        assert r.ids_with_labels("nobody").tolist() == []
        r.update_meta([1, 3], [{"label": "dog"}, {"label": 1}])
        assert r.ids_with_labels("dog").tolist() == [1, 2, 3] and r.ids_with_labels("cat").tolist() == []
        r.upsert([2], random_codes(rng, 1, 16, "uniform"), [{"label": "cat"}])
        assert r.ids_with_labels("dog").tolist() == [1, 3] and r.ids_with_labels("cat").tolist() == [2]
        r.delete([3])
        assert r.ids_with_labels("dog").tolist() == [1]
        assert r.ids_with_labels("red").tolist() == []
        with pytest.raises(ValueError, match="labels"):
            r.ids_with_labels(5)


def test_index_without_posting_list_is_backfilled(tmp_path):
    """An index written before the ``labels`` sub-db: readers scan meta, a writer backfills."""
    import json

    rng = np.random.default_rng(4)
    build_index(
        tmp_path / "ix",
        [1, 2, 3],
        random_codes(rng, 3, 8, "uniform"),
        meta=[{"label": "a"}, {"label": "b"}, {"label": "a"}],
    )
    man = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    del man["labels_db"]
    (tmp_path / "ix" / "manifest.json").write_text(json.dumps(man))
    with open_index(tmp_path / "ix") as r:
        assert not r.has_label_index
        assert r.ids_with_labels("a").tolist() == [1, 3]  # meta scan
    with IndexWriter(tmp_path / "ix") as w:
        assert w.manifest["labels_db"]
    with open_index(tmp_path / "ix") as r:
        assert r.has_label_index and r.ids_with_labels("a").tolist() == [1, 3]


def test_vectorised_replay_equals_sequential_semantics():
    rng = np.random.default_rng(5)
    nb = 2
    for trial in range(30):
        n = int(rng.integers(0, 80))
        codes = random_codes(rng, n, 16, "dups" if trial % 2 else "uniform").packed
        ids = np.arange(n) * 2
        order = np.lexsort((ids, codes[:, 1], codes[:, 0]))
        base = Derived(1, 16, codes[order], ids[order])
        present = {(bytes(c), int(i)) for c, i in zip(codes, ids)}
        v = View(base, 1)
        recs = []
        for g in range(2, 6):
            dels = [k for k in present if rng.random() < 0.2]
            adds = [(bytes(rng.integers(0, 256, nb, dtype=np.uint8)), int(rng.integers(0, 300))) for _ in range(4)]
            if dels and rng.random() < 0.5:
                adds.append(dels[0])  # deleted and re-added in one write (an upsert to the same code)
            for d in dels:
                present.discard(d)
            present |= set(adds)

            def keys(lst):
                return np.array([list(c) + list(i.to_bytes(8, "big")) for c, i in lst], dtype=np.uint8).reshape(
                    -1, nb + 8
                )

            recs.append((g, keys(adds), keys(dels)))
        v2 = v.replay(recs, nb, 10**6)
        got_codes, got_ids = v2.materialize()
        got = {(bytes(c), int(i)) for c, i in zip(got_codes, got_ids)}
        assert got == present and len(got_ids) == v2.n


def test_refresh_sees_an_in_place_rebuild_and_compaction(tmp_path):
    rng = np.random.default_rng(6)
    a = random_codes(rng, 50, 16, "uniform")
    b = random_codes(rng, 80, 16, "uniform")
    build_index(tmp_path / "ix", np.arange(50), a)
    r = open_index(tmp_path / "ix")
    assert r.count() == 50
    build_index(tmp_path / "ix", np.arange(80), b)
    assert r.count() == 50  # the snapshot stays until refresh
    assert r.refresh() and r.count() == 80
    assert np.array_equal(r.search_lex(b[:1], 5).ids, ref_ids(b[:1], b, np.arange(80), 5, "lex"))
    w0 = open_index(tmp_path / "ix", readonly=False)  # a writing reader, then a rebuild in place
    build_index(tmp_path / "ix", np.arange(80), b, model_hash="third")
    assert w0.refresh() and w0.model_hash == "third"  # its old writer left the new manifest alone
    w0.add([500], b[:1])
    w0.close()
    man = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert man["count"] == 81 and man["model_hash"] == "third"
    assert r.refresh() and r.count() == 81
    with IndexWriter(tmp_path / "ix") as w:
        w.delete([500])
    assert r.refresh() and r.count() == 80
    # compaction: a writer grows the file, compact shrinks it; reader and writer follow
    with IndexWriter(tmp_path / "ix") as w:
        for _ in range(10):
            w.upsert(np.arange(80), random_codes(rng, 80, 16, "uniform"), [{"p": "x" * 200}] * 80)
        final = random_codes(rng, 80, 16, "uniform")
        w.upsert(np.arange(80), final)
        out = compact_index(tmp_path / "ix")
        assert out["after"] <= out["before"]
        w.add([1000], final[:1])  # the writer re-opens the compacted file
    assert r.refresh() and r.count() == 81
    codes = Codes.from_bytes(final.to_bytes_list() + final.to_bytes_list()[:1], 16)
    ids = np.append(np.arange(80), 1000)
    assert np.array_equal(r.search_hamming(final[:1], k=9).ids, ref_ids(final[:1], codes, ids, 9, "hamming"))
    r.close()
    with open_index(tmp_path / "ix") as r2:
        assert r2.count() == 81 and r2.get(1000) is not None


def test_a_reader_opened_before_fork_refuses_to_run_in_the_child(tmp_path):
    rng = np.random.default_rng(7)
    codes = random_codes(rng, 200, 16, "clustered")
    build_index(tmp_path / "ix", np.arange(200), codes)
    build_index(tmp_path / "other", np.arange(200), codes)
    r = open_index(tmp_path / "ix")
    before = r.search_lex(codes[:1], 10).ids.tolist()
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()

    def work(conn):
        out = []
        for fn in (lambda: r.search_lex(codes[:1], 10), lambda: r.refresh(), lambda: open_index(tmp_path / "ix")):
            try:
                fn()
                out.append("ran")
            except RuntimeError as exc:
                out.append("fork()" in str(exc))
        r.close()  # parks the parent's handles; the parent's snapshot stays protected
        with open_index(tmp_path / "other") as r2:  # an index opened after the fork works
            out.append(r2.search_lex(codes[:1], 10).ids.tolist())
        conn.send(out)

    p = ctx.Process(target=work, args=(child,))
    p.start()
    res = parent.recv()
    p.join(30)
    assert res == [True, True, True, before]
    assert r.search_lex(codes[:1], 10).ids.tolist() == before  # the parent is unaffected
    assert r.refresh() is False
    r.close()


def test_change_log_is_bounded_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "LOG_MAX_BYTES", 4000)
    rng = np.random.default_rng(8)
    with IndexWriter(tmp_path / "ix", layout=CodeLayout(32)) as w:
        for s in range(40):
            w.add(np.arange(s * 20, s * 20 + 20), random_codes(rng, 20, 32, "uniform"))
        env = w._env
        with env.env.begin() as txn:
            sizes = [len(v) for _k, v in txn.cursor(env.dbs["log"]).iternext()]
            logged = int.from_bytes(txn.get(b"log_bytes", db=env.dbs["info"]), "big")
        assert sum(sizes) == logged <= 4000 and len(sizes) < 40
    with open_index(tmp_path / "ix") as r:  # a reader whose base is older than the log rebuilds
        codes = Codes.from_bytes([r.get(i).code.packed[0].tobytes() for i in range(800)], 32)
        q = codes[:1]
        assert np.array_equal(r.search_hamming(q, k=5).ids, ref_ids(q, codes, np.arange(800), 5, "hamming"))


def test_faiss_threads_are_set_per_call(tmp_path):
    import faiss

    rng = np.random.default_rng(9)
    codes = random_codes(rng, 2000, 64, "uniform")
    with open_index(build_index(tmp_path / "ix", np.arange(2000), codes)) as r:
        r.search_hamming(codes[:1], k=5, method="faiss")
        assert faiss.omp_get_max_threads() == 1
        r.search_hamming_batch(codes[:8], k=5, method="faiss")
        assert faiss.omp_get_max_threads() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(
    "not __import__('cbir.indexer.faissidx', fromlist=['x']).gpu_available()",
    reason="needs a GPU build of FAISS and faiss.get_num_gpus() > 0",
)
def test_gpu_path_matches_brute_force(tmp_path):
    from cbir.indexer.faissidx import GPU_MAX_K, FaissBinary

    rng = np.random.default_rng(10)
    codes = random_codes(rng, 20000, 64, "clustered")
    ids = np.arange(20000)
    f = FaissBinary(codes.packed, use_gpu=True)
    assert f.gpu is not None
    for q in codes[:5]:
        for k in (1, 100, GPU_MAX_K):
            pos, dist = f.knn(q.packed[0], k)
            ref = ref_ids(q, codes, ids, k, "hamming")
            d = np.bitwise_count(codes.packed[pos] ^ q.packed[0]).sum(1)
            assert np.array_equal(d, dist) and set(ref.tolist()) <= set(pos.tolist())


def test_bulk_build_without_codes_subdb_keeps_id_lookups_exact(tmp_path, monkeypatch):
    """Large builds write only the tree (+meta/conf): id -> code comes from the saved base and
    is confirmed by the tree key, so get/add/delete/upsert/update_meta stay exact."""
    import shutil

    monkeypatch.setattr(derived_mod, "PERSIST_MIN", 0)
    rng = np.random.default_rng(11)
    n = 300
    codes = random_codes(rng, n, 24, "dups")
    ids = np.arange(n) * 5
    build_index(tmp_path / "ix", ids, codes, meta=[{"label": "a"}] * n)
    shuffled = rng.permutation(n)  # unsorted input ids: the saved id index maps them right
    build_index(tmp_path / "ix2", ids[shuffled], codes[shuffled])
    with open_index(tmp_path / "ix2") as r:
        assert [r.get(int(i)).code.packed[0].tobytes() for i in ids] == codes.to_bytes_list()
    with open_index(tmp_path / "ix") as r:
        assert r.manifest["codes_db"] == "delta"
        with r._env.env.begin() as txn:
            assert txn.stat(r._env.dbs["codes"])["entries"] == 0
        assert [r.get(int(i)).code.packed[0].tobytes() for i in ids] == codes.to_bytes_list()
        assert r.get(1) is None and r.get(10**9) is None
    model = dict(zip(ids.tolist(), codes.to_bytes_list()))
    with IndexWriter(tmp_path / "ix") as w:
        with pytest.raises(ValueError, match="already exists"):
            w.add([ids[3]], codes[:1])
        assert w.delete([ids[0], ids[1], 7]) == 2
        w.upsert([ids[2]], codes[5:6])
        w.add([ids[0]], codes[0:1])  # deleted, then re-added with its old code
        w.add([ids[1]], codes[9:10])  # ... and with another code
        assert w.update_meta([ids[4], 3], [{"label": "b"}, {"label": "b"}]) == 1
    del model[int(ids[0])], model[int(ids[1])]
    model[int(ids[2])] = codes.to_bytes_list()[5]
    model[int(ids[0])] = codes.to_bytes_list()[0]
    model[int(ids[1])] = codes.to_bytes_list()[9]
    shutil.rmtree(tmp_path / "ix" / "derived")  # even without the saved base (tree scan)
    with open_index(tmp_path / "ix") as r:
        for i, c in model.items():
            assert r.get(i).code.packed[0].tobytes() == c
        assert r.count() == n and r.ids_with_labels("b").tolist() == [int(ids[4])]
        mids = np.array(sorted(model), dtype=np.int64)
        mcodes = Codes.from_bytes([model[i] for i in mids], 24)
        q = codes[:1]
        sel = ~np.isin(mids, ids[[0, 1, 4]])  # re-added without metadata, or relabelled
        assert np.array_equal(
            r.search_hamming(q, k=20, labels="a").ids, ref_ids(q, mcodes[np.flatnonzero(sel)], mids[sel], 20, "hamming")
        )


def test_rebuild_runs_off_the_snapshot_lock(tmp_path, monkeypatch):
    """While a rebuild of the derived structures is in progress, lex searches and get() on the
    same reader are answered (they do not wait behind it); the new view is swapped in after."""
    import threading

    rng = np.random.default_rng(12)
    codes = random_codes(rng, 3000, 32, "clustered")
    build_index(tmp_path / "ix", np.arange(3000), codes)
    r = open_index(tmp_path / "ix")
    started, release = threading.Event(), threading.Event()
    orig = Derived.from_txn.__func__

    def slow_scan(cls, *a, **kw):
        started.set()
        assert release.wait(30)
        return orig(cls, *a, **kw)

    monkeypatch.setattr(Derived, "from_txn", classmethod(slow_scan))
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("res", r.search_hamming(codes[:1], k=5)))
    t.start()
    assert started.wait(30)
    assert np.array_equal(r.search_lex(codes[:1], 7).ids, ref_ids(codes[:1], codes, np.arange(3000), 7, "lex"))
    assert r.get(5) is not None  # both answered while the rebuild is blocked
    release.set()
    t.join(30)
    assert np.array_equal(out["res"].ids, ref_ids(codes[:1], codes, np.arange(3000), 5, "hamming"))
    assert r.derived().generation == r.generation
    r.close()
