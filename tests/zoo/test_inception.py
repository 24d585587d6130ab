"""GoogLeNet (zoo/googlenet.py) and Inception-v3/v4/ResNet-v2 (zoo/inception.py).

Expected counts are the reference implementations' exact integers. They were obtained by
instantiating each reference file's modules (the files named in INCEPTION_PARAM_TABLE) and summing
``numel``, and are re-derived here by arithmetic from the reference's layer list
(``_reference_count``), independently of the zoo code.
"""
from __future__ import annotations

import re

import pytest
import torch

import zoo.googlenet  # noqa: F401  (registers the variant)
import zoo.inception  # noqa: F401
from zoo._registry import create_model, model_family
from zoo.info import count_params
from tests.zoo.param_tables import INCEPTION_PARAM_TABLE

VARIANTS = ["googlenet", "inception_v3", "inception_v4", "inception_resnet_v2"]


# -- Reference counts by arithmetic. ``area`` is kh*kw: a 1x7 and a 7x1 conv both count 7. ----------


def _cbr(cin: int, cout: int, area: int) -> int:
    """The reference's BasicConv2d: bias-free conv + BN (weight, bias)."""
    return cin * cout * area + 2 * cout


def _linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def _googlenet(c: int) -> int:
    def conv(cin: int, cout: int, area: int) -> int:  # kuangliu keeps conv biases: conv + bias + BN
        return cin * cout * area + cout + 2 * cout

    def inception(i: int, n1: int, n3r: int, n3: int, n5r: int, n5: int, pool: int) -> int:
        return (conv(i, n1, 1) + conv(i, n3r, 1) + conv(n3r, n3, 9)
                + conv(i, n5r, 1) + conv(n5r, n5, 9) + conv(n5, n5, 9) + conv(i, pool, 1))

    cfgs = [(192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64), (480, 192, 96, 208, 16, 48, 64),
            (512, 160, 112, 224, 24, 64, 64), (512, 128, 128, 256, 24, 64, 64), (512, 112, 144, 288, 32, 64, 64),
            (528, 256, 160, 320, 32, 128, 128), (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128)]
    return conv(3, 192, 9) + sum(inception(*cfg) for cfg in cfgs) + _linear(1024, c)


def _inception_v3(c: int) -> int:
    def a(i: int, pool: int) -> int:  # pool branch projects with a 3x3 conv in the reference
        return (_cbr(i, 64, 1) + _cbr(i, 48, 1) + _cbr(48, 64, 25)
                + _cbr(i, 64, 1) + _cbr(64, 96, 9) + _cbr(96, 96, 9) + _cbr(i, pool, 9))

    def b(i: int) -> int:
        return _cbr(i, 384, 9) + _cbr(i, 64, 1) + _cbr(64, 96, 9) + _cbr(96, 96, 9)

    def c_(i: int, c7: int) -> int:
        return (_cbr(i, 192, 1) + _cbr(i, c7, 1) + _cbr(c7, c7, 7) + _cbr(c7, 192, 7)
                + _cbr(i, c7, 1) + 3 * _cbr(c7, c7, 7) + _cbr(c7, 192, 7) + _cbr(i, 192, 1))

    def d(i: int) -> int:
        return _cbr(i, 192, 1) + _cbr(192, 320, 9) + _cbr(i, 192, 1) + 2 * _cbr(192, 192, 7) + _cbr(192, 192, 9)

    def e(i: int) -> int:
        return (_cbr(i, 320, 1) + _cbr(i, 384, 1) + 2 * _cbr(384, 384, 3)
                + _cbr(i, 448, 1) + _cbr(448, 384, 9) + 2 * _cbr(384, 384, 3) + _cbr(i, 192, 1))

    stem = _cbr(3, 32, 9) + _cbr(32, 32, 9) + _cbr(32, 64, 9) + _cbr(64, 80, 1) + _cbr(80, 192, 9)
    return (stem + a(192, 32) + a(256, 64) + a(288, 64) + b(288)
            + c_(768, 128) + 2 * c_(768, 160) + c_(768, 192) + d(768) + e(1280) + e(2048) + _linear(2048, c))


def _v4_stem() -> int:
    return (_cbr(3, 32, 9) + _cbr(32, 32, 9) + _cbr(32, 64, 9) + _cbr(64, 96, 9)
            + _cbr(160, 64, 1) + 2 * _cbr(64, 64, 7) + _cbr(64, 96, 9) + _cbr(160, 64, 1) + _cbr(64, 96, 9)
            + _cbr(192, 192, 9))


def _reduction_a(i: int, k: int, l: int, m: int, n: int) -> int:  # noqa: E741
    return _cbr(i, k, 1) + _cbr(k, l, 9) + _cbr(l, m, 9) + _cbr(i, n, 9)


