"""GoogLeNet (Szegedy et al. 2015) for 32x32 inputs.

The architecture is kuangliu/pytorch-cifar ``models/googlenet.py``: a single 3x3 stem conv with
192 channels instead of the ImageNet 7x7/stride-2 stem, two 3x3 convs in the "5x5" branch, BN
after every conv and biased convs throughout, so the count at 10 classes is exactly the
reference's 6,166,250. Optional auxiliary classifiers follow Szegedy et al. 2015 (torchvision's
``InceptionAux``), fed from inception 4a and 4d, whose 16x16 maps it pools to 4x4.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models.googlenet import InceptionAux

from zoo._registry import register_model
from zoo.layers import ConvBNReLU, check_bool, init_kaiming


# The reference keeps conv biases in front of BN; kept for an exact parameter match.
_conv_bn_relu = partial(ConvBNReLU, bias=True)


class GoogLeNetOutputs(NamedTuple):
    """Train-mode output with auxiliary heads; a harness reads it as ``(main, *aux)``."""

    logits: Tensor
    aux1: Tensor
    aux2: Tensor


class Inception(nn.Module):
    """Four-branch Inception module as in the reference.

    torchvision's GoogLeNet ``Inception`` differs (one 3x3 conv in the third branch, bias-free
    convs, ceil-mode pooling), so this keeps the reference's form.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        conv = _conv_bn_relu
        self.branch1 = conv(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(conv(in_channels, ch3x3red, 1), conv(ch3x3red, ch3x3, 3))
        # "5x5" branch factorised into two 3x3 convs, as in the reference.
        self.branch3 = nn.Sequential(
            conv(in_channels, ch5x5red, 1), conv(ch5x5red, ch5x5, 3), conv(ch5x5, ch5x5, 3)
        )
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv(in_channels, pool_proj, 1))
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    """CIFAR GoogLeNet.

    Output contract: in eval mode, or when built without ``aux_logits``, ``forward`` returns the
    logits tensor ``(B, num_classes)``. With ``aux_logits=True`` in train mode it returns
    ``GoogLeNetOutputs(logits, aux1, aux2)``, a tuple of three ``(B, num_classes)`` tensors that
    the training harness treats as ``(main, *aux)`` (Szegedy et al. weight each aux loss by 0.3).
    """

    def __init__(self, num_classes: int = 10, aux_logits: bool = False) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 192, 3)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        # Aux heads exist only when requested, so the default count equals the reference's.
        self.aux1 = InceptionAux(512, num_classes, conv_block=ConvBNReLU) if aux_logits else None
        self.aux2 = InceptionAux(528, num_classes, conv_block=ConvBNReLU) if aux_logits else None
        # Adaptive pooling equals the reference's AvgPool2d(8) at 32x32 and accepts other sizes.
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.inception5b.out_channels
        self.fc = nn.Linear(self.num_features, num_classes)
        init_kaiming(self)

    def forward(self, x: Tensor) -> Tensor | GoogLeNetOutputs:
        x = self.stem(x)
        x = self.inception3b(self.inception3a(x))
        x = self.inception4a(self.maxpool3(x))
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.inception4e(x)
        x = self.inception5b(self.inception5a(self.maxpool4(x)))
        logits = self.fc(torch.flatten(self.global_pool(x), 1))
        if aux1 is not None and aux2 is not None:
            return GoogLeNetOutputs(logits, aux1, aux2)
        return logits


@register_model
def googlenet(*, num_classes: int = 10, aux_logits: bool = False) -> GoogLeNet:
    """GoogLeNet, kuangliu/pytorch-cifar form (6,166,250 params at 10 classes without aux heads).

    ``aux_logits=True`` adds the two auxiliary classifiers; in train mode the model then returns
    ``(logits, aux1, aux2)`` (see ``GoogLeNet``).
    """
    return GoogLeNet(num_classes=num_classes, aux_logits=check_bool("aux_logits", aux_logits))
