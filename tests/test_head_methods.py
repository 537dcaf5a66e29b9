"""Free-bit methods on a frozen backbone (issue 10, item 4): Regu, DMUH and HEGH fit their heads
on cached features from one CE warm start, DMUH's momentum net follows its hash layer there, its
loss terms can be balanced by magnitude (§5.2), and its coding layer can be linear."""

import math

import pytest
import torch
from _tiny import TINY

from cbir.engine import TrainConfig, train
from cbir.losses import DMUHLoss
from cbir.models.methods.common import HashLayer


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ce")
    train(TrainConfig(method="ce", epochs=1, max_steps_per_epoch=6, out=str(out), **TINY))
    return out


@pytest.mark.parametrize(
    "method,params",
    [("regu", {}), ("dmuh", {}), ("dmuh", {"coding": "linear", "balance_steps": 3}), ("hegh", {"cbam_blocks": 0})],
)
def test_heads_fit_on_frozen_features(tmp_path, ce_dir, method, params):
    res = train(
        TrainConfig(
            method=method,
            bits=12,
            params=dict(params),
            epochs=1,
            init_from=str(ce_dir),
            freeze_backbone=True,
            head_steps=12,
            feature_views=1,
            out=str(tmp_path),
            **TINY,
        )
    )
    m = res.hasher.method
    assert res.config["steps"] == 0 and res.config["head_steps"] == 12
    ce = torch.load(ce_dir / "model.pt", weights_only=True)
    bb = {k[len("backbone.") :]: v for k, v in ce["state_dict"].items() if k.startswith("backbone.")}
    assert bb and all(torch.equal(m.backbone.state_dict()[k], v) for k, v in bb.items())  # backbone untouched
    heads = [r for r in res.history if str(r.get("stage", "")).startswith("head:") and "head_step" in r]
    assert heads and all(math.isfinite(r["loss"]) for r in heads)
    if method == "dmuh":
        # the momentum hash layer moved with the hash layer (after_step runs in the head stage) but lags it
        h, mh = m.hash_layer.fc.weight, m.momentum_hash.fc.weight
        assert not torch.equal(h, mh)
        assert (h - mh).abs().max() < h.abs().max()
        assert "bit_uncertainty" in heads[-1]
        if params.get("balance_steps"):
            assert heads[-1]["scale_quant"] != 1.0 or heads[-1]["scale_uncert"] != 1.0
    if method == "hegh":  # the CE warm start's classifier was copied into HEGH's class head
        assert res.config["init"]["class_head_loaded"] is True
    codes, conf = res.hasher.encode(torch.zeros(4, 3, 16, 16))
    assert codes.nbits == 12 and conf.shape == (4, 12) and (conf >= 0).all() and (conf <= 1).all()


def test_dmuh_balancing_equalises_the_term_magnitudes():
    torch.manual_seed(0)
    h = torch.tanh(torch.randn(6, 8))
    u = torch.rand(6, 8) * 0.05
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    plain = DMUHLoss(balance_steps=0)
    _, lp = plain(h, u, y)
    bal = DMUHLoss(balance_steps=2, max_scale=1e6).train()
    _, l1 = bal(h, u, y)  # calibration calls: the plain normalisation
    assert l1["quant"] == pytest.approx(lp["quant"]) and l1["scale_quant"] == 1.0
    bal(h, u, y)
    _, l3 = bal(h, u, y)  # scales fixed from the two calls: each term now equals the pair term
    assert l3["quant"] == pytest.approx(lp["pair"], rel=1e-5)
    assert l3["uncert"] == pytest.approx(lp["pair"], rel=1e-5)
    assert l3["scale_quant"] == pytest.approx(lp["pair"] / lp["quant"], rel=1e-5)
    capped = DMUHLoss(balance_steps=1, max_scale=2.0).train()
    capped(h, u, y)
    _, lc = capped(h, u, y)
    assert lc["scale_uncert"] == 2.0  # the uncertainty term is far below the pair term: clipped
    zero = DMUHLoss(balance_steps=1).train()
    zero(h, torch.zeros_like(u), y)
    _, lz = zero(h, torch.zeros_like(u), y)
    assert lz["scale_uncert"] == 1.0  # a term that was 0 keeps scale 1
    with pytest.raises(ValueError, match="balance_steps"):
        DMUHLoss(balance_steps=-1)


def test_linear_coding_layer():
    layer = HashLayer(4, 3, "linear")
    x = torch.randn(5, 4) * 100
    assert torch.equal(layer(x), layer.fc(x))
    assert HashLayer(4, 3)(x).abs().max() <= 1
    with pytest.raises(ValueError, match="tanh"):
        HashLayer(4, 3, "relu")


def test_hegh_classifier_on_the_codes():
    from cbir.models.registry import MethodSpec, create_method, resolve_params

    spec = MethodSpec(backbone="convnet", num_classes=3, nbits=6, backbone_kwargs=(("width", 8),))
    m = create_method("hegh", spec, resolve_params("hegh", {"classifier_on": "codes", "cbam_blocks": "0"}))
    assert m.head.fc.in_features == 6
    loss, _ = m.training_loss(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert m.hash_layer.fc.weight.grad is not None and m.head.fc.weight.grad is not None
    with pytest.raises(ValueError, match="classifier_on"):
        resolve_params("hegh", {"classifier_on": "pixels"})
