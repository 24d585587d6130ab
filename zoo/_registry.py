"""Name -> constructor registry, in the style of timm's ``register_model``."""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from typing import Any, Callable

import torch.nn as nn

from zoo.layers import check_positive_int

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}

TIMM_PREFIX = "timm:"


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant function under its own name; its module name is its family."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
    _MODELS[name] = fn
    _FAMILY[name] = fn.__module__.rsplit(".", 1)[-1]
    return fn


def list_models() -> list[str]:
    """Every registered variant name, sorted. ``timm:<name>`` models are accepted too but not listed."""
    return sorted(_MODELS)


def model_family(name: str) -> str:
    """The family (``resnet``, ``densenet``, ...) of a registered name or ``timm`` for ``timm:`` names."""
    if name.startswith(TIMM_PREFIX):
        return "timm"
    _check_name(name)
    return _FAMILY[name]


def model_defaults(name: str) -> dict[str, Any]:
    """The variant's hyperparameters with their default values (``num_classes`` excluded)."""
    _check_name(name)
    sig = inspect.signature(_MODELS[name])
    return {k: p.default for k, p in sig.parameters.items() if k != "num_classes"}


def _closest(name: str, candidates: Iterable[str]) -> list[str]:
    # cutoff 0: a name that resembles nothing still gets its three nearest, never an empty hint.
    return difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.0)


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(
            f"unknown model {name!r}. Did you mean {', '.join(_closest(name, _MODELS))}? "
            f"List all with `python -m zoo` or zoo.list_models(); any timm model works as 'timm:<name>'."
        )


def create_model(name: str, num_classes: int = 10, **hparams: Any) -> nn.Module:
    """Build a registered variant (or ``timm:<name>``) for ``num_classes`` outputs.

    Raises ``ValueError`` for unknown names, unknown hyperparameters and values that break
    an architecture's rules (each variant states its rule in the message).
    """
    check_positive_int("num_classes", num_classes)
    if name.startswith(TIMM_PREFIX):
        import timm

        timm_name = name[len(TIMM_PREFIX):]
        if not timm.is_model(timm_name):
            close = ", ".join(TIMM_PREFIX + c for c in _closest(timm_name, timm.list_models()))
            raise ValueError(
                f"unknown timm model {timm_name!r}. Did you mean {close}? List them with timm.list_models()."
            )
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **hparams)
    _check_name(name)
    fn = _MODELS[name]
    accepted = model_defaults(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"{name} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
    return fn(num_classes=num_classes, **hparams)
