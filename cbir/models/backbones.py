"""Backbone registry: feature extractors created by name, randomly initialised.

No pretrained weights are ever downloaded. Every backbone exposes the same structure so that
heads and attention modules (HEGH's CBAM) can be attached without copying architectures:

* ``input_norm`` (identity unless the weights expect another normalisation) -> ``stem`` -> ``stages[0]`` -> ``post_stage[0]`` -> ``stages[1]`` -> ``post_stage[1]`` ... ->
  global average pool -> flatten, giving a ``feature_dim`` vector;
* ``stage_channels[i]`` is the channel count after stage ``i``; ``post_stage[i]`` is an
  ``nn.Identity`` unless a method replaces it (e.g. ``backbone.post_stage[1] = CBAM(...)``).

Names: ``resnet20`` (He et al. 2016's CIFAR ResNet-20, 0.27 M parameters, the default: it
trains at a useful speed on two CPU cores), ``resnet18`` / ``resnet34`` (torchvision, with the
``cifar_stem`` option replacing the 7x7/stride-2 stem and max-pool by a 3x3/stride-1 conv for
32x32 inputs) and ``convnet`` (a 4-layer plain CNN for very fast tests).

A factory names its keyword arguments (no ``**kwargs``): :func:`create_backbone` refuses any
other with a ``ValueError`` that names the argument, the backbone and what it accepts
(:func:`backbone_arguments`), so ``--width`` for ``resnet18`` is an error, not silently ignored.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = [
    "Backbone",
    "register_backbone",
    "create_backbone",
    "list_backbones",
    "backbone_arguments",
    "check_backbone_arguments",
]

_BACKBONES: dict[str, Callable[..., "Backbone"]] = {}


def register_backbone(name: str):
    def deco(fn):
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} registered twice")
        _BACKBONES[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def create_backbone(name: str, **kwargs) -> "Backbone":
    """``input_mean`` / ``input_std`` (3 floats each) add a :class:`cbir.models.warmstart.InputNorm`
    in front of the stem (weights trained with another normalisation, e.g. ImageNet's)."""
    check_backbone_arguments(name, kwargs)
    mean, std = kwargs.pop("input_mean", None), kwargs.pop("input_std", None)
    bb = _BACKBONES[name](**kwargs)
    if (mean is None) != (std is None):
        raise ValueError("give both input_mean and input_std (or neither)")
    if mean is not None:
        from cbir.models.warmstart import InputNorm

        bb.input_norm = InputNorm(mean, std)
    return bb


def check_backbone_arguments(name: str, kwargs) -> None:
    """``ValueError`` for an unknown backbone or a keyword argument its factory does not take
    (naming the argument, the backbone, what it accepts and which backbones take it)."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list_backbones()}")
    accepted = backbone_arguments(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        flags = ", ".join(f"--{u.replace('_', '-')}" for u in unknown)
        raise ValueError(
            f"backbone {name!r} takes no argument {', '.join(map(repr, unknown))}; it accepts "
            f"{', '.join(accepted)}. Drop the argument (on the command line: {flags}) or choose a backbone "
            f"that takes it ({_who_takes(unknown)})"
        )


#: keyword arguments :func:`create_backbone` handles itself, for every backbone
COMMON_ARGUMENTS = ("input_mean", "input_std")


def backbone_arguments(name: str) -> tuple[str, ...]:
    """The keyword arguments ``create_backbone(name, ...)`` accepts: the factory's own, then
    :data:`COMMON_ARGUMENTS`."""
    import inspect

    params = inspect.signature(_BACKBONES[name]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        raise TypeError(f"backbone factory {name!r} takes **kwargs: name its arguments so unknown ones can be refused")
    own = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return own + COMMON_ARGUMENTS


def _who_takes(args: list[str]) -> str:
    takers = [n for n in list_backbones() if set(args) <= set(backbone_arguments(n))]
    return ", ".join(takers) if takers else "none does"


class Backbone(nn.Module):
    """stem -> stages (each followed by a replaceable post_stage module) -> pooled features."""

    def __init__(self, stem: nn.Module, stages: list[nn.Module], stage_channels: list[int]):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.post_stage = nn.ModuleList([nn.Identity() for _ in stages])
        self.input_norm: nn.Module = nn.Identity()  # see cbir.models.warmstart.InputNorm
        self.stage_channels = list(stage_channels)
        self.feature_dim = stage_channels[-1]
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.input_norm(x))
        for stage, post in zip(self.stages, self.post_stage):
            x = post(stage(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.forward_maps(x)), 1)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


def _cifar_resnet(blocks_per_stage: int, widths=(16, 32, 64), in_channels: int = 3) -> Backbone:
    stem = nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
    )
    stages, cin = [], widths[0]
    for i, w in enumerate(widths):
        layers = []
        for b in range(blocks_per_stage):
            layers.append(_BasicBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
            cin = w
        stages.append(nn.Sequential(*layers))
    bb = Backbone(stem, stages, list(widths))
    for m in bb.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return bb


@register_backbone("resnet20")
def resnet20(width: int = 16) -> Backbone:
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2): 3 stages x 3 basic blocks, widths w, 2w, 4w."""
    return _cifar_resnet(3, (width, 2 * width, 4 * width))


@register_backbone("convnet")
def convnet(width: int = 32) -> Backbone:
    """Plain 4-conv CNN (two stages): fast enough for unit tests on any CPU."""

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    stem = nn.Identity()
    return Backbone(stem, [block(3, width), block(width, 2 * width)], [width, 2 * width])


def _torchvision_resnet(name: str, cifar_stem: bool) -> Backbone:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), net.bn1, net.relu)
    else:
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    return Backbone(stem, stages, [64, 128, 256, 512])


@register_backbone("resnet18")
def resnet18(cifar_stem: bool = True) -> Backbone:
    """torchvision ResNet-18, random init; ``cifar_stem`` for 32x32 inputs."""
    return _torchvision_resnet("resnet18", cifar_stem)


@register_backbone("resnet34")
def resnet34(cifar_stem: bool = True) -> Backbone:
    """torchvision ResNet-34, random init; ``cifar_stem`` for 32x32 inputs."""
    return _torchvision_resnet("resnet34", cifar_stem)
