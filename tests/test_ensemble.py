"""Ensemble checkpoints: every member encodes, the class answer is the t-test's, the round trip
is exact, and an ensemble builds an index like any model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbir.ensemble import EnsembleHasher, train_ensemble
from cbir.models.hasher import Hasher
from cbir.models.registry import MethodSpec, create_method, resolve_params
from cbir.uncertainty import class_decision


def _member(seed, method="ddtl"):
    torch.manual_seed(seed)
    spec = MethodSpec(
        backbone="convnet",
        num_classes=4,
        nbits=None,
        depth=6 if method == "ddtl" else None,
        class_names=tuple("abcd"),
        backbone_kwargs=(("width", 8),),
    )
    params = resolve_params(method, None)
    return Hasher(create_method(method, spec, params), method, spec, params, image_size=32, device="cpu")


@pytest.fixture(scope="module")
def ensemble():
    return EnsembleHasher([_member(s) for s in (0, 1, 2)], "seed")


def test_ensemble_code_and_class_answer(ensemble):
    x = torch.randn(20, 3, 32, 32)
    e = ensemble.encode_ensemble(x)
    with torch.no_grad():
        logits = np.stack([m.method.class_head(m.method.backbone(x)).numpy() for m in ensemble.members])
    want = class_decision(logits, ensemble.tau, ensemble.margin)
    np.testing.assert_allclose(e.decision.confidence, want.confidence)
    assert np.array_equal(e.decision.idk, want.idk)
    bits = e.codes.to_bits()
    cb = ensemble.layout.class_bits
    cls = (bits[:, :cb] * (1 << np.arange(cb - 1, -1, -1))).sum(axis=1)
    assert np.array_equal(cls, want.predicted)  # class bits = the ensemble's class
    primary, _ = ensemble.members[0].encode_tensor(x)
    assert np.array_equal(bits[:, cb:], primary.to_bits()[:, cb:])  # path bits = the primary's
    assert e.bit_agreement.shape == (20, ensemble.nbits) and (e.bit_agreement >= 0.5).all()
    assert len(e.member_codes) == 3


def test_ensemble_checkpoint_round_trip(tmp_path, ensemble):
    path = ensemble.save(tmp_path / "ens.pt")
    loaded = Hasher.load(path, device="cpu")
    assert isinstance(loaded, EnsembleHasher) and loaded.content_hash == ensemble.content_hash
    x = torch.randn(9, 3, 32, 32)
    (c1, f1), (c2, f2) = ensemble.encode_tensor(x), loaded.encode_tensor(x)
    assert c1 == c2 and np.array_equal(f1, f2)
    e1, e2 = ensemble.encode_ensemble(x), loaded.encode_ensemble(x)
    np.testing.assert_array_equal(e1.decision.confidence, e2.decision.confidence)
    # a corrupted member is detected
    payload = torch.load(path, weights_only=False)
    payload["members"][1]["state_dict"] = {k: v + 1 for k, v in payload["members"][1]["state_dict"].items()}
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="content hash mismatch"):
        Hasher.load(tmp_path / "bad.pt", device="cpu")


def test_ensemble_rejects_mismatched_members():
    with pytest.raises(ValueError, match="at least 2 members"):
        EnsembleHasher([_member(0)])
    with pytest.raises(ValueError, match="another code layout"):
        EnsembleHasher([_member(0), _member(1, "ce")])


def test_ensemble_builds_an_index(tmp_path, ensemble):
    from cbir.cli import main
    from cbir.data import load_dataset
    from cbir.indexer import open_index

    # a margin at the median gap between the two most confident classes: about half the items IDK
    db = load_dataset("digits").database
    probe = ensemble.encode_imageset_decisions(db.subset(np.arange(200)))[3].confidence
    srt = np.sort(probe, axis=1)
    ensemble = EnsembleHasher(ensemble.members, "seed", margin=float(np.median(srt[:, -1] - srt[:, -2])))
    path = ensemble.save(tmp_path / "ens.pt")
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                str(path),
                "--dataset",
                "digits",
                "--out",
                str(tmp_path / "ix"),
                "--no-progress",
            ]
        )
        == 0
    )
    from cbir.data import load_dataset

    codes, _, idx, dec = Hasher.load(path, device="cpu").encode_imageset_decisions(db)
    assert np.array_equal(idx, np.arange(len(db)))
    with open_index(tmp_path / "ix") as r:
        items = [r.get(i) for i in range(len(db))]
        assert r.model_hash == ensemble.content_hash
        built = r.manifest["build"]["ensemble"]
    assert np.array_equal(np.concatenate([it.code.packed for it in items]), codes.packed)
    # every item's class answer is in its metadata (hardness, IDK flag, prediction set)
    np.testing.assert_allclose([it.meta["hardness"] for it in items], dec.hardness)
    assert [it.meta["idk"] for it in items] == dec.idk.tolist() and 0.1 < dec.idk.mean() < 0.9
    assert [it.meta["prediction_set"] for it in items] == dec.sets()
    assert all(it.meta["idk"] == (len(it.meta["prediction_set"]) != 1) for it in items)
    assert built["members"] == 3 and built["perturb"] == "seed" and built["idk_items"] == int(dec.idk.sum())


def test_single_model_index_has_no_hardness(tmp_path):
    from cbir.cli import main
    from cbir.indexer import open_index

    path = _member(0).save(tmp_path / "one.pt")
    assert main(["index", "build", "--model", str(path), "--dataset", "digits", "--out", str(tmp_path / "ix")]) == 0
    with open_index(tmp_path / "ix") as r:
        assert "hardness" not in r.get(0).meta and "ensemble" not in r.manifest["build"]


def test_train_ensemble_seed_members(tmp_path):
    from cbir.engine import TrainConfig

    cfg = TrainConfig(
        method="ddtl",
        dataset="digits",
        backbone="convnet",
        depth=4,
        epochs=1,
        batch_size=32,
        max_steps=2,
        out=str(tmp_path / "e"),
        progress=False,
        threads=1,
    )
    path = train_ensemble(cfg, 2, "seed")
    ens = Hasher.load(path, device="cpu")
    assert isinstance(ens, EnsembleHasher) and len(ens.members) == 2
    assert ens.members[0].content_hash != ens.members[1].content_hash  # different starting points
    assert (tmp_path / "e" / "member-1" / "model.pt").is_file()
    with pytest.raises(ValueError, match="one backbone per member"):
        train_ensemble(cfg, 2, "arch", ["convnet"])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cb, depth", [(2, 6), (4, 14), (4, 0)])
def test_prediction_set_search_equals_brute_force_union(tmp_path, seed, cb, depth):
    from cbir.codes import CodeLayout, Codes
    from cbir.ensemble import search_prediction_set
    from cbir.indexer import build_index, open_index

    rng = np.random.default_rng(seed)
    n, nc = 300, 1 << cb
    bits = rng.integers(0, 2, (n, cb + depth)).astype(bool)
    bits[: n // 3, cb:] = bits[0, cb:]  # many identical path codes: ties
    codes = Codes.from_bits(bits)
    ids = rng.permutation(10_000)[:n]
    layout = CodeLayout(nbits=cb + depth, class_bits=cb, depth=depth)
    cls = (bits[:, :cb] * (1 << np.arange(cb - 1, -1, -1))).sum(axis=1)
    with open_index(build_index(tmp_path / "ix", ids, codes, layout=layout)) as r:
        for _ in range(10):
            q = Codes.from_bits(rng.integers(0, 2, (1, cb + depth)).astype(bool))
            classes = [int(c) for c in rng.permutation(nc)[: rng.integers(1, 4)]]
            # subtrees of n / 2^cb items: read whole (k >= their size) or by a lex search
            k = int(rng.integers(1, 2 * n // nc + 10))
            got_ids, got_codes = search_prediction_set(r, q, classes, k, fill=False)
            # brute force: every item of the classes, path XOR (big-endian), class rank, id
            sel = np.flatnonzero(np.isin(cls, classes))
            qp = q.to_bits()[0, cb:]
            xor = ((bits[sel, cb:] ^ qp) * (1 << np.arange(depth - 1, -1, -1))).sum(axis=1)
            crank = np.array([classes.index(c) for c in cls[sel]])
            top = sel[np.lexsort((ids[sel], crank, xor))][:k]
            assert np.array_equal(got_ids, ids[top])
            assert got_codes == codes[top]
            # filled: then the other items by big-endian XOR of the whole code, then id
            rest = np.flatnonzero(~np.isin(cls, classes))
            full = ((bits[rest] ^ q.to_bits()[0]) * (1 << np.arange(cb + depth - 1, -1, -1))).sum(axis=1)
            want = np.concatenate([top, rest[np.lexsort((ids[rest], full))]])[:k]
            got_ids, got_codes = search_prediction_set(r, q, classes, k)
            assert len(got_ids) == min(k, n) and np.array_equal(got_ids, ids[want])
            assert got_codes == codes[want]
            kf = len(sel) + 7  # always filled: the set's items, then 7 others
            want = np.concatenate([sel[np.lexsort((ids[sel], crank, xor))], rest[np.lexsort((ids[rest], full))]])
            got_ids, got_codes = search_prediction_set(r, q, classes, kf)
            assert np.array_equal(got_ids, ids[want[:kf]]) and got_codes == codes[want[:kf]]


class _CountingReader:
    """A reader that counts its lexicographic searches."""

    def __init__(self, reader):
        self.reader, self.layout, self.searches = reader, reader.layout, 0

    def count(self):
        return self.reader.count()

    def search_lex(self, *args, **kwargs):
        self.searches += 1
        return self.reader.search_lex(*args, **kwargs)


def _brute_prediction_set(bits, ids, cls, qbits, classes, k, cb, fill=True):
    """Rows of the prediction-set answer by brute force: the set's items by (path XOR bits,
    class rank, id), then (filled) the others by (XOR bits of the whole code, id)."""
    sel = np.flatnonzero(np.isin(cls, classes))
    crank = np.array([classes.index(c) for c in cls[sel]], dtype=np.int64)
    xs = bits[sel, cb:] ^ qbits[cb:]
    top = sel[np.lexsort((ids[sel], crank) + tuple(xs[:, j] for j in range(xs.shape[1] - 1, -1, -1)))][:k]
    if not fill:
        return top
    rest = np.flatnonzero(~np.isin(cls, classes))
    xr = bits[rest] ^ qbits
    rest = rest[np.lexsort((ids[rest],) + tuple(xr[:, j] for j in range(xr.shape[1] - 1, -1, -1)))]
    return np.concatenate([top, rest])[:k]


@pytest.mark.parametrize("whole", [True, False])
@pytest.mark.parametrize("cb, depth", [(4, 0), (2, 6), (4, 12), (4, 20), (5, 30), (3, 61), (10, 6), (9, 60), (6, 70)])
def test_prediction_set_search_paths_equal_brute_force(tmp_path, monkeypatch, cb, depth, whole):
    """Every path of the search (one search of a small index ranked whole, or the searches per
    class re-using the blocks of earlier answers; the merge by one uint key for codes of <= 64
    bits of 1 to 8 bytes, by a lexsort of every byte beyond; 1 and 2 class bytes) gives the
    brute-force answer, and a whole read is one search."""
    import cbir.ensemble as ens
    from cbir.codes import CodeLayout, Codes
    from cbir.indexer import build_index, open_index

    monkeypatch.setattr(ens, "WHOLE_READ_EXTRA_ROWS", 10**9 if whole else -(10**9))
    rng = np.random.default_rng(cb * 100 + depth)
    n, nbits = 300, cb + depth
    pool = rng.choice(1 << cb, min(6, 1 << cb), replace=False)  # the classes holding items
    cls = pool[rng.integers(0, len(pool), n)]
    bits = np.zeros((n, nbits), bool)
    bits[:, :cb] = (cls[:, None] >> np.arange(cb - 1, -1, -1)) & 1
    bits[:, cb:] = rng.integers(0, 2, (n, depth))
    bits[: n // 3, cb:] = bits[0, cb:]  # many identical path codes: ties
    codes = Codes.from_bits(bits)
    ids = rng.permutation(10_000)[:n]
    layout = CodeLayout(nbits=nbits, class_bits=cb, depth=depth)
    with open_index(build_index(tmp_path / "ix", ids, codes, layout=layout)) as r:
        cr = _CountingReader(r)
        for t in range(24):
            qbits = rng.integers(0, 2, nbits).astype(bool)
            own = int(rng.choice(pool))
            qbits[:cb] = (own >> np.arange(cb - 1, -1, -1)) & 1
            empty = (int(pool.max()) + 1) % (1 << cb)  # (an empty class when the pool leaves one)
            others = [int(c) for c in rng.permutation(np.unique(np.append(pool, empty))) if c != own]
            classes = ([own] if t % 4 else []) + others[: int(rng.integers(1, 4))]  # (some sets lack the own class)
            k = int(rng.choice([1, 7, int(rng.integers(1, n)), n // len(pool), n + 5]))
            q = Codes.from_bits(qbits[None, :])
            for fill in (True, False):
                cr.searches = 0
                got_ids, got_codes = ens.search_prediction_set(cr, q, classes, k, fill=fill)
                want = _brute_prediction_set(bits, ids, cls, qbits, classes, k, cb, fill)
                assert got_ids.dtype == np.int64 and np.array_equal(got_ids, ids[want]), (t, fill)
                assert got_codes == codes[want] and got_codes.nbits == nbits
                if whole and nbits <= 64 and len(set(classes)) > 1:
                    assert cr.searches == 1
                elif k > n:  # the first answer holds the whole index: no other search but the fill's
                    assert cr.searches == (2 if fill and own not in classes else 1)
                else:
                    assert cr.searches <= len(set(classes)) + 1
        with pytest.raises(ValueError, match="does not fit"):
            ens.search_prediction_set(r, codes[:1], [int(cls[0]), 1 << cb], 5)


def _shared(members):
    """Members with member 0's backbone weights (heads-only members of one frozen backbone)."""
    sd = members[0].method.backbone.state_dict()
    for m in members[1:]:
        m.method.backbone.load_state_dict(sd)
    return members


