"""The hybrid fast path (:mod:`cbir.indexer.hybrid`: exact Hamming k-NN in the class bucket
through the combined MIH tables, codes of <= 64 bits) equals brute force, ties included, on
fresh indexes, after deletes and with rows added since the base."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from _helpers import queries_for, random_codes, ref_ids

from cbir.codes import CodeLayout, Codes
from cbir.indexer import IndexWriter, build_index, hamming, hybrid, open_index


def _ref(q: Codes, codes: Codes, ids: np.ndarray, alive: np.ndarray, cb: int, k: int):
    same = alive & (codes.to_bits()[:, :cb] == q.to_bits()[0, :cb]).all(axis=1)
    sub = np.flatnonzero(same)
    if not len(sub):
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    got = ref_ids(q, codes[sub], ids[sub], k, "hamming")
    row = {int(i): j for j, i in enumerate(ids)}
    dist = np.array([np.bitwise_count(codes.packed[row[int(i)]] ^ q.packed[0]).sum() for i in got], np.int32)
    return got, dist


@pytest.fixture
def fast_calls(monkeypatch):
    """Every bucket is searched by the fast path (no bucket is small enough to scan, no budget
    is exceeded); counts the calls of ``bucket_topk`` that gave an answer."""
    monkeypatch.setattr(hamming, "SLICE_SCAN_MAX", 0)
    monkeypatch.setattr(hamming.MethodChooser, "slice_budget", lambda self, n: 10**15)
    monkeypatch.setattr(hamming.MethodChooser, "try_mih", lambda self: True)
    calls = {"answered": 0}
    real = hybrid.bucket_topk

    def counted(*a, **kw):
        got = real(*a, **kw)
        calls["answered"] += got is not None
        return got

    monkeypatch.setattr(hybrid, "bucket_topk", counted)
    return calls


@pytest.mark.parametrize("nbits", [7, 12, 21, 40, 64])
@pytest.mark.parametrize("kind", ["clustered", "dups", "uniform"])
@pytest.mark.parametrize("cb", [1, 2, 5])
def test_hybrid_fast_path_matches_brute_force(tmp_path, fast_calls, nbits, kind, cb):
    rng = np.random.default_rng(nbits * 100 + cb)
    n = 3000
    codes = random_codes(rng, n, nbits, kind)
    codes.packed[:300] = codes.packed[300:600]  # duplicate codes: ties broken by id
    ids = rng.permutation(n).astype(np.int64) * 7 + 3
    alive = np.ones(n, bool)
    out = build_index(tmp_path / "ix", ids, codes, layout=CodeLayout(nbits, class_bits=cb))
    qs = queries_for(rng, codes, nbits, 6)
    with open_index(out) as r:
        for step in ("fresh", "deleted", "added"):
            if step == "deleted":
                gone = rng.choice(n, n // 10, replace=False)
                with IndexWriter(out) as w:
                    w.delete(ids[gone])
                alive[gone] = False
                r.refresh()
            if step == "added":  # rows added since the base: the general path, same answers
                extra = random_codes(rng, 50, nbits, kind)
                new_ids = np.arange(50, dtype=np.int64) * 7 + 1
                with IndexWriter(out) as w:
                    w.add(new_ids, extra)
                codes = Codes(np.concatenate([codes.packed, extra.packed]), nbits)
                ids = np.concatenate([ids, new_ids])
                alive = np.concatenate([alive, np.ones(50, bool)])
                r.refresh()
            before = fast_calls["answered"]
            for q in qs:
                for k in (1, 10, 100, n + 5):
                    got = r.search_hybrid(q, k)
                    ref, dist = _ref(q, codes, ids, alive, cb, k)
                    assert np.array_equal(got.ids, ref), (step, k)
                    assert np.array_equal(got.distances, dist), (step, k)
                    row = {int(i): j for j, i in enumerate(ids)}
                    want = codes.packed[[row[int(i)] for i in ref]] if len(ref) else np.zeros((0, codes.nbytes))
                    assert np.array_equal(got.codes.packed, want)
                    x = np.unpackbits(got.codes.packed ^ q.packed[0], axis=1, count=nbits)
                    cpl = np.where(x.any(axis=1), np.argmax(x, axis=1), nbits) if len(x) else np.zeros(0)
                    assert np.array_equal(got.prefix_lengths, cpl)
            if step != "added" and kind != "uniform":
                assert fast_calls["answered"] > before  # (the fast path answered)
            if step == "added":
                assert fast_calls["answered"] == before


@pytest.mark.parametrize("start", ["fresh", "tiny"])
@pytest.mark.parametrize(("m", "cb"), [(None, 3), (16, 9), (8, 1)])
def test_bucket_probe_returns_every_row_within_the_kth_distance(m, cb, start, monkeypatch):
    """The candidate set itself: all live bucket rows within the k-th distance, nothing else
    (class bits inside the first table, or spanning several: 16 tables of 4 bits, cb = 9).
    ``tiny``: the thread's scratch buffers start at 2 entries, so the kernel stops for more
    room and is called again (the grow-and-retry path, checked against brute force too)."""
    from cbir.indexer.mih import MIH
    from cbir.indexer.rows import head64

    if start == "tiny":
        monkeypatch.setattr(hybrid, "_TLS", threading.local())
        hybrid._TLS.buf = (np.empty(2, np.int64), np.empty(2, np.uint64), np.empty(2, np.uint8))
        grown = []
        real = hybrid._scratch
        monkeypatch.setattr(hybrid, "_scratch", lambda need: grown.append(need) or real(need))

    rng = np.random.default_rng(5)
    n, nbits = 20_000, 64
    codes = random_codes(rng, n, nbits, "clustered")
    h = np.sort(head64(codes.packed))
    packed = h.astype(">u8").view(np.uint8).reshape(n, 8).copy()
    mih = MIH(packed, nbits, m=m, codes64=h)
    assert mih._combined() is not None
    alive = rng.random(n) > 0.2
    answered = 0
    for i in rng.integers(0, n, 12):
        flips = rng.choice(np.arange(cb, nbits), int(i % 4), replace=False)  # (class bits kept)
        q64 = int(h[i]) ^ sum(1 << (63 - int(b)) for b in flips)
        same = (h >> np.uint64(64 - cb)) == np.uint64(q64 >> (64 - cb))
        bucket = np.flatnonzero(same)
        for k in (1, 50, 500):
            for a in (None, alive):
                got = hybrid._probe(mih, q64, k, cb, len(bucket), a, None)
                if got is None:  # (a stage would cost more than a scan of the bucket)
                    continue
                answered += 1
                n_, pos, x, d = got
                pos, x, d = pos[:n_], x[:n_], d[:n_]
                live = bucket if a is None else bucket[a[bucket]]
                dist = np.bitwise_count(h[live] ^ np.uint64(q64))
                dk = np.sort(dist)[min(k, len(dist)) - 1]
                want = live[dist <= dk]
                assert np.array_equal(np.sort(pos), want)
                assert np.array_equal(x, h[pos] ^ np.uint64(q64))
                assert np.array_equal(d, np.bitwise_count(x))
    assert answered >= 48, answered
    if start == "tiny":
        assert any(g > 2 for g in grown)  # (the kernel asked for more room)


def test_class_bucket_bounds(tmp_path):
    """The bucket of a class prefix (cached bounds for <= CLASS_BOUNDS_MAX_BITS bits, binary
    searches beyond) is exactly the rows carrying the prefix."""
    rng = np.random.default_rng(9)
    codes = random_codes(rng, 5000, 21, "clustered")
    with open_index(build_index(tmp_path / "ix", np.arange(5000), codes)) as r:
        b = r.derived().base
        bits = np.unpackbits(np.asarray(b.codes), axis=1, count=21)
        for q in queries_for(rng, codes, 21, 5):
            qbits = q.to_bits()[0]
            for p in (1, 2, 5, hamming.CLASS_BOUNDS_MAX_BITS, hamming.CLASS_BOUNDS_MAX_BITS + 1, 21):
                lo, hi = r._prefix_range(b, q.packed[0], p)
                rows = np.flatnonzero((bits[:, :p] == qbits[:p]).all(axis=1))
                assert (lo, hi) == ((int(rows[0]), int(rows[-1]) + 1) if len(rows) else (lo, lo)), p
                assert hi - lo == len(rows)


def test_hybrid_without_combined_tables(tmp_path, monkeypatch):
    """MIH tables too wide to address directly (not combined): the restricted MIH search of
    the general path, the same answers."""
    from cbir.indexer import mih as mih_mod

    monkeypatch.setattr(hamming, "SLICE_SCAN_MAX", 0)
    monkeypatch.setattr(mih_mod, "DIRECT_MAX_BITS", 4)
    rng = np.random.default_rng(11)
    n, nbits, cb = 3000, 21, 2
    codes = random_codes(rng, n, nbits, "clustered")
    ids = np.arange(n, dtype=np.int64)
    with open_index(build_index(tmp_path / "ix", ids, codes, layout=CodeLayout(nbits, class_bits=cb))) as r:
        assert r.derived().base.mih._combined() is None
        for q in queries_for(rng, codes, nbits, 6):
            for k in (1, 10, 100):
                ref, dist = _ref(q, codes, ids, np.ones(n, bool), cb, k)
                got = r.search_hybrid(q, k)
                assert np.array_equal(got.ids, ref) and np.array_equal(got.distances, dist)


def test_preload_touches_the_base_and_loads_the_kernel(tmp_path, monkeypatch):
    """``IndexReader.preload`` reads every array of the base (its bytes are returned) and loads
    the compiled hybrid loop; answers are unchanged after it."""
    monkeypatch.setattr(hybrid, "_KERNELS", None)
    rng = np.random.default_rng(2)
    codes = random_codes(rng, 4000, 24, "clustered")
    ids = np.arange(4000, dtype=np.int64) * 3
    out = build_index(tmp_path / "ix", ids, codes, layout=CodeLayout(24, class_bits=2))
    with open_index(out) as r:
        q = queries_for(rng, codes, 24, 1)[0]
        before = r.search_hybrid(q, 20)
        got = r.preload()
        b = r.derived().base
        comb = b.mih._combined()
        want = sum(np.asarray(a).nbytes for a in (b.codes, b.ids, b.head64, *b.by_id(), *comb) if a is not None)
        assert got == want
        assert hybrid._KERNELS is not None
        after = r.search_hybrid(q, 20)
        assert np.array_equal(before.ids, after.ids) and np.array_equal(before.distances, after.distances)


def test_kernels_load_in_the_background(tmp_path, monkeypatch):
    """A reader's first Hamming queries do not wait for numba: the numpy MIH search answers while
    a thread loads the kernels (a hybrid query waits for them), then the compiled loops do;
    every answer equals brute force, and deleted rows stay out of both paths."""
    monkeypatch.setattr(hybrid, "BACKGROUND", True)
    monkeypatch.setattr(hamming, "SLICE_SCAN_MAX", 0)
    rng = np.random.default_rng(4)
    n, nbits = 5000, 32
    codes = random_codes(rng, n, nbits, "clustered")
    ids = np.arange(n, dtype=np.int64) * 5 + 2
    out = build_index(tmp_path / "ix", ids, codes, layout=CodeLayout(nbits, class_bits=2))
    gone = rng.choice(n, 200, replace=False)
    with IndexWriter(out) as w:
        w.delete(ids[gone])
    alive = np.ones(n, bool)
    alive[gone] = False
    qs = queries_for(rng, codes, nbits, 4)
    with open_index(out) as r:
        mih = r.derived().base.mih

        def check(hybrid_too=True):
            for q in qs:
                got = r.search_hamming(q, k=25)
                want = ref_ids(q, codes[np.flatnonzero(alive)], ids[alive], 25, "hamming")
                assert np.array_equal(got.ids, want)
                if hybrid_too:
                    got = r.search_hybrid(q, 25)
                    assert np.array_equal(got.ids, _ref(q, codes, ids, alive, 2, 25)[0])

        check(hybrid_too=False)  # (the first query started the loading thread)
        loader = mih.__dict__["_kernels_loading"]
        assert loader is not threading.current_thread()
        check()  # (the hybrid queries wait for it)
        assert mih.__dict__.get("_kernels_ready") is True
        calls = {"n": 0}
        real = hybrid.bucket_topk

        def counted(*a, **kw):
            calls["n"] += 1
            return real(*a, **kw)

        monkeypatch.setattr(hybrid, "bucket_topk", counted)
        check()
        assert calls["n"] >= 2 * len(qs)
