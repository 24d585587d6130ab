"""Building blocks shared by several families.

Conv-BN-ReLU is torchvision's ``Conv2dNormActivation`` (bias-free conv, BN, ReLU); BiT's weight
standardisation and GroupNorm come from timm (``StdConv2d``, ``GroupNormAct``) in ``bit.py``.
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn
from torchvision.ops import Conv2dNormActivation

ConvBNReLU = partial(Conv2dNormActivation, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU)


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Hyperparameter guard used by every family: a clear ValueError instead of a shape error later."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """A flag must be a real bool: a truthiness test would silently read "no" or 2 as True."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_unit_interval(name: str, value: object, *, zero_ok: bool, one_ok: bool) -> float:
    """A number in the unit interval (rates, fractions); ``zero_ok``/``one_ok`` close its ends."""
    in_range = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        (0 <= value if zero_ok else 0 < value) and (value <= 1 if one_ok else value < 1)
    )
    if not in_range:
        interval = f"{'[' if zero_ok else '('}0, 1{']' if one_ok else ')'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def init_kaiming(model: nn.Module) -> None:
    """He-normal fan-out conv init, BN weight 1 / bias 0, zero linear bias (He et al. 2015/2016)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
