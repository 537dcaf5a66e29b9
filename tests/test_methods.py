"""Tests of the hashing methods of issue 3 (DMUH, Regu/DPSH, HEGH + CBAM, DHHE, CrPCA, ITQ, LSH)
and of every registered method through the one training engine."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from cbir.losses import DMUHLoss, DPSHLoss, DualHingeLoss, HEGHLoss, similarity_matrix
from cbir.models.cbam import CBAM, stacked_cbam
from cbir.models.methods.crpca import RecursivePCA
from cbir.models.methods.itq import itq_rotation
from cbir.models.registry import MethodSpec, create_method, list_methods, resolve_params

H = torch.tensor([[0.5, -0.2, 0.9], [0.1, 0.4, -0.7], [-0.6, 0.8, 0.3], [0.2, 0.2, 0.2]], dtype=torch.float64)
Y = torch.tensor([0, 0, 1, 2])


def _sim(y):
    return np.array([[1.0 if a == b else 0.0 for b in y] for a in y])


def _sign(v):
    return np.where(v > 0, 1.0, -1.0)


# --------------------------------------------------------------------------------------------
# losses against hand-computed tiny cases
# --------------------------------------------------------------------------------------------
def _dmuh_numpy(h, u, y, beta, gamma, ref):
    n = len(h)
    s = _sim(y)
    total = 0.0
    for i, j in itertools.permutations(range(n), 2):
        theta = 0.5 * h[i] @ h[j]
        total -= math.exp(u[i].mean() + u[j].mean()) * (s[i, j] * theta - math.log(1 + math.exp(theta)))
    per_image = 0.0
    for i in range(n):
        per_image += beta * np.sum(np.exp(u[i]) * (h[i] - _sign(h[i])) ** 2) + gamma * u[i].sum()
    return total / (n * (n - 1)) + per_image / (n * ref)


def test_dpsh_loss_hand_computed():
    loss, _ = DPSHLoss(beta=2.0, ref_pairs=7.0)(H, Y)
    expected = _dmuh_numpy(H.numpy(), np.zeros((4, 3)), Y.tolist(), 2.0, 0.0, 7.0)
    assert float(loss) == pytest.approx(expected, rel=1e-10)


def test_dmuh_loss_hand_computed_and_u0_equals_regu():
    u = torch.tensor([[0.1, 0.0, 0.3], [0.2, 0.2, 0.2], [0.0, 0.5, 0.1], [0.4, 0.0, 0.0]], dtype=torch.float64)
    loss, _ = DMUHLoss(beta=3.0, gamma=0.5, ref_pairs=6.0)(H, u, Y)
    assert float(loss) == pytest.approx(_dmuh_numpy(H.numpy(), u.numpy(), Y.tolist(), 3.0, 0.5, 6.0), rel=1e-10)
    # DMUH with u = 0 is exactly eq. 4 (Regu / DPSH), whatever gamma is
    l0, _ = DMUHLoss(beta=50.0, gamma=1.0)(H, torch.zeros_like(H), Y)
    lr, _ = DPSHLoss(beta=50.0)(H, Y)
    assert float(l0) == pytest.approx(float(lr), rel=1e-12)


def test_dmuh_detached_weights_only_gamma_reaches_u():
    h = H.clone()
    u = torch.full_like(H, 0.2, requires_grad=True)
    loss, _ = DMUHLoss(beta=3.0, gamma=0.5, detach_weights=True, ref_pairs=10.0)(h, u, Y)
    loss.backward()
    assert torch.allclose(u.grad, torch.full_like(H, 0.5 / 40))  # only gamma * sum(u) / (N * ref_pairs)
    u2 = torch.full_like(H, 0.2, requires_grad=True)
    DMUHLoss(beta=3.0, gamma=0.5, detach_weights=False, ref_pairs=10.0)(h, u2, Y)[0].backward()
    assert not torch.allclose(u2.grad, torch.full_like(H, 0.5 / 40))


def _hegh_numpy(b, logits, y, gamma, lam, mu, group_norm=False):
    n, k = b.shape
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    onehot = np.eye(logits.shape[1])[y]
    l_class = ((onehot - p) ** 2).sum(1).mean()
    pairs = list(itertools.combinations(range(n), 2))
    weights, terms = {}, {}
    for i, j in pairs:
        d2 = np.sum((b[i] - b[j]) ** 2)
        similar = y[i] == y[j]
        lp = 0.5 * d2 if similar else 0.5 * max(2 * k - d2, 0.0)
        pi = 1 - p[i, y[i]] if similar else p[i, y[j]]
        pj = 1 - p[j, y[j]] if similar else p[j, y[i]]
        reg = np.abs(np.abs(b[i]) - 1).sum() + np.abs(np.abs(b[j]) - 1).sum()
        weights[i, j], terms[i, j] = (pi * pj) ** gamma, (lp, lam * reg, similar)
    if group_norm:
        for flag in (True, False):
            group = [ij for ij in pairs if terms[ij][2] == flag]
            mean = np.mean([weights[ij] for ij in group])
            for ij in group:
                weights[ij] /= mean
    total = sum(weights[ij] * terms[ij][0] + terms[ij][1] for ij in pairs)
    return total / len(pairs) + mu * l_class


def test_hegh_loss_hand_computed_and_gamma0_is_plain_pair_loss():
    b = torch.tensor([[0.9, -0.8], [0.7, -0.9], [-0.2, 0.1], [0.95, 0.9]], dtype=torch.float64)
    logits = torch.tensor([[2.0, 0.1, -1.0], [0.3, 0.2, 0.1], [0.0, 1.5, 0.2], [1.0, 1.0, 0.5]], dtype=torch.float64)
    for gamma in (1.0, 2.0, 0.0):
        loss, _ = HEGHLoss(gamma=gamma, lam=0.01, mu=1.0, weight_norm="none")(b, logits, Y)
        assert float(loss) == pytest.approx(
            _hegh_numpy(b.numpy(), logits.numpy(), Y.numpy(), gamma, 0.01, 1.0), rel=1e-10
        )
        loss_g, _ = HEGHLoss(gamma=gamma, lam=0.01, mu=1.0)(b, logits, Y)  # default: group-normalised weights
        want_g = _hegh_numpy(b.numpy(), logits.numpy(), Y.numpy(), gamma, 0.01, 1.0, group_norm=True)
        assert float(loss_g) == pytest.approx(want_g, rel=1e-10)
        if gamma > 0:
            assert float(loss_g) != pytest.approx(float(loss), rel=1e-6)  # the normalisation changes something
    # gamma = 0: every hard weight is 1 -> plain eq. 1 pair loss (+ regulariser + class terms)
    loss0, logs = HEGHLoss(gamma=0.0, lam=0.0, mu=0.0)(b, logits, Y)
    plain = np.mean(
        [
            0.5 * np.sum((b[i] - b[j]).numpy() ** 2)
            if Y[i] == Y[j]
            else 0.5 * max(4 - np.sum((b[i] - b[j]).numpy() ** 2), 0)
            for i, j in itertools.combinations(range(4), 2)
        ]
    )
    assert float(loss0) == pytest.approx(plain, rel=1e-10)
    assert logs["hard_w"] == pytest.approx(1.0)


def test_dual_hinge_loss_hand_computed():
    h = H.clone()
    y = torch.tensor([0, 0, 1, 1])
    ds, dd, tau, kappa, rho, lam = 0.25, 0.5, 0.2, 1.5, 0.7, 0.1
    loss, _ = DualHingeLoss(ds, dd, tau, kappa, rho, lam)(h, y)
    hn, k = h.numpy(), 3
    sims, dis = [], []
    for i, j in itertools.combinations(range(4), 2):
        x = (k - hn[i] @ hn[j]) / (2 * k)
        s = (x - ds) / tau if y[i] == y[j] else (dd - x) / tau
        val = 2 * kappa * (math.cosh(max(s, 0.0)) - 1) + rho / (1 + math.exp(-s))
        (sims if y[i] == y[j] else dis).append(val)
    expected = np.mean(sims) + np.mean(dis) + lam * np.mean((hn - _sign(hn)) ** 2)
    assert float(loss) == pytest.approx(expected, rel=1e-10)
    # hard pairs grow exponentially, easy pairs are bounded by rho
    far = DualHingeLoss(ds, dd, tau, 1.0, 1.0, 0.0)
    t = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    assert float(far(t, torch.tensor([0, 0]))[0]) > math.exp((1 - ds) / tau) / 2 - 1  # far similar pair: hard
    assert float(far(t, torch.tensor([0, 1]))[0]) <= 0.5  # far dissimilar pair: easy, bounded


def test_similarity_matrix_multilabel():
    t = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    assert similarity_matrix(t).tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


@pytest.mark.parametrize(
    "bad",
    [
        lambda: DPSHLoss(-1),
        lambda: DMUHLoss(gamma=-1),
        lambda: DPSHLoss(ref_pairs=0),
        lambda: HEGHLoss(margin=-2),
        lambda: DualHingeLoss(delta_s=0.6, delta_d=0.5),
        lambda: DualHingeLoss(tau=0),
    ],
)
def test_loss_arguments_validated(bad):
    with pytest.raises(ValueError):
        bad()


def test_params_validated_by_registry():
    with pytest.raises(ValueError, match="alpha"):
        resolve_params("dmuh", {"alpha": 1.5})
    with pytest.raises(ValueError, match="unknown"):
        resolve_params("hegh", {"gama": 0})
    assert resolve_params("hegh", {"gamma": "0"}).gamma == 0.0


# --------------------------------------------------------------------------------------------
# DMUH momentum net, HEGH CBAM
# --------------------------------------------------------------------------------------------
SPEC = MethodSpec(backbone="convnet", num_classes=10, nbits=8, backbone_kwargs=(("width", 8),))


def test_dmuh_momentum_update_matches_eq5():
    m = create_method("dmuh", SPEC, {"alpha": 0.7})
    assert all(not p.requires_grad for p in m._momentum_params())
    assert all(p.requires_grad for p in m._hash_params())
    with torch.no_grad():
        for p in m._hash_params():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in m._momentum_params()]
    hashp = [p.clone() for p in m._hash_params()]
    m.after_step()
    for old, h, new in zip(before, hashp, m._momentum_params()):
        assert torch.allclose(new, 0.7 * old + 0.3 * h, atol=1e-6)
    # the momentum copy is part of the checkpoint
    assert any(k.startswith("momentum_backbone.") for k in m.state_dict())


def test_cbam_shapes_and_attention_range():
    x = torch.randn(2, 16, 9, 7)
    block = CBAM(16, reduction=4)
    mc, ms = block.attention(x)
    assert mc.shape == (2, 16, 1, 1) and ms.shape == (2, 1, 9, 7)
    assert bool(((mc > 0) & (mc < 1)).all()) and bool(((ms > 0) & (ms < 1)).all())
    assert block(x).shape == x.shape
    assert stacked_cbam(16, 3, 4)(x).shape == x.shape
    m = create_method("hegh", SPEC)
    post = m.backbone.post_stage[0]  # default: after the first stage (the paper: early)
    assert len(post) == 3 and all(isinstance(b, CBAM) for b in post)
    assert isinstance(create_method("hegh", SPEC, {"cbam_stage": 1}).backbone.post_stage[1][0], CBAM)
    with pytest.raises(ValueError, match="cbam_stage"):
        create_method("hegh", SPEC, {"cbam_stage": 5})
    bits, conf = m.eval().encode(torch.randn(3, 3, 16, 16))
    assert bits.shape == (3, 8) and bits.dtype == torch.bool and bool(((conf >= 0) & (conf <= 1)).all())


def test_hegh_gamma_is_zero_until_the_classifier_reaches_the_stated_accuracy():
    torch.manual_seed(0)
    m = create_method("hegh", SPEC, {"gamma_after_acc": 0.6, "acc_momentum": 0.0})
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    with torch.no_grad():
        m.head.fc.weight.zero_()
        m.head.fc.bias.copy_(torch.tensor([5.0] + [0.0] * (m.head.fc.out_features - 1)))  # always class 0: 25 %
    _, logs = m.training_loss(x, y)
    assert logs["hard_on"] == 0.0 and m.criterion.gamma == 0.0
    with torch.no_grad():  # now the classifier is right on every batch item: switch on, and stay on
        m.head.fc.weight.zero_()
        m.head.fc.bias.zero_()
    m.head.forward = lambda f: torch.nn.functional.one_hot(y, m.head.fc.out_features).float() * 10
    _, logs = m.training_loss(x, y)
    assert logs["hard_on"] == 1.0 and m.criterion.gamma == 1.0


# --------------------------------------------------------------------------------------------
# CrPCA, ITQ
# --------------------------------------------------------------------------------------------
def test_crpca_balanced_median_splits():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(203, 6, generator=g) * torch.tensor([5.0, 3, 2, 1, 1, 0.5])
    tree = RecursivePCA(6, depth=5)
    leaves = tree.fit(feats)
    bits, conf = tree(feats)
    weights = 1 << torch.arange(4, -1, -1)
    assert torch.equal((bits.long() * weights).sum(1), leaves)  # encoding reproduces the fit
    for d in range(1, 6):
        prefix = (bits[:, :d].long() * (1 << torch.arange(d - 1, -1, -1))).sum(1)
        counts = torch.bincount(prefix, minlength=1 << d)
        assert int(counts.max() - counts.min()) <= 1, (d, counts.tolist())
    assert bool(((conf >= 0) & (conf <= 1)).all())
    # root direction = first principal component of the data
    xc = feats.double() - feats.double().mean(0)
    top = torch.linalg.eigh(xc.t() @ xc).eigenvectors[:, -1]
    assert abs(float(top @ tree.directions[0])) == pytest.approx(1.0, abs=1e-6)


def test_itq_rotation_is_orthogonal_and_lowers_quantisation_error():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    r0 = itq_rotation(v, 0, seed=3)
    r = itq_rotation(v, 30, seed=3)
    assert torch.allclose(r.t() @ r, torch.eye(6, dtype=torch.float64), atol=1e-8)

    def err(rot):
        z = v @ rot
        return float((torch.where(z > 0, 1.0, -1.0).double() - z).pow(2).sum())

    assert err(r) < err(r0)


# --------------------------------------------------------------------------------------------
# every registered method through the one engine
# --------------------------------------------------------------------------------------------
IMG = 16  # small images keep the engine runs fast on a loaded 2-core machine


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()  # TrainConfig(threads=1) sets the process-wide thread count
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits_query():
    from cbir.data import load_dataset

    return load_dataset("digits", image_size=IMG).query


@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_encodes_and_round_trips(method, tmp_path, digits_query):
    from cbir.engine import TrainConfig, train
    from cbir.models.hasher import Hasher

    res = train(
        TrainConfig(
            method=method,
            dataset="digits",
            backbone="convnet",
            backbone_kwargs={"width": 8},
            epochs=1,
            max_steps_per_epoch=2,
            batch_size=32,
            out=str(tmp_path),
            progress=False,
            seed=0,
            image_size=IMG,
            threads=1,
        )
    )
    hasher = res.hasher
    assert res.history and res.history[0]["step"] == 2 and math.isfinite(res.history[0]["loss"])
    codes, conf = hasher.encode(digits_query)
    nbits = hasher.layout.nbits
    assert codes.nbits == nbits and len(codes) == len(digits_query) and conf.shape == (len(digits_query), nbits)
    assert np.all((conf >= 0) & (conf <= 1))
    loaded = Hasher.load(res.checkpoint)
    assert loaded.layout == hasher.layout and loaded.content_hash == hasher.content_hash
    codes2, conf2 = loaded.encode(digits_query)
    assert np.array_equal(codes.to_bits(), codes2.to_bits())
    np.testing.assert_allclose(conf, conf2, rtol=0, atol=1e-6)
    if method == "dmuh":
        assert loaded.layout.bit_order == "uncertainty"
        perm = loaded.method.bit_perm
        assert sorted(perm.tolist()) == list(range(nbits))
        assert torch.all(loaded.method.bit_uncertainty[perm].diff() >= 0)
    if method in ("dmuh", "regu", "hegh", "dhhe", "lsh"):
        assert nbits == 32 and hasher.layout.class_bits == 0
    if method == "itq":
        assert nbits == 16  # min(32, feature_dim) for the width-8 convnet
        r = loaded.method.rotation
        assert torch.allclose(r.t() @ r, torch.eye(16), atol=1e-5)
    if method == "crpca":
        assert nbits == 12
        from cbir.data import load_dataset

        train_codes, _ = loaded.encode(load_dataset("digits", image_size=IMG).train)
        bits = train_codes.to_bits().astype(np.int64)
        for d in (1, 2, 3):
            counts = np.bincount(bits[:, :d] @ (1 << np.arange(d - 1, -1, -1)), minlength=1 << d)
            assert counts.max() - counts.min() <= 2, (d, counts)  # median splits of the training set


@pytest.mark.parametrize("method", ["lsh", "itq"])
def test_untrained_backbone_floor_skips_training(method, tmp_path):
    from cbir.engine import TrainConfig, train

    res = train(
        TrainConfig(
            method=method,
            dataset="digits",
            backbone="convnet",
            backbone_kwargs={"width": 8},
            bits=16,
            params={"train_backbone": False},
            epochs=1,
            batch_size=32,
            out=str(tmp_path),
            progress=False,
            image_size=IMG,
            threads=1,
        )
    )
    assert res.history == [] and res.config["steps"] == 0
    assert res.hasher.layout.nbits == 16 and float(res.hasher.method.scale.min()) > 0


def test_itq_bits_above_feature_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="bits must be <="):
        create_method("itq", MethodSpec(backbone="convnet", num_classes=10, nbits=17, backbone_kwargs=(("width", 8),)))