def test_shared_backbone_runs_once_and_gives_the_per_member_answer():
    members = _shared([_member(s) for s in (3, 4, 5)])
    for m in members:
        m.batch_size = 7  # several chunks per batch
    ens = EnsembleHasher(members, "seed")
    assert ens.shared_backbone
    x = torch.randn(23, 3, 32, 32)
    calls = []
    hooks = [m.method.backbone.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, m in enumerate(members)]
    shared = ens.encode_ensemble(x)
    assert calls == [0, 0, 0, 0]  # 4 chunks of <= 7 images, the primary's backbone only
    calls.clear()
    ens.shared_backbone = False
    per_member = ens.encode_ensemble(x)
    assert calls == [0, 1, 2] * 4  # every member's backbone, once per chunk
    for h in hooks:
        h.remove()
    assert shared.codes == per_member.codes and np.array_equal(shared.conf, per_member.conf)
    np.testing.assert_array_equal(shared.decision.confidence, per_member.decision.confidence)
    assert all(a == b for a, b in zip(shared.member_codes, per_member.member_codes))
    for m, c in zip(members, shared.member_codes):  # and each member's own encoding
        own, _ = m.encode_tensor(x)
        assert own == c
    # distinct backbones are not shared
    assert not EnsembleHasher([_member(0), _member(1)]).shared_backbone
