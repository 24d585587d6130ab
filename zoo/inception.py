"""Inception-v3, Inception-v4 and Inception-ResNet-v2 for 32x32 inputs.

The architectures are weiaicunzai/pytorch-cifar100 ``models/inceptionv3.py`` and
``models/inceptionv4.py`` (the latter holds both v4 and Inception-ResNet-v2): the ImageNet stems
become stride-1 3x3 convs and a single unpadded conv takes 32 -> 30, so the grids run
30 -> 14 -> 6 (v3, Inception-ResNet-v2) or 30 -> 14 -> 7 (v4). Parameter counts equal the
reference's exactly: 22,318,148 / 41,296,516 / 65,442,072 at 100 classes.

The reference's ``BasicConv2d`` (bias-free conv, BN, ReLU) is ``ConvBNReLU``. Its padding defaults
to "same", so the reference's unpadded convs say ``padding=0``. Concatenation orders follow the
reference's ``forward`` methods.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models.inception import InceptionB, InceptionE

from zoo._registry import register_model
from zoo.layers import ConvBNReLU, check_unit_interval, init_kaiming

# torchvision's blocks rely on nn.Conv2d's padding=0 default; ConvBNReLU would pad "same".
_tv_conv_block = partial(ConvBNReLU, padding=0)


def _avg_pool_branch(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), ConvBNReLU(in_channels, out_channels, kernel_size))


class _Concat(nn.ModuleList):
    """Parallel branches on one input, concatenated on channels.

    Neither torchvision nor timm has a generic container for this; it lets each block below read
    as its list of branches.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self], 1)


def _repeat(block: Callable[[int], nn.Module], count: int, in_channels: int, out_channels: int) -> nn.Sequential:
    """``count`` blocks; the first takes ``in_channels``, the rest ``out_channels``."""
    return nn.Sequential(*(block(in_channels if i == 0 else out_channels) for i in range(count)))


class InceptionNet(nn.Module):
    """A feature extractor, global average pooling, dropout and a linear classifier."""

    def __init__(self, features: nn.Sequential, num_features: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.features = features
        self.num_features = num_features
        # Adaptive pooling equals the reference's pooling at 32x32 and accepts other sizes.
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        # The reference's Dropout2d acts on a (B, C, 1, 1) map, which is plain dropout.
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_classes)
        init_kaiming(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(torch.flatten(self.global_pool(x), 1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Inception-v3. torchvision's InceptionB (Mixed_6a) and InceptionE (Mixed_7b/c) match the
# reference tensor for tensor; its InceptionA, C and D do not, hence the three blocks below.


class InceptionV3A(_Concat):
    """Mixed_5b-d. The reference projects the pool branch with a 3x3 conv (torchvision: 1x1)."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__([
            ConvBNReLU(in_channels, 64, 1),
            nn.Sequential(ConvBNReLU(in_channels, 48, 1), ConvBNReLU(48, 64, 5)),
            nn.Sequential(ConvBNReLU(in_channels, 64, 1), ConvBNReLU(64, 96, 3), ConvBNReLU(96, 96, 3)),
            _avg_pool_branch(in_channels, pool_features, kernel_size=3),
        ])


class InceptionV3C(_Concat):
    """Mixed_6b-e. The reference's short 7x7 branch runs 7x1 then 1x7 (torchvision: 1x7 then 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        c7 = channels_7x7
        super().__init__([
            ConvBNReLU(in_channels, 192, 1),
            nn.Sequential(ConvBNReLU(in_channels, c7, 1), ConvBNReLU(c7, c7, (7, 1)), ConvBNReLU(c7, 192, (1, 7))),
            nn.Sequential(
                ConvBNReLU(in_channels, c7, 1),
                ConvBNReLU(c7, c7, (7, 1)),
                ConvBNReLU(c7, c7, (1, 7)),
                ConvBNReLU(c7, c7, (7, 1)),
                ConvBNReLU(c7, 192, (1, 7)),
            ),
            _avg_pool_branch(in_channels, 192),
        ])


class InceptionV3D(_Concat):
    """Mixed_7a. The reference downsamples its pool branch by average (torchvision: max) pooling."""

    def __init__(self, in_channels: int) -> None:
        super().__init__([
            nn.Sequential(ConvBNReLU(in_channels, 192, 1), ConvBNReLU(192, 320, 3, stride=2, padding=0)),
            nn.Sequential(
                ConvBNReLU(in_channels, 192, 1),
                ConvBNReLU(192, 192, (1, 7)),
                ConvBNReLU(192, 192, (7, 1)),
                ConvBNReLU(192, 192, 3, stride=2, padding=0),
            ),
            nn.AvgPool2d(3, stride=2),
        ])


def _inception_v3_features() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("Conv2d_1a_3x3", ConvBNReLU(3, 32, 3)),
        ("Conv2d_2a_3x3", ConvBNReLU(32, 32, 3)),
        ("Conv2d_2b_3x3", ConvBNReLU(32, 64, 3)),
        ("Conv2d_3b_1x1", ConvBNReLU(64, 80, 1)),
        ("Conv2d_4a_3x3", ConvBNReLU(80, 192, 3, padding=0)),  # 32 -> 30
        ("Mixed_5b", InceptionV3A(192, pool_features=32)),
        ("Mixed_5c", InceptionV3A(256, pool_features=64)),
        ("Mixed_5d", InceptionV3A(288, pool_features=64)),
        ("Mixed_6a", InceptionB(288, conv_block=_tv_conv_block)),  # 30 -> 14
        ("Mixed_6b", InceptionV3C(768, channels_7x7=128)),
        ("Mixed_6c", InceptionV3C(768, channels_7x7=160)),
        ("Mixed_6d", InceptionV3C(768, channels_7x7=160)),
        ("Mixed_6e", InceptionV3C(768, channels_7x7=192)),
        ("Mixed_7a", InceptionV3D(768)),  # 14 -> 6
        ("Mixed_7b", InceptionE(1280, conv_block=_tv_conv_block)),
        ("Mixed_7c", InceptionE(2048, conv_block=_tv_conv_block)),
    ]))


