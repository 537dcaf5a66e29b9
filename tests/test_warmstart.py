"""Warm starts (--init-from), input normalisation, frozen-feature heads and DDTL's two-stage mode."""

import json

import numpy as np
import pytest
import torch
from _tiny import TINY

from cbir.engine import TrainConfig, train
from cbir.models.backbones import create_backbone
from cbir.models.hasher import Hasher
from cbir.models.warmstart import InputNorm, parse_input_norm, resolve_init


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ce")
    res = train(TrainConfig(method="ce", epochs=1, max_steps_per_epoch=4, out=str(out), **TINY))
    return out, res


def test_input_norm_maps_cbir_normalisation_to_the_weights_one():
    norm = InputNorm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    v = torch.tensor([0.0, 0.3, 1.0])  # raw pixel values in [0, 1], one per channel
    x_cbir = ((v - 0.5) / 0.5).view(1, 3, 1, 1)
    expect = (v - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(norm(x_cbir).view(3), expect, atol=1e-6)
    assert parse_input_norm("imagenet")[0] == (0.485, 0.456, 0.406)
    assert parse_input_norm("0.1,0.2,0.3/1,2,3") == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    assert parse_input_norm(None) is None
    with pytest.raises(ValueError, match="m1,m2,m3"):
        parse_input_norm("0.5/0.5")


def test_state_dict_file_initialises_the_backbone(tmp_path):
    torch.manual_seed(5)
    src = create_backbone("convnet", width=8)
    torch.save({"backbone." + k: v for k, v in src.state_dict().items()}, tmp_path / "w.pt")
    res = train(TrainConfig(method="ce", epochs=0, init_from=str(tmp_path / "w.pt"), out=str(tmp_path / "run"), **TINY))
    got = res.hasher.method.backbone.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k
    assert res.config["init"]["backbone_tensors_loaded"] == len(src.state_dict())
    assert res.config["init"]["class_head_loaded"] is False


def test_unrelated_state_dict_is_a_clear_error(tmp_path):
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="same --backbone"):
        train(TrainConfig(method="ce", epochs=0, init_from=str(tmp_path / "w.pt"), out=str(tmp_path / "run"), **TINY))
    with pytest.raises(ValueError, match="no such file"):
        resolve_init(str(tmp_path / "missing.pt"))


def test_torchvision_names_are_mapped_and_only_read_from_the_hub_cache(tmp_path):
    import torchvision

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(ValueError, match="never downloads"):
            resolve_init("ResNet18_Weights.IMAGENET1K_V1")
        torch.manual_seed(0)
        net = torchvision.models.resnet18(weights=None)
        url = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1").url
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(net.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
        init = resolve_init("ResNet18_Weights.IMAGENET1K_V1")
    finally:
        torch.hub.set_dir(old)
    assert init.input_norm == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    from cbir.models.registry import MethodSpec, create_method
    from cbir.models.warmstart import apply_init

    m = create_method("ce", MethodSpec(backbone="resnet18", num_classes=10, nbits=None))  # CIFAR stem: 3x3 conv
    report = apply_init(m, init)
    assert torch.equal(m.backbone.stages[0][0].conv1.weight, net.layer1[0].conv1.weight)
    assert torch.equal(m.backbone.stem[1].running_mean, net.bn1.running_mean)
    assert report["backbone_tensors_shape_mismatch"] == ["stem.0.weight (64, 3, 7, 7) vs (64, 3, 3, 3)"]


def test_input_norm_is_saved_with_the_checkpoint(tmp_path):
    res = train(TrainConfig(method="ce", epochs=0, input_norm="imagenet", out=str(tmp_path), **TINY))
    h = Hasher.load(tmp_path / "model.pt", device="cpu")
    assert isinstance(h.method.backbone.input_norm, InputNorm)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert np.array_equal(h.encode(x)[0].packed, res.hasher.encode(x)[0].packed)


def test_frozen_backbone_fits_the_head_on_cached_features(tmp_path, ce_run):
    ce_dir, ce_res = ce_run
    before = {k: v.clone() for k, v in ce_res.hasher.method.backbone.state_dict().items()}
    res = train(
        TrainConfig(
            method="ce",
            epochs=5,
            init_from=str(ce_dir),
            freeze_backbone=True,
            head_steps=30,
            feature_views=2,
            out=str(tmp_path),
            **TINY,
        )
    )
    assert res.config["steps"] == 0 and res.config["head_steps"] == 30
    assert res.config["feature_cache"] == {"views": 2, "images": 1497, "dim": 16}
    after = res.hasher.method.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(res.hasher.method.head.fc.weight, ce_res.hasher.method.head.fc.weight)
    # LSH/ITQ fit their projection on the cached eval-view features
    res = train(
        TrainConfig(
            method="itq",
            bits=8,
            epochs=0,
            init_from=str(ce_dir),
            freeze_backbone=True,
            head_steps=0,
            feature_views=1,
            out=str(tmp_path / "itq"),
            **TINY,
        )
    )
    assert res.hasher.nbits == 8 and res.config["feature_cache"]["views"] == 0  # no head steps: eval view only


def test_two_stage_ddtl_keeps_the_ce_class_bits_and_fits_the_tree(tmp_path, ce_run):
    from cbir.data import load_dataset

    ce_dir, ce_res = ce_run
    res = train(
        TrainConfig(
            method="ddtl",
            depth=6,
            epochs=0,
            init_from=str(ce_dir),
            params={"two_stage": True},
            head_steps=40,
            head_images_per_class=8,
            feature_views=2,
            out=str(tmp_path),
            **TINY,
        )
    )
    assert res.config["head_stage"] == ["tree"] and res.config["init"]["class_head_loaded"]
    x = load_dataset("digits", image_size=16).query
    ce_codes = ce_res.hasher.encode(x)[0].to_bits()
    ddtl_codes = res.hasher.encode(x)[0].to_bits()
    assert np.array_equal(ddtl_codes[:, :4], ce_codes)  # stop-gradient: the class bits are the classifier's
    hist = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    end = [r for r in hist if r.get("end_of_stage")][-1]
    assert end["stage"] == "head:tree" and 1 <= end["train_paths_per_class"] <= 64
    assert 0 <= end["train_saturation"] <= 1
    with pytest.raises(ValueError, match="drop --input-norm"):
        train(
            TrainConfig(
                method="ddtl",
                epochs=0,
                init_from=str(ce_dir),
                input_norm="imagenet",
                params={"two_stage": True},
                out=str(tmp_path / "x"),
                **TINY,
            )
        )
