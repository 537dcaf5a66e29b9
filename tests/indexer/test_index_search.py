"""Every search path of cbir.indexer equals the brute-force reference ranking of cbir.codes."""

from __future__ import annotations

import logging
import tempfile

import numpy as np
import pytest
from _helpers import queries_for, random_codes, random_ids, ref_ids, ref_radius
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbir.codes import CodeLayout, Codes
from cbir.indexer import IndexReader, build_index, lexarray, open_index
from cbir.indexer.lexsearch import LexSearcher

NBITS = st.sampled_from([1, 3, 7, 8, 12, 16, 21, 33, 64, 70])
KIND = st.sampled_from(["uniform", "clustered", "dups"])
SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


def _build(tmp, codes, ids, class_bits=0):
    layout = CodeLayout(nbits=codes.nbits, class_bits=min(class_bits, codes.nbits))
    return open_index(build_index(f"{tmp}/ix", ids, codes, layout=layout))


#: lexicographic search paths: the LMDB tree walk (MAX_WIDEN 0 forces its recursion into
#: sibling subtrees) and the sorted-base path of <= 64-bit codes (lexarray; DIRECT 0 and
#: WINDOW 0 force its ring recursion and its full binary searches)
LEX_PATHS = st.sampled_from(["tree-0", "tree-1", "tree-3", "base", "base-rings", "base-nowindow"])


class _LexPath:
    def __init__(self, path: str) -> None:
        self.path = path
        self.saved = (
            LexSearcher.MAX_WIDEN,
            IndexReader.LEX_FROM_BASE,
            lexarray.DIRECT_EXTRA,
            lexarray.DIRECT_MIN,
            lexarray.WINDOW,
        )

    def __enter__(self):
        if self.path.startswith("tree"):
            IndexReader.LEX_FROM_BASE = False
            LexSearcher.MAX_WIDEN = int(self.path.split("-")[1])
        elif self.path == "base-rings":
            lexarray.DIRECT_EXTRA, lexarray.DIRECT_MIN = 0, 0
        elif self.path == "base-nowindow":
            lexarray.WINDOW = 0
        return self

    def __exit__(self, *exc):
        (
            LexSearcher.MAX_WIDEN,
            IndexReader.LEX_FROM_BASE,
            lexarray.DIRECT_EXTRA,
            lexarray.DIRECT_MIN,
            lexarray.WINDOW,
        ) = self.saved


@SETTINGS
@given(nbits=NBITS, n=st.integers(0, 300), kind=KIND, seed=st.integers(0, 2**32 - 1), path=LEX_PATHS)
def test_search_lex_matches_brute_force(nbits, n, kind, seed, path):
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n, nbits, kind)
    ids = random_ids(rng, n)
    with _LexPath(path):
        with tempfile.TemporaryDirectory() as tmp, _build(tmp, codes, ids) as r:
            for q in queries_for(rng, codes, nbits, 3):
                for k in {0, 1, 3, 17, n, n + 5}:
                    got = r.search_lex(q, k)
                    ref = ref_ids(q, codes, ids, k, "lex")
                    assert np.array_equal(got.ids, ref), (k, got.ids[:8], ref[:8])
                    assert got.codes.nbits == nbits and len(got.codes) == len(ref)
                    if len(ref):
                        # codes, distances and prefix lengths belong to the returned ids
                        pos = {int(i): j for j, i in enumerate(ids)}
                        rows = [pos[int(i)] for i in got.ids]
                        assert np.array_equal(got.codes.packed, codes.packed[rows])
                        x = codes.packed[rows] ^ q.packed[0]
                        assert np.array_equal(got.distances, np.bitwise_count(x).sum(1))
                        assert (got.prefix_lengths[:-1] >= got.prefix_lengths[1:]).all()
                # offset = a later page of the same ranking
                ref = ref_ids(q, codes, ids, 12, "lex")
                assert np.array_equal(r.search_lex(q, 7, offset=5).ids, ref[5:12])


