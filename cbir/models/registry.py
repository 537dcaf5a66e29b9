"""Method registry: ``register_method`` / ``create_method`` / ``list_methods`` (timm-style).

Each method registers a factory and a typed dataclass of its hyper-parameters::

    @register_method("ddtl", params=DDTLParams, description="...")
    def ddtl(spec: MethodSpec, params: DDTLParams) -> HashingMethod: ...

``create_method`` validates user-supplied hyper-parameters against that dataclass (unknown
names and wrong types are a ``ValueError`` listing the valid ones), so the CLI's
``--param name=value`` and config files are checked in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from cbir.models.base import HashingMethod

__all__ = [
    "MethodSpec",
    "register_method",
    "create_method",
    "list_methods",
    "method_params_class",
    "resolve_params",
    "method_description",
]


@dataclass(frozen=True)
class MethodSpec:
    """What every factory receives besides its own hyper-parameters."""

    backbone: str
    num_classes: int
    nbits: int | None
    multilabel: bool = False
    class_names: tuple[str, ...] = ()
    depth: int | None = None
    backbone_kwargs: tuple[tuple[str, Any], ...] = ()

    def make_backbone(self):
        from cbir.models.backbones import create_backbone

        return create_backbone(self.backbone, **dict(self.backbone_kwargs))


@dataclass(frozen=True)
class _Entry:
    factory: Callable[[MethodSpec, Any], HashingMethod]
    params: type
    description: str


_METHODS: dict[str, _Entry] = {}


@dataclass
class NoParams:
    """This method has no hyper-parameters of its own."""


def register_method(name: str, params: type = NoParams, description: str = ""):
    if not dataclasses.is_dataclass(params):
        raise TypeError("params must be a dataclass type")

    def deco(fn):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        _METHODS[name] = _Entry(fn, params, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def _ensure_loaded() -> None:
    # Importing the package registers the built-in methods.
    import cbir.models.methods  # noqa: F401


def list_methods() -> list[str]:
    _ensure_loaded()
    return sorted(_METHODS)


def _entry(name: str) -> _Entry:
    _ensure_loaded()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_METHODS)}")
    return _METHODS[name]


def method_params_class(name: str) -> type:
    return _entry(name).params


def method_description(name: str) -> str:
    return _entry(name).description


def _coerce(value: Any, typ: Any, name: str) -> Any:
    if isinstance(typ, str):  # postponed annotations
        typ = {"float": float, "int": int, "bool": bool, "str": str}.get(typ, typ)
    if typ is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"parameter {name}: expected a boolean, got {value!r}")
        return bool(value)
    if typ in (int, float, str):
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"parameter {name}: expected {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"parameter {name}: expected an integer, got {value!r}")
        return out
    return value


def resolve_params(name: str, params: dict | Any | None = None):
    """Turn a dict (e.g. from ``--param k=v``) into the method's params dataclass, validated."""
    cls = method_params_class(name)
    if params is None:
        params = {}
    if isinstance(params, cls):
        return params
    if not isinstance(params, dict):
        raise ValueError(f"params for {name!r} must be a dict or {cls.__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for method {name!r}; valid: {sorted(fields) or 'none'}")
    kwargs = {k: _coerce(v, fields[k].type, k) for k, v in params.items()}
    return cls(**kwargs)


def create_method(name: str, spec: MethodSpec, params: dict | Any | None = None) -> HashingMethod:
    entry = _entry(name)
    method = entry.factory(spec, resolve_params(name, params))
    method.method_name = name
    return method
