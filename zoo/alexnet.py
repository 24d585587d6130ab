"""AlexNet, CIFAR adaptation of bearpaw/pytorch-classification (``models/cifar/alexnet.py``).

Five convolutions of the one-GPU AlexNet ("One weird trick", Krizhevsky 2014) with the paddings adjusted
so 32x32 inputs reach 1x1x256 after three 2x2 max-pools, then a single linear layer instead of the
4096-wide FC stack. The 11x11 stride-4 stem is kept as in that reference, so the network sees an 8x8
map after its first layer: it is the weak, classic baseline of the suite, not a re-tuned one.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from zoo._registry import register_model
from zoo.layers import init_kaiming


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Linear(256, num_classes)
        init_kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model
def alexnet(*, num_classes: int = 10) -> nn.Module:
    """CIFAR AlexNet, 2.47M parameters at 10 classes (bearpaw/pytorch-classification README)."""
    return AlexNet(num_classes=num_classes)