# ---------------------------------------------------------------------------------------------
# Inception-v4 and Inception-ResNet-v2. timm's blocks keep the ImageNet stem, average-pool with
# count_include_pad=False and order some factorised kernels (1x7/7x1) differently; its
# Inception-ResNet-v2 also has identity shortcuts and other widths. Hence the blocks below.


class InceptionV4Stem(nn.Sequential):
    """Shared stem of v4 and Inception-ResNet-v2: 3 -> 384 channels, 32x32 -> 30x30."""

    def __init__(self) -> None:
        super().__init__(
            ConvBNReLU(3, 32, 3, padding=0),
            ConvBNReLU(32, 32, 3),
            ConvBNReLU(32, 64, 3),
            _Concat([ConvBNReLU(64, 96, 3), nn.MaxPool2d(3, stride=1, padding=1)]),
            _Concat([
                nn.Sequential(
                    ConvBNReLU(160, 64, 1),
                    ConvBNReLU(64, 64, (7, 1)),
                    ConvBNReLU(64, 64, (1, 7)),
                    ConvBNReLU(64, 96, 3),
                ),
                nn.Sequential(ConvBNReLU(160, 64, 1), ConvBNReLU(64, 96, 3)),
            ]),
            _Concat([nn.MaxPool2d(3, stride=1, padding=1), ConvBNReLU(192, 192, 3)]),
        )


class InceptionV4A(_Concat):
    """30x30 Inception-A block (paper Fig. 4), 384 -> 384 channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__([
            nn.Sequential(ConvBNReLU(in_channels, 64, 1), ConvBNReLU(64, 96, 3), ConvBNReLU(96, 96, 3)),
            nn.Sequential(ConvBNReLU(in_channels, 64, 1), ConvBNReLU(64, 96, 3)),
            ConvBNReLU(in_channels, 96, 1),
            _avg_pool_branch(in_channels, 96),
        ])


class ReductionA(_Concat):
    """Grid reduction with the paper's filter-bank sizes k, l, m, n (Table 1); used by both nets."""

    def __init__(self, in_channels: int, k: int, l: int, m: int, n: int) -> None:  # noqa: E741
        super().__init__([
            nn.Sequential(
                ConvBNReLU(in_channels, k, 1),
                ConvBNReLU(k, l, 3),
                ConvBNReLU(l, m, 3, stride=2, padding=0),
            ),
            ConvBNReLU(in_channels, n, 3, stride=2, padding=0),
            nn.MaxPool2d(3, stride=2),
        ])
        self.out_channels = in_channels + m + n


