"""``cbir train --ensemble E --perturb seed|bootstrap|arch`` and the bootstrap draws of
:mod:`cbir.data.bootstrap`. Members are tiny (convnet width 8, 2 steps on sklearn digits)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cbir.cli import main
from cbir.data import load_dataset
from cbir.data.bootstrap import BootstrapDraw, bootstrap_draw
from cbir.ensemble import EnsembleHasher
from cbir.models.hasher import Hasher

TINY = ["--method", "ddtl", "--backbone", "convnet", "--width", "8", "--depth", "4", "--epochs", "1"]
TINY += ["--batch-size", "32", "--max-steps", "2", "--threads", "1", "--no-progress"]


def _train(tmp_path, *extra) -> EnsembleHasher:
    assert main(["train", *TINY, "--out", str(tmp_path / "e"), *extra]) == 0
    ens = Hasher.load(tmp_path / "e" / "model.pt", device="cpu")
    assert isinstance(ens, EnsembleHasher)
    return ens


# ---------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ensemble", "1"], "at least 2 members"),
        (["--ensemble", "0"], "at least 2 members"),
        (["--ensemble", "2", "--perturb", "dropout"], "unknown perturbation; use one of seed, bootstrap, arch"),
        (["--ensemble", "2", "--perturb", "arch"], "--perturb arch needs --ensemble-backbones"),
        (["--ensemble", "2", "--perturb", "arch", "--ensemble-backbones", "convnet,vgg"], "unknown backbone"),
        (["--ensemble", "2", "--perturb", "seed", "--ensemble-backbones", "convnet"], "for --perturb arch only"),
        (["--perturb", "seed"], "need --ensemble E"),
        (["--ensemble", "2", "--perturb", "bootstrap", "--val-fraction", "0.1"], "use --val-fraction 0"),
    ],
)
def test_train_ensemble_flag_errors(tmp_path, capsys, extra, message):
    assert main(["train", *TINY, "--out", str(tmp_path / "e"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cbir train: error:") and message in err
    assert not (tmp_path / "e" / "model.pt").exists()


def test_train_help_describes_the_ensemble_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--ensemble E", "n draws with replacement", "seed SEED+i", "--ensemble-backbones", "resnet20,convnet"):
        assert text in out


def test_cli_seed_ensemble(tmp_path, capsys):
    ens = _train(tmp_path, "--ensemble", "2", "--perturb", "seed")
    assert ens.perturb == "seed" and len(ens.members) == 2
    assert [i["seed"] for i in ens.member_info] == [0, 1]
    assert ens.members[0].content_hash != ens.members[1].content_hash
    assert ens.members[1].config["ensemble_member"]["seed"] == 1
    assert '"perturb": "seed"' in capsys.readouterr().out


def test_cli_arch_ensemble(tmp_path):
    ens = _train(tmp_path, "--ensemble", "3", "--perturb", "arch", "--ensemble-backbones", "convnet,resnet20")
    assert [m.spec.backbone for m in ens.members] == ["convnet", "resnet20", "convnet"]  # a short list cycles
    assert [i["backbone"] for i in ens.member_info] == ["convnet", "resnet20", "convnet"]
    assert not ens.shared_backbone
    codes, conf = ens.encode_tensor(torch.randn(5, 3, 32, 32))
    assert len(codes) == 5 and conf.shape == (5, ens.nbits)


def test_cli_bootstrap_ensemble_records_reproducible_draws(tmp_path):
    ens = _train(tmp_path, "--ensemble", "2", "--perturb", "bootstrap", "--seed", "3")
    labels = load_dataset("digits").train.labels
    draws = [BootstrapDraw.from_dict(i["bootstrap"]) for i in ens.member_info]
    assert [d.seed for d in draws] == [3, 4] and all(d.n == len(labels) for d in draws)
    assert [i["seed"] for i in ens.member_info] == [3, 3]  # one starting point: the data is the perturbation
    a, b = (d.indices(labels) for d in draws)
    assert not np.array_equal(a, b)
    # the round trip keeps the record, and the record is covered by the content hash
    again = Hasher.load(tmp_path / "e" / "model.pt", device="cpu")
    assert again.member_info == ens.member_info
    payload = torch.load(tmp_path / "e" / "model.pt", weights_only=True)
    payload["members_info"][0]["bootstrap"]["seed"] = 99
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="content hash mismatch"):
        Hasher.load(tmp_path / "edited.pt", device="cpu")


# ------------------------------------------------------------------------ bootstrap draws
def test_bootstrap_draw_is_with_replacement_of_size_n_and_reproducible():
    n = 1000
    a, da = bootstrap_draw(n, seed=7)
    b, db = bootstrap_draw(n, seed=8)
    a2, _ = bootstrap_draw(n, seed=7)
    assert a.shape == (n,) and a.dtype == np.int64 and a.min() >= 0 and a.max() < n
    assert np.array_equal(a, a2) and np.array_equal(da.indices(), a)  # from the seed alone
    assert not np.array_equal(a, b) and da.sha256 != db.sha256
    # with replacement: repeats, and about 1 - 1/e of the items appear (binomial sd ~ 0.015)
    assert len(np.unique(a)) < n and da.unique == len(np.unique(a))
    assert abs(da.unique / n - (1 - np.exp(-1))) < 0.05
    assert da.kind == "bootstrap" and da.reason == ""


def test_bootstrap_draw_detects_a_different_training_set():
    labels = np.repeat(np.arange(3), 4)
    _, d = bootstrap_draw(12, 0, labels, balanced=True, min_per_class=4)
    assert d.kind == "stratified"
    with pytest.raises(ValueError, match="does not reproduce"):
        d.indices(labels[::-1].copy())


def test_balanced_fallback_keeps_every_class_and_says_why():
    # 3 items of class 0 among 300: a plain draw leaves it < 2 distinct items for some seeds
    labels = np.r_[np.zeros(3, np.int64), np.ones(297, np.int64)]
    plain_short = fell_back = 0
    for seed in range(40):
        plain, _ = bootstrap_draw(300, seed)
        short = len(np.unique(plain[labels[plain] == 0])) < 2
        plain_short += short
        idx, d = bootstrap_draw(300, seed, labels, balanced=True)
        assert len(idx) == 300
        if short:
            fell_back += 1
            assert d.kind == "stratified" and "class 0" in d.reason
            assert (labels[idx] == 0).sum() == 3  # stratified: n_c draws inside every class
            assert np.array_equal(d.indices(labels), idx)
        else:
            assert d.kind == "bootstrap" and np.array_equal(idx, plain)
    assert plain_short > 0 and fell_back == plain_short
    # without class-balanced batches the paper's plain draw is kept
    _, d = bootstrap_draw(300, 0, labels, balanced=False)
    assert d.kind == "bootstrap"


def test_bootstrap_seed_replaces_the_train_split_only(tmp_path):
    from cbir.engine import TrainConfig, train

    base = load_dataset("digits")
    cfg = TrainConfig(
        method="ce",
        dataset="digits",
        backbone="convnet",
        backbone_kwargs={"width": 8},
        image_size=16,
        epochs=1,
        max_steps=1,
        batch_size=32,
        threads=1,
        progress=False,
        bootstrap_seed=5,
        out=str(tmp_path),
    )
    res = train(cfg)
    idx, draw = bootstrap_draw(len(base.train), 5, base.train.labels, balanced=False)
    assert res.config["bootstrap"] == draw.to_dict()  # the engine trained on exactly this draw (its SHA-256)
    assert res.config["dataset"]["train"] == len(idx) == len(base.train)
    assert res.config["dataset"]["database"] == len(base.database) and res.config["dataset"]["query"] == len(base.query)
    plain = train(dataclasses.replace(cfg, bootstrap_seed=None, out=str(tmp_path / "plain")))
    assert plain.config["bootstrap"] is None


def test_cli_heads_on_a_frozen_backbone_share_it(tmp_path):
    """--freeze-backbone --init-from: heads-only members, one backbone run per batch."""
    assert main(["train", *TINY, "--out", str(tmp_path / "base")]) == 0
    head = ["--freeze-backbone", "--init-from", str(tmp_path / "base" / "model.pt"), "--head-steps", "3"]
    head += ["--feature-views", "1", "--epochs", "0"]
    for perturb in ("seed", "bootstrap"):
        ens = _train(tmp_path / perturb, "--ensemble", "3", "--perturb", perturb, *head)
        assert ens.shared_backbone, perturb
        assert len({m.content_hash for m in ens.members}) == 3  # the heads differ
        x = torch.randn(6, 3, 32, 32)
        shared = ens.encode_ensemble(x)
        ens.shared_backbone = False
        assert shared.codes == ens.encode_ensemble(x).codes


def test_class_balanced_sampler_on_a_bootstrap_draw():
    """The P x K sampler runs on a bootstrap sample; a plain draw that drops a class would hide
    it from every batch, the fallback draw keeps it."""
    from cbir.data.sampler import ClassBalancedBatchSampler

    labels = np.r_[np.zeros(2, np.int64), np.repeat(np.arange(1, 5), 100)]
    seed = next(s for s in range(100) if not (labels[bootstrap_draw(len(labels), s)[0]] == 0).any())
    plain, _ = bootstrap_draw(len(labels), seed)
    assert 0 not in ClassBalancedBatchSampler(labels[plain], 5, 4, seed=0).classes  # class 0 would be gone
    idx, d = bootstrap_draw(len(labels), seed, labels, balanced=True)
    assert d.kind == "stratified"
    sampler = ClassBalancedBatchSampler(labels[idx], 5, 4, num_batches=20, seed=0)
    assert sampler.classes.tolist() == [0, 1, 2, 3, 4]
    for batch in sampler:
        lab = labels[idx][batch]
        assert sorted(set(lab.tolist())) == [0, 1, 2, 3, 4] and len(batch) == len(set(batch))
        assert (np.bincount(lab)[1:] == 4).all() and np.bincount(lab)[0] == 2  # class 0: its 2 entries
