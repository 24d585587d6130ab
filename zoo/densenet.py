"""DenseNet (Huang et al. 2017) for 32x32 inputs.

One implementation serves every variant:

* ``densenet``: the paper's plain CIFAR DenseNet: a 3x3 conv to 16 channels, three dense blocks of
  (L - 4) / 3 BN-ReLU-Conv(3x3) layers, transitions without compression.
* ``densenet_bc``: DenseNet-BC: a 3x3 conv to 2k channels, three blocks of (L - 4) / 6 bottleneck layers
  BN-ReLU-Conv(1x1, bn_size*k)-BN-ReLU-Conv(3x3, k), transitions compressing m channels to floor(θ·m).
* ``densenet121/169/201/161/264``: the ImageNet block configurations (Huang et al. 2017, Table 1; 264 is
  6-12-64-48 with k = 32) with the CIFAR stem of weiaicunzai/pytorch-cifar100 (3x3 conv to 2k channels, no
  max-pool), bottleneck layers, θ = 0.5.

Every transition is BN-ReLU-Conv(1x1)-AvgPool(2x2) (the paper's, kuangliu's and bearpaw's form;
weiaicunzai/pytorch-cifar100's has no ReLU) and the head is BN-ReLU-global average pool-Linear.
With ``drop_rate`` > 0 every variant applies dropout after every convolution except the stem's, as the paper
(Sec. 4.2) and the authors' Torch code (``models/densenet.lua``, ``models/DenseConnectLayer.lua``) do: after
the 1x1 bottleneck conv and the 3x3 conv of each dense layer and after each transition's 1x1 conv. The
authors build their ImageNet configurations with the same layer functions, so densenet121-264 follow it too
(torchvision's DenseNet, by contrast, drops out only after the 3x3 conv).

Written here rather than on torchvision's ``_DenseLayer``, which has no non-bottleneck form and whose
checkpointing updates BatchNorm running statistics a second time when it recomputes.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zoo._registry import register_model
from zoo.layers import check_bool, check_positive_int, check_unit_interval, init_kaiming


def _dropout(p: float) -> nn.Module:
    """Dropout after a conv; an Identity at p = 0, so the default network has no Dropout module at all."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class DenseLayer(nn.Module):
    """Produces ``growth_rate`` new feature maps from the concatenation of all earlier ones.

    ``bn_size=None`` gives the plain layer BN-ReLU-Conv(3x3); an integer gives the bottleneck layer
    BN-ReLU-Conv(1x1, bn_size*k)-BN-ReLU-Conv(3x3, k). Dropout follows each of its convs (``drop1``,
    ``drop2``), as in the paper.

    With ``memory_efficient`` the concatenation and the first BN-ReLU-Conv are recomputed in the backward
    pass (Pleiss et al. 2017) instead of storing the concatenated tensor, which is what makes DenseNet
    memory grow quadratically with depth.
    """

    def __init__(
        self, in_chs: int, growth_rate: int, bn_size: int | None, drop_rate: float, memory_efficient: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        # The plain layer's only conv is its 3x3 to k channels; the bottleneck layer starts with a 1x1.
        mid_chs, kernel = (growth_rate, 3) if bn_size is None else (bn_size * growth_rate, 1)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, kernel_size=kernel, padding=kernel // 2, bias=False)
        self.drop1 = _dropout(drop_rate)
        if bn_size is None:
            self.norm2 = self.act2 = self.conv2 = self.drop2 = None
        else:
            self.norm2 = nn.BatchNorm2d(mid_chs)
            self.act2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(mid_chs, growth_rate, kernel_size=3, padding=1, bias=False)
            self.drop2 = _dropout(drop_rate)
        self.memory_efficient = memory_efficient
        self._recomputing = False

    def _first_conv(self, *features: torch.Tensor) -> torch.Tensor:
        x = torch.cat(features, 1)
        norm = self.norm1
        if self._recomputing and norm.training:
            # The forward pass already updated the running statistics; momentum 0 normalises with the same
            # batch statistics but leaves them (and num_batches_tracked) as they are. Passing the buffers
            # keeps the saved tensors identical to the forward pass, which non-reentrant checkpoint checks.
            x = F.batch_norm(
                x, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                training=True, momentum=0.0, eps=norm.eps,
            )
        else:
            x = norm(x)
        return self.conv1(self.act1(x))

    @contextlib.contextmanager
    def _recompute_context(self) -> Iterator[None]:
        self._recomputing = True
        try:
            yield
        finally:
            self._recomputing = False

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.memory_efficient and torch.is_grad_enabled() and any(f.requires_grad for f in features):
            # Non-reentrant checkpoint keeps the RNG state by default; dropout (drop1 included) lies outside
            # the recomputed segment anyway, so forward and recomputation see identical values.
            out = checkpoint(
                self._first_conv,
                *features,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), self._recompute_context()),
            )
        else:
            out = self._first_conv(*features)
        out = self.drop1(out)
        if self.conv2 is not None:
            out = self.drop2(self.conv2(self.act2(self.norm2(out))))
        return out