def _ref_topk(h, q, k, alive):
    """Brute force over sorted uint64 rows: live positions by (q XOR h, position)."""
    pos = np.flatnonzero(alive) if alive is not None else np.arange(len(h))
    x = h[pos] ^ np.uint64(q)
    order = np.lexsort((pos, x))[:k]
    return pos[order], x[order]


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(0, 400),
    kind=st.sampled_from(["uniform", "clustered", "dups", "narrow"]),
    seed=st.integers(0, 2**32 - 1),
    dele=st.sampled_from([0.0, 0.1, 0.7, 1.0]),
    direct=st.sampled_from([(3, 64), (0, 0), (1, 4)]),
    window=st.sampled_from([0, 1, 2]),
)
def test_lexarray_topk_matches_brute_force(n, kind, seed, dele, direct, window):
    """The sorted-array lex top-k (every branch: window, full searches, ring recursion, runs of
    duplicates, deleted rows) equals brute force over (q XOR c, position), ties included."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        h = rng.integers(0, 2**64, n, dtype=np.uint64)
    elif kind == "clustered":
        c = rng.integers(0, 2**64, max(1, n // 30), dtype=np.uint64)
        flips = np.zeros(n, np.uint64)
        for _ in range(3):
            flips |= np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
        h = c[rng.integers(0, len(c), n)] ^ (flips & rng.integers(0, 2**64, n, dtype=np.uint64))
    elif kind == "dups":
        h = rng.integers(0, 2**64, 3, dtype=np.uint64)[rng.integers(0, 3, n)]
    else:  # few distinct low bits under one prefix: long runs, deep rings
        h = np.uint64(0xABCD << 48) | rng.integers(0, 64, n).astype(np.uint64)
    h = np.sort(h)
    alive = None if dele == 0 else rng.random(n) >= dele
    saved = (lexarray.DIRECT_EXTRA, lexarray.DIRECT_MIN, lexarray.WINDOW)
    lexarray.DIRECT_EXTRA, lexarray.DIRECT_MIN = direct
    lexarray.WINDOW = window
    try:
        qs = [int(v) for v in rng.integers(0, 2**64, 3, dtype=np.uint64)] + [
            int(h[i]) for i in rng.integers(0, max(n, 1), 3) if n
        ]
        for q in qs:
            for k in {1, 2, 5, 40, 64, 100, n, n + 3}:
                pos, x = lexarray.topk(h, q, k, alive=alive)
                rp, rx = _ref_topk(h, q, k, alive)
                assert np.array_equal(pos, rp), (q, k)
                assert np.array_equal(x, rx)
                assert pos.dtype == np.int64 and x.dtype == np.uint64
    finally:
        lexarray.DIRECT_EXTRA, lexarray.DIRECT_MIN, lexarray.WINDOW = saved


@SETTINGS
@given(nbits=NBITS, n=st.integers(0, 300), kind=KIND, seed=st.integers(0, 2**32 - 1))
def test_search_hamming_matches_brute_force(nbits, n, kind, seed):
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n, nbits, kind)
    ids = random_ids(rng, n)
    with tempfile.TemporaryDirectory() as tmp, _build(tmp, codes, ids) as r:
        for q in queries_for(rng, codes, nbits, 2):
            for k in {1, 5, n, n + 3}:
                ref = ref_ids(q, codes, ids, k, "hamming")
                for method in ("auto", "mih", "faiss", "brute"):
                    got = r.search_hamming(q, k=k, method=method)
                    assert np.array_equal(got.ids, ref), (method, k)
                    assert got.order == "hamming"
            for radius in {0, 1, nbits // 4, nbits}:
                ref = ref_radius(q, codes, ids, radius)
                for method in ("auto", "mih", "faiss", "brute"):
                    assert np.array_equal(r.search_hamming(q, radius=radius, method=method).ids, ref)
                assert np.array_equal(r.search_hamming(q, k=3, radius=radius).ids, ref[:3])


@SETTINGS
@given(nbits=NBITS, n=st.integers(0, 200), kind=KIND, seed=st.integers(0, 2**32 - 1), cb=st.integers(0, 5))
def test_search_hybrid_matches_brute_force(nbits, n, kind, seed, cb):
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n, nbits, kind)
    ids = random_ids(rng, n)
    cb = min(cb, nbits)
    with tempfile.TemporaryDirectory() as tmp, _build(tmp, codes, ids, class_bits=cb) as r:
        for q in queries_for(rng, codes, nbits, 2):
            for k in (1, 4, n + 2):
                got = r.search_hybrid(q, k)
                if cb == 0:
                    ref = ref_ids(q, codes, ids, k, "hamming")
                else:
                    same = (codes.to_bits()[:, :cb] == q.to_bits()[0, :cb]).all(axis=1)
                    sub = np.flatnonzero(same)
                    ref = ref_ids(q, codes[sub], ids[sub], k, "hamming") if len(sub) else np.zeros(0)
                assert np.array_equal(got.ids, ref)


@SETTINGS
@given(nbits=NBITS, n=st.integers(0, 200), kind=KIND, seed=st.integers(0, 2**32 - 1), limit=st.integers(1, 40))
def test_search_prefix_paginates_the_subtree(nbits, n, kind, seed, limit):
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n, nbits, kind)
    ids = random_ids(rng, n)
    with tempfile.TemporaryDirectory() as tmp, _build(tmp, codes, ids) as r:
        bits = codes.to_bits()
        src = bits[0] if n else np.zeros(nbits, np.uint8)
        for p in sorted({0, 1, nbits // 2, nbits}):
            prefix = src[:p]
            match = np.flatnonzero((bits[:, :p] == prefix).all(axis=1))
            # ascending code then id == lex order w.r.t. the all-zero query
            zero = Codes(np.zeros((1, codes.nbytes), np.uint8), nbits)
            ref = ref_ids(zero, codes[match], ids[match], None, "lex") if len(match) else np.zeros(0)
            got, cursor, pages = [], None, 0
            arg = "".join(map(str, prefix))
            while True:
                page = r.search_prefix(arg, limit, cursor)
                got.extend(page.ids.tolist())
                pages += 1
                assert len(page) <= limit
                cursor = page.next_cursor
                if cursor is None:
                    break
            assert np.array_equal(np.asarray(got, dtype=np.int64), ref)
            assert pages == max(1, -(-len(ref) // limit)) or len(ref) % limit == 0
            if p:  # a Codes prefix works the same
                page = r.search_prefix(Codes.from_bits(prefix[None, :]), n + 1)
                assert np.array_equal(page.ids, ref)


def test_uncertain_bits_become_wildcards():
    rng = np.random.default_rng(3)
    nbits, n = 20, 400
    codes = random_codes(rng, n, nbits, "clustered")
    ids = np.arange(n) * 3
    with tempfile.TemporaryDirectory() as tmp, _build(tmp, codes, ids) as r:
        for _ in range(10):
            q = codes[int(rng.integers(n))]
            conf = rng.random(nbits).astype(np.float32)
            got = r.search_lex(q, 25, conf=conf, conf_threshold=0.3, probe_budget=8)
            low = np.flatnonzero(conf < 0.3)
            wild = low[np.argsort(conf[low], kind="stable")[:3]]
            keep = np.ones(nbits, bool)
            keep[wild] = False
            qb, cb = q.to_bits()[0], codes.to_bits()
            # reference: order by masked XOR, then full XOR, then id
            masked = Codes.from_bits(cb * keep)
            qm = Codes.from_bits((qb * keep)[None, :])
            xm = (masked.packed ^ qm.packed[0]).tolist()
            xf = (codes.packed ^ q.packed[0]).tolist()
            order = sorted(range(n), key=lambda i: (xm[i], xf[i], ids[i]))
            assert np.array_equal(got.ids, ids[order[:25]])
            # no low-confidence bits: plain lexicographic search
            plain = r.search_lex(q, 25, conf=np.ones(nbits), conf_threshold=0.3)
            assert np.array_equal(plain.ids, r.search_lex(q, 25).ids)


def test_batch_versions_and_query_forms():
    rng = np.random.default_rng(5)
    codes = random_codes(rng, 500, 16, "clustered")
    ids = np.arange(500)
    with tempfile.TemporaryDirectory() as tmp, _build(tmp, codes, ids, class_bits=2) as r:
        Q = codes[:4]
        for fn in ("search_lex", "search_hybrid"):
            batch = getattr(r, fn + "_batch")(Q, 9)
            assert [b.ids.tolist() for b in batch] == [getattr(r, fn)(Q[i], 9).ids.tolist() for i in range(4)]
        hb = r.search_hamming_batch(Q, k=9)
        assert [b.ids.tolist() for b in hb] == [r.search_hamming(Q[i], k=9).ids.tolist() for i in range(4)]
        q = Q[1]
        a = r.search_lex(q, 5).ids
        assert np.array_equal(r.search_lex(q.packed[0].tobytes(), 5).ids, a)
        assert np.array_equal(r.search_lex(q.to_bits()[0], 5).ids, a)
        with pytest.raises(ValueError):
            r.search_lex(Codes.from_bits(np.zeros((1, 8), np.uint8)), 5)
        with pytest.raises(ValueError):
            r.search_hamming(q)
        assert len(r.search_prefix_batch(["0", "1"], 1000)[0]) + len(r.search_prefix("1", 1000)) == 500


def test_empty_index():
    with tempfile.TemporaryDirectory() as tmp:
        codes = Codes.empty(12)
        with _build(tmp, codes, np.zeros(0, np.int64), class_bits=2) as r:
            q = Codes.from_bits(np.ones((1, 12), np.uint8))
            assert len(r) == 0 and r.count() == 0
            assert len(r.search_lex(q, 10)) == 0
            assert len(r.search_hamming(q, k=10)) == 0
            assert len(r.search_hamming(q, radius=12)) == 0
            assert len(r.search_hybrid(q, 10)) == 0
            page = r.search_prefix("1", 10)
            assert len(page) == 0 and page.next_cursor is None
            assert r.get(0) is None
            st_ = r.stats()
            assert st_["count"] == 0 and st_["coverage"] is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uniform", "clustered"])
@pytest.mark.parametrize("nbits", [16, 64, 100])
def test_large_index_matches_brute_force(tmp_path, kind, nbits):
    rng = np.random.default_rng(nbits)
    n = 300_000
    codes = random_codes(rng, n, nbits, kind)
    ids = rng.permutation(n).astype(np.int64) * 7
    with open_index(build_index(tmp_path / "ix", ids, codes, layout=CodeLayout(nbits, class_bits=3))) as r:
        for q in queries_for(rng, codes, nbits, 5):
            for k in (1, 100, 1000):
                assert np.array_equal(r.search_lex(q, k).ids, ref_ids(q, codes, ids, k, "lex"))
            ref = ref_ids(q, codes, ids, 100, "hamming")
            for method in ("auto", "mih", "faiss"):
                assert np.array_equal(r.search_hamming(q, k=100, method=method).ids, ref)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_mih_on_a_tiny_collection_scans_instead_of_enumerating(n):
    """A few items with long substrings (n=1: two 20-bit tables for 40 bits): a query at the
    far end would enumerate C(20, 10) probes per table; the search reads the n codes instead,
    exactly (ties included), and enumerates almost nothing. (The CI run that died at 137 had hit
    this with 64-bit codes in a one-item shard: C(32, 16) probes.)"""
    from cbir.indexer.mih import MIH

    rng = np.random.default_rng(n)
    codes = Codes.from_bits(rng.integers(0, 2, (n, 40), dtype=np.uint8))
    mih = MIH(codes.packed, 40)
    for q in (Codes.from_bits(1 - codes.to_bits()[:1]), queries_for(rng, codes, 40, 1)[:1]):
        d = np.bitwise_count(codes.packed ^ q.packed[0]).sum(axis=1)
        for k in (1, n):
            pos, dist = mih.knn(q.packed[0], k)
            dk = np.sort(d)[k - 1]
            assert sorted(pos.tolist()) == np.flatnonzero(d <= dk).tolist()
            assert np.array_equal(dist, d[pos])
        for radius in (0, 20, 40):
            pos, _ = mih.range(q.packed[0], radius)
            assert sorted(pos.tolist()) == np.flatnonzero(d <= radius).tolist()
    probes = sum(len(v[0]) for v in getattr(mih, "_probe_cache", {}).values())
    assert probes < 2_000, probes


@pytest.mark.parametrize("nbits", [12, 24, 64, 70])
def test_radix_key_order_and_mih_tables_equal_numpy_sorts(nbits):
    """Above RADIX_MIN the build sorts with a counting sort (FAISS bucket_sort) then numpy's
    stable sort; MIH tables come from one counting sort each: same permutations as numpy's
    stable argsort / lexsort, duplicates and unsorted ids included."""
    from cbir.indexer import rows
    from cbir.indexer.mih import MIH

    rng = np.random.default_rng(nbits)
    n = rows.RADIX_MIN + 4321
    codes = random_codes(rng, n, nbits, "clustered")
    codes.packed[: n // 3] = codes.packed[n // 3 : 2 * (n // 3)]  # many exact duplicates
    ids = rng.permutation(n).astype(np.int64) * 5
    for ids_sorted, idv in ((False, ids), (True, np.sort(ids))):
        ref = np.lexsort([idv] + [codes.packed[:, j] for j in range(codes.nbytes - 1, -1, -1)])
        assert np.array_equal(rows.key_order(codes.packed, idv, ids_sorted), ref)
    v = rng.integers(0, 2**40, n).astype(np.uint64)
    assert np.array_equal(rows.stable_argsort_u64(v, 40), np.argsort(v, kind="stable"))
    sc = codes.packed[rows.key_order(codes.packed, ids)]
    mih = MIH(sc, nbits)
    for t in range(mih.m):  # every bucket holds exactly the rows with that substring value
        vals = mih._subvals(t).astype(np.int64)
        if mih._comb:
            bases, offs, perm, _c = mih._comb
            off = offs[int(bases[t]) : int(bases[t]) + (1 << mih.sizes[t]) + 1].astype(np.int64) - t * n
            got = perm[t * n : (t + 1) * n]
            if _c is not None:  # the codes stored again in bucket order
                assert np.array_equal(_c[t * n : (t + 1) * n], mih.codes64[got])
        else:
            got, off, _sv = mih.tables[t]
            if off is None:
                assert np.array_equal(got, np.argsort(vals, kind="stable"))
                continue
        assert np.array_equal(got, np.argsort(vals, kind="stable"))
        assert np.array_equal(np.diff(off), np.bincount(vals, minlength=1 << mih.sizes[t]))


@pytest.mark.parametrize("mode", ["after", "thread", "child", "child-fails"])
def test_large_build_is_exact_with_either_writer(tmp_path, mode, monkeypatch, caplog):
    """A build past PERSIST_MIN and RADIX_MIN (derived structures saved with it): the derived
    structures built after the LMDB append, alongside it in a thread, in a child process (or,
    when the child fails, by the parent after it): searches equal brute force, ids map back,
    and the saved files are the same in every mode."""
    from cbir.indexer import build as build_mod
    from cbir.indexer import derivejob

    monkeypatch.setattr(build_mod, "PARALLEL", mode == "thread")
    monkeypatch.setattr(build_mod, "OVERLAP_MIN", 0 if mode.startswith("child") else None)
    monkeypatch.setattr(build_mod, "_spare_cpu", lambda: True)
    if mode == "child-fails":
        monkeypatch.setattr(derivejob.sys, "executable", "/bin/false")
    rng = np.random.default_rng(7)
    n = 70_000
    codes = random_codes(rng, n, 64, "clustered")
    codes.packed[:500] = codes.packed[500:1000]
    ids = rng.permutation(n).astype(np.int64) * 3 + 1
    if mode == "after":  # (ids 0..n-1 in order: the sorted ids are the sort's permutation)
        ids = np.arange(n, dtype=np.int64)
    with caplog.at_level(logging.DEBUG, logger="cbir.indexer.derivejob"):
        out = build_index(tmp_path / "ix", ids, codes, layout=CodeLayout(64, class_bits=2))
    assert ("building in process" in caplog.text) == (mode == "child-fails")
    with open_index(out) as r:
        assert r.derived().base.saved_dir is not None
        for q in queries_for(rng, codes, 64, 3):
            assert np.array_equal(r.search_lex(q, 50).ids, ref_ids(q, codes, ids, 50, "lex"))
            assert np.array_equal(r.search_hamming(q, k=20).ids, ref_ids(q, codes, ids, 20, "hamming"))
        for j in rng.integers(0, n, 5):
            assert np.array_equal(r.get(int(ids[j])).code.packed, codes.packed[j : j + 1])
        saved = r.derived().base.saved_dir
        names = sorted(f.name for f in saved.iterdir())
        assert names == sorted(EXPECTED_SAVED), names
        assert not [f for f in saved.parent.iterdir() if f.name.startswith(".")]  # no staging left


EXPECTED_SAVED = ["codes.npy", "ids.npy", "head64.npy", "mih.json", "mihc_bases.npy", "mihc_offs.npy"]
EXPECTED_SAVED += ["mihc_perm.npy", "mihc_codes.npy", "sid.npy", "spos.npy", "faiss.bin", "state.json"]


def test_lex_on_a_closed_reader_raises(tmp_path):
    rng = np.random.default_rng(2)
    codes = random_codes(rng, 50, 64, "clustered")
    r = open_index(build_index(tmp_path / "ix", np.arange(50), codes))
    assert len(r.search_lex(codes[:1], 5)) == 5
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.search_lex(codes[:1], 5)


def test_failed_large_build_stops_its_child(tmp_path, monkeypatch):
    """A build that fails after starting the derived-structure child stops it and leaves no
    partial directory."""
    from cbir.indexer import build as build_mod
    from cbir.indexer import derivejob

    monkeypatch.setattr(build_mod, "OVERLAP_MIN", 0)
    monkeypatch.setattr(build_mod, "_spare_cpu", lambda: True)
    procs = []
    real = derivejob.spawn

    def spawn():
        procs.append(real())
        return procs[-1]

    def boom(*a, **kw):
        raise RuntimeError("sort failed")

    monkeypatch.setattr(derivejob, "spawn", spawn)
    monkeypatch.setattr(build_mod, "_sort_keys", boom)
    rng = np.random.default_rng(1)
    codes = random_codes(rng, 60_000, 64, "clustered")
    with pytest.raises(RuntimeError, match="sort failed"):
        build_index(tmp_path / "ix", np.arange(60_000), codes)
    assert len(procs) == 1 and procs[0] is not None and procs[0].poll() is not None
    assert not (tmp_path / "ix").exists() and not list(tmp_path.iterdir())


def test_derived_child_only_with_a_spare_core(monkeypatch):
    from cbir.indexer import build as build_mod

    monkeypatch.setattr(build_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(build_mod.os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert build_mod._spare_cpu()
    monkeypatch.setattr(build_mod.os, "getloadavg", lambda: (3.5, 3.0, 3.0))
    assert not build_mod._spare_cpu()
    monkeypatch.setattr(build_mod.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(build_mod.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert not build_mod._spare_cpu()
