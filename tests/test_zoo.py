"""Registry-wide model checks, the ``python -m zoo`` CLI, the FLOP counter and published parameter counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import zoo
from tests.test_zoo_bit import PARAM_TABLE as BIT_PARAM_TABLE
from tests.test_zoo_inception import PARAM_TABLE as INCEPTION_PARAM_TABLE
from zoo._registry import register_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SLOW_PARAMS = 30_000_000  # models above this many parameters take seconds per step on two CPU cores


def _params_on_meta(name: str) -> int:
    # Building on the meta device allocates nothing and skips init, so collection stays fast.
    with torch.device("meta"):
        return zoo.count_params(zoo.create_model(name))


REGISTRY = [
    pytest.param(name, {}, id=name, marks=[pytest.mark.slow] if _params_on_meta(name) > SLOW_PARAMS else [])
    for name in zoo.list_models()
] + [
    # Train mode returns (main, aux1, aux2): the loss below covers all three, so the aux heads get gradients too.
    pytest.param("googlenet", {"aux_logits": True}, id="googlenet-aux_logits"),
]


def _total(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A scalar depending on every output, auxiliary heads included."""
    return sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize(("name", "hparams"), REGISTRY)
def test_registered_model(name: str, hparams: dict, num_classes: int) -> None:
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=num_classes, **hparams)
    x = torch.randn(2, 3, 32, 32)

    model.train()
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    _total(out).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"

    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert first.shape == (2, num_classes)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.slow
def test_cli_json_lists_every_variant() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "zoo", "--json"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == zoo.list_models()
    for row in rows:
        assert isinstance(row["params"], int) and row["params"] > 0
        assert isinstance(row["flops"], int) and row["flops"] > 0


def test_unknown_model_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"resnet20.*python -m zoo"):
        zoo.create_model("resnet21")
    # Even a name that resembles nothing gets its three nearest names and how to list them all.
    with pytest.raises(ValueError, match=r"unknown model 'xyz'\. Did you mean \w+, \w+, \w+\? List all with"):
        zoo.create_model("xyz")


def test_timm_model() -> None:
    model = zoo.create_model("timm:resnet18", num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert zoo.model_family("timm:resnet18") == "timm"
    with pytest.raises(ValueError, match=r"'resnet181'\. Did you mean timm:resnet18,.*timm\.list_models\(\)"):
        zoo.create_model("timm:resnet181")


@pytest.mark.parametrize("num_classes", [0, True, 10.0, "10"])
def test_num_classes_must_be_a_positive_integer(num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        zoo.create_model("resnet20", num_classes=num_classes)


def test_unknown_hyperparameter() -> None:
    with pytest.raises(ValueError, match="no hyperparameter 'depth'"):
        zoo.create_model("resnet20", depth=20)


def test_register_twice_raises() -> None:
    def resnet20(*, num_classes: int = 10) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet20)


@pytest.mark.parametrize(
    ("layer", "input_size", "macs"),
    [
        # MACs = output elements x (in_channels x kh x kw) per output element
        (nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False), (3, 32, 32), 8 * 32 * 32 * 3 * 3 * 3),
        (nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1, bias=False), (16, 32, 32), 32 * 16 * 16 * 16 * 3 * 3),
        (nn.Conv2d(64, 10, kernel_size=1, bias=False), (64, 8, 8), 10 * 8 * 8 * 64),
        (nn.Linear(512, 100, bias=False), (512,), 512 * 100),
    ],
)
def test_flops_are_twice_the_macs(layer: nn.Module, input_size: tuple[int, ...], macs: int) -> None:
    info = zoo.model_info(layer, input_size)
    assert info["flops"] == 2 * macs
    assert info["macs"] == macs