class DenseBlock(nn.ModuleDict):
    def __init__(
        self,
        num_layers: int,
        in_chs: int,
        growth_rate: int,
        bn_size: int | None,
        drop_rate: float,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(
                in_chs + i * growth_rate, growth_rate, bn_size, drop_rate, memory_efficient
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv(1x1)-[Dropout]-AvgPool(2x2) between dense blocks; ``out_chs`` = floor(θ·m)."""

    def __init__(self, in_chs: int, out_chs: int, drop_rate: float = 0.0) -> None:
        super().__init__(
            OrderedDict(
                norm=nn.BatchNorm2d(in_chs),
                act=nn.ReLU(inplace=True),
                conv=nn.Conv2d(in_chs, out_chs, kernel_size=1, bias=False),
                drop=_dropout(drop_rate),
                pool=nn.AvgPool2d(kernel_size=2, stride=2),
            )
        )


class DenseNet(nn.Module):
    """General DenseNet: ``block_config`` layers per dense block, a transition between consecutive blocks.

    Args:
        block_config: number of dense layers in each block.
        growth_rate: k, feature maps added by each layer.
        num_init_features: output channels of the 3x3 stem conv.
        bn_size: bottleneck width factor (1x1 conv to bn_size*k channels), or ``None`` for plain layers.
        compression: θ in (0, 1]; a transition after a block of m channels outputs floor(θ·m).
        drop_rate: dropout probability after every conv except the stem's (dense layers and transitions).
        num_classes: classifier outputs.
        memory_efficient: recompute concatenation and first conv in backward (checkpointing).
    """

    def __init__(
        self,
        block_config: tuple[int, ...],
        growth_rate: int,
        num_init_features: int,
        bn_size: int | None,
        compression: float,
        drop_rate: float = 0.0,
        num_classes: int = 10,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("growth_rate", growth_rate)
        if bn_size is not None:
            check_positive_int("bn_size", bn_size)
        check_unit_interval("compression θ", compression, zero_ok=False, one_ok=True)
        check_unit_interval("drop_rate", drop_rate, zero_ok=True, one_ok=False)
        check_bool("memory_efficient", memory_efficient)
        # θ as the decimal the user typed: float products misround, e.g. floor(0.7 * 90) == 62, not 63.
        theta = Fraction(str(compression))

        features: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(3, num_init_features, kernel_size=3, padding=1, bias=False)
        )
        chs = num_init_features
        for i, num_layers in enumerate(block_config):
            features[f"denseblock{i + 1}"] = DenseBlock(
                num_layers, chs, growth_rate, bn_size, drop_rate, memory_efficient
            )
            chs += num_layers * growth_rate
            if i < len(block_config) - 1:
                out_chs = math.floor(theta * chs)
                if out_chs < 1:
                    raise ValueError(
                        f"compression θ={compression} gives floor(θ·m) = {out_chs} channels after dense block "
                        f"{i + 1} (m = {chs}); each transition needs floor(θ·m) >= 1"
                    )
                features[f"transition{i + 1}"] = Transition(chs, out_chs, drop_rate)
                chs = out_chs
        features["norm_final"] = nn.BatchNorm2d(chs)
        features["act_final"] = nn.ReLU(inplace=True)
        self.features = nn.Sequential(features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(chs, num_classes)
        self.num_features = chs
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model
def densenet(
    *,
    num_classes: int = 10,
    depth: int = 40,
    growth_rate: int = 12,
    drop_rate: float = 0.0,
    memory_efficient: bool = False,
) -> nn.Module:
    """Plain DenseNet (no bottleneck, no compression): L=40 k=12 1.0M, L=100 k=12 7.0M, L=100 k=24 27.2M."""
    check_positive_int("depth", depth)
    if (depth - 4) % 3 != 0 or depth < 7:
        raise ValueError(
            f"DenseNet depth must satisfy (depth - 4) % 3 == 0 and depth >= 7 "
            f"(three blocks of (depth - 4) / 3 layers), got {depth}"
        )
    return DenseNet(
        ((depth - 4) // 3,) * 3,
        growth_rate=growth_rate,
        num_init_features=16,
        bn_size=None,
        compression=1.0,
        drop_rate=drop_rate,
        num_classes=num_classes,
        memory_efficient=memory_efficient,
    )


def is_densenet_bc_depth(depth: int) -> bool:
    """Three blocks of (depth - 4) / 6 bottleneck layers (two convs each), at least one per block."""
    return depth >= 10 and (depth - 4) % 6 == 0


@register_model
def densenet_bc(
    *,
    num_classes: int = 10,
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
    bn_size: int = 4,
    drop_rate: float = 0.0,
    memory_efficient: bool = False,
) -> nn.Module:
    """DenseNet-BC: L=100 k=12 0.8M, L=250 k=24 15.3M, L=190 k=40 25.6M (Huang et al. 2017, Table 2)."""
    check_positive_int("depth", depth)
    if not is_densenet_bc_depth(depth):
        raise ValueError(
            f"DenseNet-BC depth must satisfy (depth - 4) % 6 == 0 and depth >= 10 "
            f"(three blocks of (depth - 4) / 6 bottleneck layers of two convs each), got {depth}"
        )
    return _densenet_bc(
        ((depth - 4) // 6,) * 3, num_classes, growth_rate, compression, bn_size, drop_rate, memory_efficient
    )


def _densenet_bc(
    block_config: tuple[int, ...],
    num_classes: int,
    growth_rate: int,
    compression: float,
    bn_size: int,
    drop_rate: float,
    memory_efficient: bool,
) -> DenseNet:
    check_positive_int("growth_rate", growth_rate)  # before it sizes the stem
    return DenseNet(
        block_config,
        growth_rate=growth_rate,
        num_init_features=2 * growth_rate,
        bn_size=bn_size,
        compression=compression,
        drop_rate=drop_rate,
        num_classes=num_classes,
        memory_efficient=memory_efficient,
    )


def _imagenet_variant(
    name: str, block_config: tuple[int, ...], default_growth_rate: int, params_at_100: str
) -> Callable[..., nn.Module]:
    """Register ``name``: an ImageNet block configuration of Huang et al. 2017 (Table 1) with the CIFAR stem."""

    def variant(
        *,
        num_classes: int = 10,
        growth_rate: int = default_growth_rate,
        compression: float = 0.5,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
    ) -> nn.Module:
        return _densenet_bc(
            block_config, num_classes, growth_rate, compression, bn_size, drop_rate, memory_efficient
        )

    variant.__name__ = variant.__qualname__ = name  # the registry names a variant after its function
    variant.__doc__ = (
        f"DenseNet-{name.removeprefix('densenet')} blocks {block_config}, k={default_growth_rate}, with a CIFAR "
        f"stem; {params_at_100} parameters at 100 classes."
    )
    return register_model(variant)


densenet121 = _imagenet_variant("densenet121", (6, 12, 24, 16), 32, "7.0M")
densenet169 = _imagenet_variant("densenet169", (6, 12, 32, 32), 32, "12.6M")
densenet201 = _imagenet_variant("densenet201", (6, 12, 48, 32), 32, "18.3M")
densenet161 = _imagenet_variant("densenet161", (6, 12, 36, 24), 48, "26.7M")
densenet264 = _imagenet_variant("densenet264", (6, 12, 64, 48), 32, "30.9M")
