"""BiT: pre-activation ResNetV2 with GroupNorm and weight-standardised convolutions.

Kolesnikov et al. 2020, `Big Transfer (BiT): General Visual Representation Learning`,
https://arxiv.org/abs/1912.11370. The network is timm's ``ResNetV2`` built the way timm builds its
``resnetv2_*_bit`` models (``StdConv2d``, ``GroupNormAct``); this module only adds a CIFAR stem,
GroupNorm group counts that also fit narrow widths, a loader for the official ``.npz`` checkpoints that
tolerates the CIFAR stem and a different head (and zero-initialises the head for fine-tuning, as BiT does), a
writer of that format, and the weight-standardisation eps as a hyperparameter.

Weight standardisation divides each filter by sqrt(var + eps). The official code (google-research/
big_transfer, ``bit_pytorch/models.py`` ``StdConv2d``) uses eps = 1e-10; timm's BiT models use 1e-8 (its
``StdConv2d`` defaults to 1e-6). ``ws_eps`` defaults to the official 1e-10, so a model loaded from the
official weights computes what the official code computes; ``ws_eps=1e-8`` reproduces timm's models.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from timm.layers import GroupNormAct, StdConv2d
from timm.models.resnetv2 import ResNetV2

from zoo._registry import register_model
from zoo.layers import check_positive_int, check_unit_interval

__all__ = ["bit_resnetv2", "bit_num_groups", "load_bit_weights", "save_bit_weights"]

STEMS = ("cifar", "imagenet")
BIT_GROUPS = 32
WS_EPS = 1e-10  # the official BiT code's weight-standardisation eps (timm's BiT models: 1e-8)


def bit_num_groups(num_channels: int, max_groups: int = BIT_GROUPS) -> int:
    """GroupNorm groups: BiT's 32 where it divides the channels, else the largest divisor <= 32."""
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


def _bit_group_norm_act(num_channels: int, **kwargs: Any) -> GroupNormAct:
    # A plain function (not a partial) so timm's get_norm_act_layer uses it as-is and the group
    # count can depend on the channels of each layer.
    return GroupNormAct(num_channels, num_groups=bit_num_groups(num_channels), **kwargs)