def test_invalid_architecture_options() -> None:
    with pytest.raises(ValueError, match="shortcut must be 'A'"):
        zoo.create_model("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="head must be 'linear'"):
        zoo.create_model("vgg16_bn", head="mlp")


def test_resnet_shortcut_options() -> None:
    def projections(model: nn.Module) -> int:
        return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())

    # Option A is parameter-free; option B projects only where the shape changes (16->32, 32->64).
    assert projections(zoo.create_model("resnet20")) == 0
    assert projections(zoo.create_model("resnet20", shortcut="B")) == 2
    out = zoo.create_model("resnet20", shortcut="B")(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


# (name, num_classes, hparams, expected, exact, source). Exact integers are what the reference
# implementation's code builds (its published figure is quoted); the others are the paper's rounded
# figures, matched within 2%.
BEARPAW = "bearpaw/pytorch-classification models/cifar"
KUANGLIU = "kuangliu/pytorch-cifar models"
CIFAR100 = "weiaicunzai/pytorch-cifar100 models"
AKAMASTER = "akamaster/pytorch_resnet_cifar10 resnet.py"
DENSENET_PAPER = "Huang et al. 2017 Table 2"
PARAM_TABLE = [
    ("alexnet", 10, {}, 2_472_266, True, f"{BEARPAW}/alexnet.py; README 2.47M"),
    ("alexnet", 100, {}, 2_495_396, True, f"{BEARPAW}/alexnet.py at 100 classes"),
    ("vgg11", 10, {}, 9_225_610, True, f"{BEARPAW}/vgg.py vgg11"),
    ("vgg13", 10, {}, 9_410_122, True, f"{BEARPAW}/vgg.py vgg13"),
    ("vgg16", 10, {}, 14_719_818, True, f"{BEARPAW}/vgg.py vgg16"),
    ("vgg19", 10, {}, 20_029_514, True, f"{BEARPAW}/vgg.py vgg19"),
    ("vgg11_bn", 10, {}, 9_231_114, True, f"{KUANGLIU}/vgg.py VGG('VGG11')"),
    ("vgg13_bn", 10, {}, 9_416_010, True, f"{KUANGLIU}/vgg.py VGG('VGG13')"),
    ("vgg16_bn", 10, {}, 14_728_266, True, f"{KUANGLIU}/vgg.py VGG('VGG16')"),
    ("vgg19_bn", 10, {}, 20_040_522, True, f"{BEARPAW}/vgg.py vgg19_bn; README 20.04M"),
    ("vgg11_bn", 100, {"head": "fc4096"}, 28_518_244, True, f"{CIFAR100}/vgg.py; README 28.5M"),
    ("vgg13_bn", 100, {"head": "fc4096"}, 28_703_140, True, f"{CIFAR100}/vgg.py; README 28.7M"),
    ("vgg16_bn", 100, {"head": "fc4096"}, 34_015_396, True, f"{CIFAR100}/vgg.py; README 34.0M"),
    ("vgg19_bn", 100, {"head": "fc4096"}, 39_327_652, True, f"{CIFAR100}/vgg.py; README 39.0M"),
    ("resnet20", 10, {}, 269_722, True, f"{AKAMASTER}; README 0.27M (He et al. 2016 Table 6: 0.27M)"),
    ("resnet32", 10, {}, 464_154, True, f"{AKAMASTER}; README 0.46M"),
    ("resnet44", 10, {}, 658_586, True, f"{AKAMASTER}; README 0.66M"),
    ("resnet56", 10, {}, 853_018, True, f"{AKAMASTER}; README 0.85M"),
    ("resnet110", 10, {}, 1_727_962, True, f"{AKAMASTER}; README 1.7M"),
    ("resnet1202", 10, {}, 19_421_274, True, f"{AKAMASTER}; README 19.4M"),
    ("resnet18", 10, {}, 11_173_962, True, f"{KUANGLIU}/resnet.py ResNet18"),
    ("resnet34", 10, {}, 21_282_122, True, f"{KUANGLIU}/resnet.py ResNet34"),
    ("resnet50", 10, {}, 23_520_842, True, f"{KUANGLIU}/resnet.py ResNet50"),
    ("resnet18", 100, {}, 11_220_132, True, f"{CIFAR100}/resnet.py; README 11.2M"),
    ("resnet34", 100, {}, 21_328_292, True, f"{CIFAR100}/resnet.py; README 21.3M"),
    ("resnet50", 100, {}, 23_705_252, True, f"{CIFAR100}/resnet.py; README 23.7M"),
    ("densenet", 10, {"depth": 40, "growth_rate": 12}, 1_000_000, False, f"{DENSENET_PAPER}: L=40 k=12 1.0M"),
    ("densenet", 10, {"depth": 100, "growth_rate": 12}, 7_000_000, False, f"{DENSENET_PAPER}: L=100 k=12 7.0M"),
    ("densenet", 10, {"depth": 100, "growth_rate": 24}, 27_200_000, False, f"{DENSENET_PAPER}: L=100 k=24 27.2M"),
    ("densenet_bc", 10, {"depth": 100, "growth_rate": 12}, 769_162, True,
     f"{BEARPAW}/densenet.py; README 0.77M ({DENSENET_PAPER}: 0.8M)"),
    ("densenet_bc", 10, {"depth": 250, "growth_rate": 24}, 15_300_000, False, f"{DENSENET_PAPER}: L=250 k=24 15.3M"),
    ("densenet_bc", 10, {"depth": 190, "growth_rate": 40}, 25_624_430, True,
     f"{BEARPAW}/densenet.py; README 25.62M ({DENSENET_PAPER}: 25.6M)"),
    ("densenet121", 100, {}, 7_048_548, True, f"{CIFAR100}/densenet.py; README 7.0M"),
    ("densenet169", 100, {}, 12_643_172, True, f"{CIFAR100}/densenet.py densenet169"),
    ("densenet201", 100, {}, 18_277_220, True, f"{CIFAR100}/densenet.py; README 18M"),
    ("densenet161", 100, {}, 26_681_188, True, f"{CIFAR100}/densenet.py; README 26M"),
]


@pytest.mark.parametrize(
    ("name", "num_classes", "hparams", "expected", "exact", "source"),
    PARAM_TABLE,
    ids=[f"{r[0]}-{r[1]}-{'-'.join(f'{k}={v}' for k, v in r[2].items()) or 'default'}" for r in PARAM_TABLE],
)
def test_param_count_matches_reference(
    name: str, num_classes: int, hparams: dict, expected: int, exact: bool, source: str
) -> None:
    with torch.device("meta"):
        params = zoo.count_params(zoo.create_model(name, num_classes=num_classes, **hparams))
    if exact:
        assert params == expected, f"{params:,} != {expected:,} ({source})"
    else:
        assert abs(params - expected) <= 0.02 * expected, f"{params:,} not within 2% of {expected:,} ({source})"


def test_param_tables_cover_every_variant() -> None:
    # A newly registered variant fails here until one of the reference-count tables lists it.
    covered = {row[0] for table in (PARAM_TABLE, BIT_PARAM_TABLE, INCEPTION_PARAM_TABLE) for row in table}
    assert covered == set(zoo.list_models())
