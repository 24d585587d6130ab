"""VGG (Simonyan & Zisserman 2015) for 32x32 inputs.

The conv stack is torchvision's ``make_layers`` over its ``cfgs`` (configurations A/B/D/E = VGG-11/13/16/19),
exactly what bearpaw/pytorch-classification and kuangliu/pytorch-cifar use: five 2x2 max-pools take a
32x32 image to 1x1x512. Two CIFAR heads are offered:

* ``head="linear"`` (default): one ``Linear(512, C)``, as bearpaw and kuangliu.
* ``head="fc4096"``: weiaicunzai/pytorch-cifar100's ``Linear(512, 4096)-ReLU-Dropout-Linear(4096, 4096)-
  ReLU-Dropout-Linear(4096, C)``, the paper's FC stack on a 512-d input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.vgg import cfgs, make_layers

from zoo._registry import register_model
from zoo.layers import init_kaiming


def _head(head: str, num_classes: int) -> nn.Module:
    if head == "linear":
        return nn.Linear(512, num_classes)
    if head == "fc4096":
        return nn.Sequential(
            nn.Linear(512, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )
    raise ValueError(
        f"head must be 'linear' (one Linear(512, C), bearpaw/kuangliu) or 'fc4096' "
        f"(two 4096-wide FC layers, pytorch-cifar100), got {head!r}"
    )


class VGG(nn.Module):
    def __init__(self, cfg: str, batch_norm: bool, num_classes: int = 10, head: str = "linear") -> None:
        super().__init__()
        self.features = make_layers(cfgs[cfg], batch_norm=batch_norm)
        self.classifier = _head(head, num_classes)
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model
def vgg11(*, num_classes: int = 10, head: str = "linear") -> nn.Module:
    """VGG-11 (configuration A) without batch norm."""
    return VGG("A", False, num_classes, head)


@register_model
def vgg13(*, num_classes: int = 10, head: str = "linear") -> nn.Module:
    """VGG-13 (configuration B) without batch norm."""
    return VGG("B", False, num_classes, head)


@register_model
def vgg16(*, num_classes: int = 10, head: str = "linear") -> nn.Module:
    """VGG-16 (configuration D) without batch norm."""
    return VGG("D", False, num_classes, head)


@register_model
def vgg19(*, num_classes: int = 10, head: str = "linear") -> nn.Module:
    """VGG-19 (configuration E) without batch norm."""
    return VGG("E", False, num_classes, head)


@register_model
def vgg11_bn(*, num_classes: int = 10, head: str = "linear") -> nn.Module:
    """VGG-11 with batch norm after every conv."""
    return VGG("A", True, num_classes, head)


@register_model
def vgg13_bn(*, num_classes: int = 10, head: str = "linear") -> nn.Module:
    """VGG-13 with batch norm after every conv."""
    return VGG("B", True, num_classes, head)


@register_model
def vgg16_bn(*, num_classes: int = 10, head: str = "linear") -> nn.Module:
    """VGG-16 with batch norm; 34.0M parameters with ``head="fc4096"`` at 100 classes (pytorch-cifar100)."""
    return VGG("D", True, num_classes, head)


@register_model
def vgg19_bn(*, num_classes: int = 10, head: str = "linear") -> nn.Module:
    """VGG-19 with batch norm; 20.04M parameters at 10 classes (bearpaw/pytorch-classification README)."""
    return VGG("E", True, num_classes, head)