class InceptionV4B(_Concat):
    """14x14 Inception-B block (paper Fig. 5), 1024 -> 1024 channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__([
            ConvBNReLU(in_channels, 384, 1),
            nn.Sequential(ConvBNReLU(in_channels, 192, 1), ConvBNReLU(192, 224, (1, 7)), ConvBNReLU(224, 256, (7, 1))),
            nn.Sequential(
                ConvBNReLU(in_channels, 192, 1),
                ConvBNReLU(192, 192, (1, 7)),
                ConvBNReLU(192, 224, (7, 1)),
                ConvBNReLU(224, 224, (1, 7)),
                ConvBNReLU(224, 256, (7, 1)),
            ),
            _avg_pool_branch(in_channels, 128),
        ])


class InceptionV4ReductionB(_Concat):
    """14x14 -> 7x7; unlike Reduction-A the reference pads its stride-2 convs and pool here."""

    def __init__(self, in_channels: int) -> None:
        super().__init__([
            nn.Sequential(ConvBNReLU(in_channels, 192, 1), ConvBNReLU(192, 192, 3, stride=2)),
            nn.Sequential(
                ConvBNReLU(in_channels, 256, 1),
                ConvBNReLU(256, 256, (1, 7)),
                ConvBNReLU(256, 320, (7, 1)),
                ConvBNReLU(320, 320, 3, stride=2),
            ),
            nn.MaxPool2d(3, stride=2, padding=1),
        ])


class InceptionV4C(_Concat):
    """7x7 Inception-C block (paper Fig. 6), 1536 -> 1536 channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__([
            ConvBNReLU(in_channels, 256, 1),
            nn.Sequential(
                ConvBNReLU(in_channels, 384, 1),
                _Concat([ConvBNReLU(384, 256, (3, 1)), ConvBNReLU(384, 256, (1, 3))]),
            ),
            nn.Sequential(
                ConvBNReLU(in_channels, 384, 1),
                ConvBNReLU(384, 448, (1, 3)),
                ConvBNReLU(448, 512, (3, 1)),
                _Concat([ConvBNReLU(512, 256, (1, 3)), ConvBNReLU(512, 256, (3, 1))]),
            ),
            _avg_pool_branch(in_channels, 256),
        ])


