"""Registry-wide model checks, the ``python -m zoo`` CLI, the FLOP counter and published parameter counts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import zoo
from zoo._registry import register_model
from zoo.__main__ import CACHE_FOLDER, source_key, zoo_table
from zoo.info import variant_info as info_on_meta
from tests.helpers import REPO
from tests.zoo.param_tables import BIT_PARAM_TABLE, INCEPTION_PARAM_TABLE, PARAM_TABLE

SLOW_PARAMS = 1_500_000  # larger models take seconds per step on two CPU cores: the quick suite keeps the small ones


def _params_on_meta(name: str) -> int:
    # Building on the meta device allocates nothing and skips init, so collection stays fast.
    with torch.device("meta"):
        return zoo.count_params(zoo.create_model(name))


REGISTRY = [
    pytest.param(name, {}, id=name, marks=[pytest.mark.slow] if _params_on_meta(name) > SLOW_PARAMS else [])
    for name in zoo.list_models()
] + [
    # Train mode returns (main, aux1, aux2): the loss below covers all three, so the aux heads get gradients too.
    pytest.param("googlenet", {"aux_logits": True}, id="googlenet-aux_logits", marks=pytest.mark.slow),
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
def test_cli_json_lists_every_variant(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CNN_ZOO_CACHE": str(tmp_path)}
    cold, warm = (
        subprocess.run([sys.executable, "-m", "zoo", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                       check=True)
        for _ in range(2)
    )
    assert warm.stdout == cold.stdout and len(list(tmp_path.glob(f"{CACHE_FOLDER}/*.json"))) == 1
    rows = json.loads(cold.stdout)
    assert [r["name"] for r in rows] == zoo.list_models()
    for row in rows:
        assert isinstance(row["params"], int) and row["params"] > 0
        assert isinstance(row["flops"], int) and row["flops"] > 0


def test_table_is_cached_by_source_and_class_count(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(zoo, "list_models", lambda: ["alexnet", "resnet20"])  # two variants keep it quick
    counted = []
    monkeypatch.setattr(zoo, "variant_info", lambda name, n: counted.append((name, n)) or info_on_meta(name, n))
    rows = zoo_table(10, cache_dir=tmp_path)
    assert [r["name"] for r in rows] == ["alexnet", "resnet20"] and len(counted) == 2
    assert rows[1] == {"name": "resnet20", "family": "resnet", **info_on_meta("resnet20", 10)}
    assert zoo_table(10, cache_dir=tmp_path) == rows and len(counted) == 2  # read back, nothing counted
    zoo_table(100, cache_dir=tmp_path)
    assert len(counted) == 4  # another class count is another table
    for damaged in (tmp_path / CACHE_FOLDER).glob("*.json"):
        damaged.write_text(damaged.read_text()[:20])
    assert zoo_table(10, cache_dir=tmp_path) == rows and len(counted) == 6


def test_cache_key_changes_with_any_zoo_source_file(tmp_path, monkeypatch) -> None:
    copy = shutil.copytree(Path(zoo.__file__).parent, tmp_path / "zoo", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(zoo, "__file__", str(copy / "__init__.py"))
    before = source_key(10)
    assert source_key(10) == before and source_key(100) != before
    with open(copy / "resnet.py", "a") as f:
        f.write("# an edit\n")
    assert source_key(10) != before


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