def bit_resnetv2(
    layers: Sequence[int],
    *,
    num_classes: int = 10,
    stem: str = "cifar",
    width_factor: int = 1,
    base_width: int = 64,
    drop_rate: float = 0.0,
    ws_eps: float = WS_EPS,
) -> ResNetV2:
    """BiT ResNetV2 with ``layers`` bottlenecks per stage.

    Stem width is ``base_width * width_factor`` and stage ``i`` outputs ``4 * 2**i`` times that
    (BiT: 64 and 256/512/1024/2048 at width 1); a smaller ``base_width`` gives narrow test nets.
    ``stem="cifar"`` is a 3x3 stride-1 conv without max-pool (32x32 input keeps full resolution);
    ``stem="imagenet"`` is BiT's 7x7/2 conv with the padded 3x3/2 max-pool. Every conv standardises its
    weights as (w - mean) / sqrt(var + ``ws_eps``).
    """
    if len(layers) != 4:
        raise ValueError(f"BiT has 4 stages, got layers={tuple(layers)!r}")
    for i, depth in enumerate(layers):
        check_positive_int(f"layers[{i}]", depth)
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    check_positive_int("width_factor", width_factor)
    check_positive_int("base_width", base_width)
    stem_chs = base_width * width_factor
    if stem_chs % 8:
        # timm rounds every channel count to a multiple of 8, which would silently change the widths.
        raise ValueError(f"base_width * width_factor must be a multiple of 8, got {stem_chs}")
    check_unit_interval("drop_rate", drop_rate, zero_ok=True, one_ok=False)
    check_unit_interval("ws_eps", ws_eps, zero_ok=False, one_ok=False)
    conv_layer = partial(StdConv2d, eps=ws_eps)

    model = ResNetV2(
        layers=list(layers),
        channels=tuple(4 * base_width * 2 ** i for i in range(4)),
        num_classes=num_classes,
        width_factor=width_factor,
        stem_chs=base_width,
        stem_type="fixed",  # BiT's ConstantPad2d(1) + MaxPool2d(3, 2) after the 7x7/2 conv
        conv_layer=conv_layer,
        norm_layer=_bit_group_norm_act,
        drop_rate=drop_rate,
    )
    if stem == "cifar":
        # Named `conv` like timm's stem so checkpoint loading and the first-conv name stay the same.
        model.stem = nn.Sequential(OrderedDict(conv=conv_layer(3, stem_chs, kernel_size=3, stride=1)))
        nn.init.kaiming_normal_(model.stem.conv.weight, mode="fan_out", nonlinearity="relu")  # as timm's init
        # Without the stride-2 conv and the max-pool every feature map is 4x larger (stem: 2x).
        model.feature_info = [{**f, "reduction": max(f["reduction"] // 4, 1)} for f in model.feature_info]
    return model


@register_model
def bit_r50x1(
    *,
    num_classes: int = 10,
    stem: str = "cifar",
    width_factor: int = 1,
    base_width: int = 64,
    drop_rate: float = 0.0,
    ws_eps: float = WS_EPS,
) -> ResNetV2:
    """BiT-R50x1: ResNetV2-50, stages (3, 4, 6, 3)."""
    return bit_resnetv2(
        (3, 4, 6, 3),
        num_classes=num_classes,
        stem=stem,
        width_factor=width_factor,
        base_width=base_width,
        drop_rate=drop_rate,
        ws_eps=ws_eps,
    )


@register_model
def bit_r101x1(
    *,
    num_classes: int = 10,
    stem: str = "cifar",
    width_factor: int = 1,
    base_width: int = 64,
    drop_rate: float = 0.0,
    ws_eps: float = WS_EPS,
) -> ResNetV2:
    """BiT-R101x1: ResNetV2-101, stages (3, 4, 23, 3)."""
    return bit_resnetv2(
        (3, 4, 23, 3),
        num_classes=num_classes,
        stem=stem,
        width_factor=width_factor,
        base_width=base_width,
        drop_rate=drop_rate,
        ws_eps=ws_eps,
    )


@register_model
def bit_r50x3(
    *,
    num_classes: int = 10,
    stem: str = "cifar",
    width_factor: int = 3,
    base_width: int = 64,
    drop_rate: float = 0.0,
    ws_eps: float = WS_EPS,
) -> ResNetV2:
    """BiT-R50x3: ResNetV2-50 at 3x width."""
    return bit_resnetv2(
        (3, 4, 6, 3),
        num_classes=num_classes,
        stem=stem,
        width_factor=width_factor,
        base_width=base_width,
        drop_rate=drop_rate,
        ws_eps=ws_eps,
    )


@register_model
def bit_r152x2(
    *,
    num_classes: int = 10,
    stem: str = "cifar",
    width_factor: int = 2,
    base_width: int = 64,
    drop_rate: float = 0.0,
    ws_eps: float = WS_EPS,
) -> ResNetV2:
    """BiT-R152x2: ResNetV2-152 (3, 8, 36, 3) at 2x width."""
    return bit_resnetv2(
        (3, 8, 36, 3),
        num_classes=num_classes,
        stem=stem,
        width_factor=width_factor,
        base_width=base_width,
        drop_rate=drop_rate,
        ws_eps=ws_eps,
    )


def _bit_key_map(model: ResNetV2, prefix: str = "resnet/") -> dict[str, tuple[str, torch.Tensor]]:
    """Official checkpoint key -> (parameter name, parameter); mirrors timm.models.resnetv2._load_weights."""
    params = dict(model.named_parameters())
    keys = {f"{prefix}root_block/standardized_conv2d/kernel": "stem.conv.weight"}
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            unit, name = f"{prefix}block{i + 1}/unit{j + 1:02d}/", f"stages.{i}.blocks.{j}."
            for n, abc in enumerate("abc", start=1):
                keys[f"{unit}{abc}/standardized_conv2d/kernel"] = f"{name}conv{n}.weight"
                keys[f"{unit}{abc}/group_norm/gamma"] = f"{name}norm{n}.weight"
                keys[f"{unit}{abc}/group_norm/beta"] = f"{name}norm{n}.bias"
            if block.downsample is not None:
                keys[f"{unit}a/proj/standardized_conv2d/kernel"] = f"{name}downsample.conv.weight"
    keys[f"{prefix}group_norm/gamma"] = "norm.weight"
    keys[f"{prefix}group_norm/beta"] = "norm.bias"
    if "head.fc.weight" in params:  # absent after timm's reset_classifier(0)
        keys[f"{prefix}head/conv2d/kernel"] = "head.fc.weight"
        keys[f"{prefix}head/conv2d/bias"] = "head.fc.bias"
    return {k: (name, params[name]) for k, name in keys.items()}


def _may_skip(name: str, checkpoint_shape: torch.Size, model_shape: torch.Size) -> bool:
    """The only tolerated mismatches: a head for another class count, a 7x7 vs 3x3 stem kernel."""
    if name.startswith("head."):
        return checkpoint_shape[1:] == model_shape[1:]
    if name == "stem.conv.weight":
        return checkpoint_shape[:2] == model_shape[:2]
    return False


@torch.no_grad()
def load_bit_weights(model: ResNetV2, path: str | PathLike, zero_head: bool = False) -> dict[str, list]:
    """Copy an official BiT ``.npz`` checkpoint (e.g. ``BiT-M-R50x1.npz``) into a ``bit_*`` model.

    Kernels are stored HWIO and transposed to OIHW. Two mismatches are skipped, the model keeping
    its own initialisation: the head when only its class count differs, and the stem conv when only
    its kernel size differs (3x3 CIFAR vs 7x7 ImageNet stem). ``zero_head``: the head is never loaded
    but set to zero, as the official fine-tuning does (``bit_pytorch/models.py``, ``zero_head=True``).
    Returns ``{"loaded": [param names],
    "skipped": [(param name, reason)]}``. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for a file that is not an ``.npz`` archive, lacks a key the model needs, or has
    any other shape mismatch (another width); the model is left untouched when it raises.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BiT checkpoint not found: {path}")
    key_map = _bit_key_map(model)
    try:
        weights = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz checkpoint: {e}") from e
    if not isinstance(weights, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, expected an official BiT .npz checkpoint")
    with weights:
        missing = [k for k in key_map if k not in weights.files]
        if missing:
            raise ValueError(
                f"{path} does not match this model: missing key {missing[0]!r} "
                f"({len(missing)} of {len(key_map)} missing; is it a BiT checkpoint of the same depth?)"
            )
        unused = [k for k in weights.files if k not in key_map]
        if unused:  # e.g. the extra units of a deeper network
            raise ValueError(
                f"{path} does not match this model: key {unused[0]!r} has no place in it "
                f"({len(unused)} unused; is it a BiT checkpoint of the same depth?)"
            )
        values = {key: torch.from_numpy(weights[key]) for key in key_map}
    values = {k: v.permute(3, 2, 0, 1) if v.ndim == 4 else v for k, v in values.items()}  # HWIO -> OIHW
    # Check every tensor before copying any, so a rejected checkpoint leaves the model as it was.
    mismatched = [
        (key, name, values[key].shape, param.shape)
        for key, (name, param) in key_map.items()
        if values[key].shape != param.shape
    ]
    rejected = [m for m in mismatched if not _may_skip(m[1], m[2], m[3])]
    if rejected:
        key, name, ckpt_shape, model_shape = rejected[0]
        raise ValueError(
            f"{path} does not match this model: checkpoint {key} has shape {tuple(ckpt_shape)}, model "
            f"{name} has {tuple(model_shape)} ({len(rejected)} tensors differ; only the head's class count "
            f"and the stem kernel size may; is it a BiT checkpoint of the same width?)"
        )
    report: dict[str, list] = {
        "loaded": [],
        "skipped": [
            (name, f"checkpoint {key} has shape {tuple(ckpt_shape)}, model has {tuple(model_shape)}")
            for key, name, ckpt_shape, model_shape in mismatched
        ],
    }
    skipped = {m[0] for m in mismatched}
    if zero_head:
        heads = [k for k, (name, _) in key_map.items() if name.startswith("head.") and k not in skipped]
        report["skipped"] += [(key_map[k][0], "zero_head: the head starts at zero for fine-tuning") for k in heads]
        skipped |= set(heads)
        for name, param in model.named_parameters():
            if name.startswith("head."):
                param.zero_()
    for key, (name, param) in key_map.items():
        if key not in skipped:
            param.copy_(values[key])
            report["loaded"].append(name)
    return report


@torch.no_grad()
def save_bit_weights(model: ResNetV2, path: str | PathLike) -> Path:
    """Write a ``bit_*`` model in the official ``.npz`` layout (kernels HWIO), which ``load_bit_weights`` and
    the official code read; returns the path (``np.savez`` adds ``.npz`` when it is missing)."""
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    arrays = {}
    for key, (_, param) in _bit_key_map(model).items():
        value = param.detach().cpu().numpy()
        arrays[key] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
    np.savez(path, **arrays)
    return path