class _InceptionResNetBlock(nn.Module):
    """``relu(bn(shortcut(x) + scale * proj(cat(branches(x)))))``, the reference's residual form.

    The reference projects the shortcut with a biased 1x1 conv and normalises after the sum (the
    paper, and timm, keep an identity shortcut), so no library block has this form.
    """

    def __init__(
        self, in_channels: int, branches: list[nn.Module], branch_channels: int, out_channels: int, scale: float
    ) -> None:
        super().__init__()
        self.branches = _Concat(branches)
        self.proj = nn.Conv2d(branch_channels, out_channels, 1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        residual = self.proj(self.branches(x)) * self.scale
        return self.act(self.bn(self.shortcut(x) + residual))


class InceptionResNetA(_InceptionResNetBlock):
    """30x30 block (paper Fig. 16), -> 384 channels."""

    def __init__(self, in_channels: int) -> None:
        branches = [
            ConvBNReLU(in_channels, 32, 1),
            nn.Sequential(ConvBNReLU(in_channels, 32, 1), ConvBNReLU(32, 32, 3)),
            nn.Sequential(ConvBNReLU(in_channels, 32, 1), ConvBNReLU(32, 48, 3), ConvBNReLU(48, 64, 3)),
        ]
        # The reference scales only the B and C residuals.
        super().__init__(in_channels, branches, 128, 384, scale=1.0)


class InceptionResNetB(_InceptionResNetBlock):
    """14x14 block (paper Fig. 17), -> 1154 channels."""

    def __init__(self, in_channels: int) -> None:
        branches = [
            ConvBNReLU(in_channels, 192, 1),
            nn.Sequential(ConvBNReLU(in_channels, 128, 1), ConvBNReLU(128, 160, (1, 7)), ConvBNReLU(160, 192, (7, 1))),
        ]
        super().__init__(in_channels, branches, 384, 1154, scale=0.1)


class InceptionResNetC(_InceptionResNetBlock):
    """6x6 block (paper Fig. 19), -> 2048 channels."""

    def __init__(self, in_channels: int) -> None:
        branches = [
            ConvBNReLU(in_channels, 192, 1),
            nn.Sequential(ConvBNReLU(in_channels, 192, 1), ConvBNReLU(192, 224, (1, 3)), ConvBNReLU(224, 256, (3, 1))),
        ]
        super().__init__(in_channels, branches, 448, 2048, scale=0.1)


class InceptionResNetReductionB(_Concat):
    """14x14 -> 6x6 (paper Fig. 18); appends 384 + 288 + 320 channels to the pooled input."""

    def __init__(self, in_channels: int) -> None:
        super().__init__([
            nn.Sequential(ConvBNReLU(in_channels, 256, 1), ConvBNReLU(256, 384, 3, stride=2, padding=0)),
            nn.Sequential(ConvBNReLU(in_channels, 256, 1), ConvBNReLU(256, 288, 3, stride=2, padding=0)),
            nn.Sequential(
                ConvBNReLU(in_channels, 256, 1),
                ConvBNReLU(256, 288, 3),
                ConvBNReLU(288, 320, 3, stride=2, padding=0),
            ),
            nn.MaxPool2d(3, stride=2),
        ])
        self.out_channels = in_channels + 384 + 288 + 320


def _inception_v4_features() -> nn.Sequential:
    reduction_a = ReductionA(384, k=192, l=224, m=256, n=384)
    return nn.Sequential(OrderedDict([
        ("stem", InceptionV4Stem()),
        ("inception_a", _repeat(InceptionV4A, 4, 384, 384)),
        ("reduction_a", reduction_a),  # 30 -> 14
        ("inception_b", _repeat(InceptionV4B, 7, reduction_a.out_channels, 1024)),
        ("reduction_b", InceptionV4ReductionB(1024)),  # 14 -> 7
        ("inception_c", _repeat(InceptionV4C, 3, 1536, 1536)),
    ]))


def _inception_resnet_v2_features() -> nn.Sequential:
    reduction_a = ReductionA(384, k=256, l=256, m=384, n=384)
    reduction_b = InceptionResNetReductionB(1154)
    return nn.Sequential(OrderedDict([
        ("stem", InceptionV4Stem()),
        ("inception_resnet_a", _repeat(InceptionResNetA, 5, 384, 384)),
        ("reduction_a", reduction_a),  # 30 -> 14
        ("inception_resnet_b", _repeat(InceptionResNetB, 10, reduction_a.out_channels, 1154)),
        ("reduction_b", reduction_b),  # 14 -> 6
        ("inception_resnet_c", _repeat(InceptionResNetC, 5, reduction_b.out_channels, 2048)),
    ]))


_check_drop_rate = partial(check_unit_interval, "drop_rate", zero_ok=True, one_ok=False)


@register_model
def inception_v3(*, num_classes: int = 10, drop_rate: float = 0.5) -> InceptionNet:
    """Inception-v3, weiaicunzai/pytorch-cifar100 form (22,318,148 params at 100 classes)."""
    return InceptionNet(_inception_v3_features(), 2048, num_classes, _check_drop_rate(drop_rate))


@register_model
def inception_v4(*, num_classes: int = 10, drop_rate: float = 0.2) -> InceptionNet:
    """Inception-v4, weiaicunzai/pytorch-cifar100 form (41,296,516 params at 100 classes)."""
    return InceptionNet(_inception_v4_features(), 1536, num_classes, _check_drop_rate(drop_rate))


@register_model
def inception_resnet_v2(*, num_classes: int = 10, drop_rate: float = 0.2) -> InceptionNet:
    """Inception-ResNet-v2, weiaicunzai/pytorch-cifar100 form (65,442,072 params at 100 classes)."""
    return InceptionNet(_inception_resnet_v2_features(), 2048, num_classes, _check_drop_rate(drop_rate))
