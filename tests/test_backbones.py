"""Backbone factories: every registered backbone refuses keyword arguments it does not take."""

from __future__ import annotations

import re

import pytest
import torch

from cbir.models.backbones import COMMON_ARGUMENTS, backbone_arguments, create_backbone, list_backbones


@pytest.mark.parametrize("name", list_backbones())
def test_unknown_argument_is_refused_naming_it_the_backbone_and_what_it_accepts(name):
    accepted = backbone_arguments(name)
    assert set(COMMON_ARGUMENTS) <= set(accepted) and len(accepted) > len(COMMON_ARGUMENTS)
    with pytest.raises(ValueError) as e:
        create_backbone(name, not_an_argument=3)
    msg = str(e.value)
    assert f"backbone {name!r} takes no argument 'not_an_argument'" in msg
    assert f"it accepts {', '.join(accepted)}." in msg and "--not-an-argument" in msg


@pytest.mark.parametrize("name", list_backbones())
def test_every_accepted_argument_is_taken(name):
    # the factory's own arguments at their defaults, and the input normalisation
    import inspect

    from cbir.models.backbones import _BACKBONES

    own = {p.name: p.default for p in inspect.signature(_BACKBONES[name]).parameters.values()}
    assert set(own) | set(COMMON_ARGUMENTS) == set(backbone_arguments(name))
    bb = create_backbone(name, **own, input_mean=(0.5, 0.5, 0.5), input_std=(0.25, 0.25, 0.25))
    assert bb(torch.zeros(1, 3, 16, 16)).shape == (1, bb.feature_dim)


def test_width_for_resnet18_is_an_error_not_ignored():
    with pytest.raises(ValueError, match=re.escape("backbone 'resnet18' takes no argument 'width'")) as e:
        create_backbone("resnet18", width=32)
    # it says which backbones do take --width
    assert "--width" in str(e.value) and "convnet, resnet20" in str(e.value)
    assert create_backbone("convnet", width=8).feature_dim == 16
    assert create_backbone("resnet20", width=4).feature_dim == 16


def test_unknown_width_through_the_method_spec_fails_at_creation():
    from cbir.models.registry import MethodSpec, create_method

    with pytest.raises(ValueError, match="backbone 'resnet34' takes no argument 'width'"):
        create_method("ddtl", MethodSpec("resnet34", 10, None, depth=4, backbone_kwargs=(("width", 8),)))


def test_cbir_train_refuses_width_for_resnet18_before_loading_data(tmp_path, capsys):
    from cbir.cli import main

    rc = main(
        ["train", "--backbone", "resnet18", "--width", "32", "--dataset", "no-such-dataset", "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert rc == 2
    # the backbone error, not the unknown dataset: it is found before any data is read
    assert "cbir train: error: backbone 'resnet18' takes no argument 'width'" in err and "--width" in err


def test_a_checkpoint_with_an_argument_its_backbone_ignored_still_loads(tmp_path, caplog):
    """Checkpoints written before the factories refused unknown arguments (``width`` for
    resnet18 was silently ignored then) load with a warning, content hash unchanged."""
    import torch

    from cbir.models.hasher import Hasher
    from cbir.models.registry import MethodSpec, create_method, resolve_params

    spec = MethodSpec(backbone="convnet", num_classes=3, nbits=6, backbone_kwargs=(("width", 8),))
    params = resolve_params("regu", None)
    h = Hasher(create_method("regu", spec, params), "regu", spec, params, image_size=16, device="cpu")
    payload = h.payload()
    payload["spec"]["backbone_kwargs"] = [["width", 8], ["depth_of_field", 3]]  # as an old release wrote it
    from cbir.models import hasher as hasher_mod

    payload["content_hash"] = hasher_mod._content_hash(
        {**{k: v for k, v in payload.items() if k not in ("state_dict", "content_hash", "config")}},
        payload["state_dict"],
    )
    torch.save(payload, tmp_path / "old.pt")
    loaded = Hasher.load(tmp_path / "old.pt", device="cpu")
    assert "depth_of_field" in caplog.text
    assert loaded.content_hash == payload["content_hash"]
    x = torch.zeros(2, 3, 16, 16)
    assert (loaded.encode(x)[0].packed == h.encode(x)[0].packed).all()