def _inception_v4(c: int) -> int:
    a = _cbr(384, 64, 1) + _cbr(64, 96, 9) + _cbr(96, 96, 9) + _cbr(384, 64, 1) + _cbr(64, 96, 9) + 2 * _cbr(384, 96, 1)
    b = (_cbr(1024, 384, 1) + _cbr(1024, 192, 1) + _cbr(192, 224, 7) + _cbr(224, 256, 7)
         + _cbr(1024, 192, 1) + _cbr(192, 192, 7) + _cbr(192, 224, 7) + _cbr(224, 224, 7) + _cbr(224, 256, 7)
         + _cbr(1024, 128, 1))
    reduction_b = (_cbr(1024, 192, 1) + _cbr(192, 192, 9)
                   + _cbr(1024, 256, 1) + _cbr(256, 256, 7) + _cbr(256, 320, 7) + _cbr(320, 320, 9))
    c_ = (_cbr(1536, 256, 1) + _cbr(1536, 384, 1) + 2 * _cbr(384, 256, 3)
          + _cbr(1536, 384, 1) + _cbr(384, 448, 3) + _cbr(448, 512, 3) + 2 * _cbr(512, 256, 3) + _cbr(1536, 256, 1))
    # Reduction-A gives 384 + 384 + 256 = 1024 channels, the width of every B block.
    return (_v4_stem() + 4 * a + _reduction_a(384, 192, 224, 256, 384) + 7 * b + reduction_b + 3 * c_
            + _linear(1536, c))


def _inception_resnet_v2(c: int) -> int:
    def merge(i: int, branch_out: int, out: int) -> int:  # biased 1x1 projection + biased 1x1 shortcut + BN
        return _linear(branch_out, out) + _linear(i, out) + 2 * out

    def a(i: int) -> int:
        return (_cbr(i, 32, 1) + _cbr(32, 48, 9) + _cbr(48, 64, 9) + _cbr(i, 32, 1) + _cbr(32, 32, 9)
                + _cbr(i, 32, 1) + merge(i, 128, 384))

    def b(i: int) -> int:
        return _cbr(i, 128, 1) + _cbr(128, 160, 7) + _cbr(160, 192, 7) + _cbr(i, 192, 1) + merge(i, 384, 1154)

    def c_(i: int) -> int:
        return _cbr(i, 192, 1) + _cbr(192, 224, 3) + _cbr(224, 256, 3) + _cbr(i, 192, 1) + merge(i, 448, 2048)

    reduction_b = (_cbr(1154, 256, 1) + _cbr(256, 384, 9) + _cbr(1154, 256, 1) + _cbr(256, 288, 9)
                   + _cbr(1154, 256, 1) + _cbr(256, 288, 9) + _cbr(288, 320, 9))
    # Reduction-A: 384 + 384 + 384 = 1152 channels; Reduction-B: 1154 + 384 + 288 + 320 = 2146.
    return (_v4_stem() + 5 * a(384) + _reduction_a(384, 256, 256, 384, 384) + b(1152) + 9 * b(1154)
            + reduction_b + c_(2146) + 4 * c_(2048) + _linear(2048, c))


_reference_count = {
    "googlenet": _googlenet,
    "inception_v3": _inception_v3,
    "inception_v4": _inception_v4,
    "inception_resnet_v2": _inception_resnet_v2,
}


# -- Tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,num_classes,expected,published,source", INCEPTION_PARAM_TABLE)
def test_param_counts(variant: str, num_classes: int, expected: int, published: float | None, source: str) -> None:
    assert _reference_count[variant](num_classes) == expected, source
    # Meta tensors: exact counts without allocating or initialising the weights.
    with torch.device("meta"):
        model = create_model(variant, num_classes=num_classes)
    assert count_params(model) == expected, source
    if published is not None:
        assert abs(published * 1e6 - expected) <= 0.005 * expected, source


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape_on_cifar_input(variant: str, num_classes: int) -> None:
    # Meta tensors propagate exact shapes through every layer without computing anything.
    with torch.device("meta"):
        model = create_model(variant, num_classes=num_classes).eval()
        out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, num_classes)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_googlenet_aux_logits(num_classes: int) -> None:
    with torch.device("meta"):
        model = create_model("googlenet", num_classes=num_classes, aux_logits=True)
        x = torch.randn(2, 3, 32, 32)
        outputs = model.train()(x)
        eval_out = model.eval()(x)
    assert isinstance(outputs, tuple) and len(outputs) == 3
    assert all(o.shape == (2, num_classes) for o in outputs)
    main, *aux = outputs  # the harness's reading of a train-mode tuple
    assert main is outputs.logits and len(aux) == 2
    assert isinstance(eval_out, torch.Tensor) and eval_out.shape == (2, num_classes)


def test_googlenet_without_aux_returns_tensor_in_train_mode() -> None:
    with torch.device("meta"):
        out = create_model("googlenet").train()(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_registry_families_and_hyperparameter_checks() -> None:
    assert model_family("googlenet") == "googlenet"
    assert all(model_family(v) == "inception" for v in VARIANTS[1:])
    for aux_logits in (1, "yes"):
        with pytest.raises(ValueError, match=f"aux_logits must be True or False, got {aux_logits!r}"):
            create_model("googlenet", aux_logits=aux_logits)
    for drop_rate in (1.0, -0.1, "a", True):
        rule = re.escape(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
        with torch.device("meta"), pytest.raises(ValueError, match=rule):  # meta: the features build first
            create_model("inception_v4", drop_rate=drop_rate)
    with torch.device("meta"):
        model = create_model("inception_v3", drop_rate=0.0)
    assert model.dropout.p == 0.0
