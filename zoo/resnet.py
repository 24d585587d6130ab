"""ResNets for 32x32 inputs.

* ``resnet20`` ... ``resnet1202``: the CIFAR networks of He et al. 2016 (section 4.2): a 3x3 conv to
  16 channels, three stages of ``n`` basic blocks at 16/32/64 channels (strides 1/2/2), global average
  pooling and a linear classifier; depth = 6n + 2.
* ``resnet18/34/50``: torchvision's ImageNet ResNets with the CIFAR stem of kuangliu/pytorch-cifar
  (3x3 stride-1 conv, no max-pool), so the four stages run at 32/16/8/4 pixels.

``PadShortcut``, ``CifarBasicBlock`` and ``CifarResNet`` are our own: option A's parameter-free zero-padding
shortcut has no torchvision/timm equivalent, and torchvision's ResNet fixes a 64-wide stem and four stages.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock as TvBasicBlock
from torchvision.models.resnet import Bottleneck as TvBottleneck
from torchvision.models.resnet import ResNet as TvResNet

from zoo._registry import register_model
from zoo.layers import ConvBNReLU, init_kaiming

_SHORTCUTS = ("A", "B")
_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option A: parameter-free shortcut; subsample spatially and zero-pad the new channels.

    The zeros go on both sides of the channel axis, as in akamaster/pytorch_resnet_cifar10.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_front = (out_chs - in_chs) // 2
        self.pad_back = out_chs - in_chs - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class CifarBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut, option A/B shortcut where the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_chs, out_chs, kernel_size=3, stride=stride)
        self.conv2 = ConvBNReLU(out_chs, out_chs, kernel_size=3, activation_layer=None)
        if stride == 1 and in_chs == out_chs:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_chs, out_chs, stride)
        else:
            self.shortcut = ConvBNReLU(in_chs, out_chs, kernel_size=1, stride=stride, activation_layer=None)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet with ``blocks_per_stage`` basic blocks in each of three stages."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in _SHORTCUTS:
            raise ValueError(
                f"shortcut must be 'A' (zero-padding identity, parameter-free) or 'B' (1x1 conv projection "
                f"where the shape changes), got {shortcut!r}"
            )
        self.stem = ConvBNReLU(3, _WIDTHS[0], kernel_size=3)
        stages = []
        in_chs = _WIDTHS[0]
        for i, out_chs in enumerate(_WIDTHS):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(CifarBasicBlock(in_chs, out_chs, stride, shortcut))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _cifar_resnet(depth: int, num_classes: int, shortcut: str) -> CifarResNet:
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, shortcut=shortcut)


@register_model
def resnet20(*, num_classes: int = 10, shortcut: str = "A") -> nn.Module:
    """ResNet-20 (n=3), 0.27M parameters (He et al. 2016, Table 6)."""
    return _cifar_resnet(20, num_classes, shortcut)


@register_model
def resnet32(*, num_classes: int = 10, shortcut: str = "A") -> nn.Module:
    """ResNet-32 (n=5), 0.46M parameters."""
    return _cifar_resnet(32, num_classes, shortcut)


@register_model
def resnet44(*, num_classes: int = 10, shortcut: str = "A") -> nn.Module:
    """ResNet-44 (n=7), 0.66M parameters."""
    return _cifar_resnet(44, num_classes, shortcut)


@register_model
def resnet56(*, num_classes: int = 10, shortcut: str = "A") -> nn.Module:
    """ResNet-56 (n=9), 0.85M parameters."""
    return _cifar_resnet(56, num_classes, shortcut)


@register_model
def resnet110(*, num_classes: int = 10, shortcut: str = "A") -> nn.Module:
    """ResNet-110 (n=18), 1.7M parameters."""
    return _cifar_resnet(110, num_classes, shortcut)


@register_model
def resnet1202(*, num_classes: int = 10, shortcut: str = "A") -> nn.Module:
    """ResNet-1202 (n=200), 19.4M parameters."""
    return _cifar_resnet(1202, num_classes, shortcut)


def _imagenet_resnet(
    block: type[TvBasicBlock | TvBottleneck], layers: list[int], num_classes: int
) -> nn.Module:
    model = TvResNet(block, layers, num_classes=num_classes)
    # 32x32 inputs: a 7x7/2 conv plus a 3x3/2 max-pool would leave 1x1 maps in the last stage.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    init_kaiming(model)
    return model


@register_model
def resnet18(*, num_classes: int = 10) -> nn.Module:
    """ResNet-18 with a CIFAR stem (kuangliu/pytorch-cifar), 11.17M parameters at 10 classes."""
    return _imagenet_resnet(TvBasicBlock, [2, 2, 2, 2], num_classes)


@register_model
def resnet34(*, num_classes: int = 10) -> nn.Module:
    """ResNet-34 with a CIFAR stem, 21.3M parameters at 100 classes (weiaicunzai/pytorch-cifar100)."""
    return _imagenet_resnet(TvBasicBlock, [3, 4, 6, 3], num_classes)


@register_model
def resnet50(*, num_classes: int = 10) -> nn.Module:
    """ResNet-50 (bottleneck blocks) with a CIFAR stem, 23.7M parameters at 100 classes."""
    return _imagenet_resnet(TvBottleneck, [3, 4, 6, 3], num_classes)
