"""BiT (zoo/bit.py): parameter counts, narrow widths, and the official .npz checkpoint loader."""
from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct, StdConv2d

from zoo import bit
from zoo._registry import create_model, model_defaults, model_family
from zoo.info import count_params
from tests.zoo.param_tables import BIT_PARAM_TABLE

STEM_CHS = {"bit_r50x1": 64, "bit_r101x1": 64, "bit_r50x3": 192, "bit_r152x2": 128}



def _timm_name(variant: str) -> str:
    depth, width = re.fullmatch(r"bit_r(\d+)x(\d+)", variant).groups()
    return f"resnetv2_{depth}x{width}_bit"


@pytest.mark.parametrize("variant,num_classes,expected,source", BIT_PARAM_TABLE)
def test_param_counts(variant: str, num_classes: int, expected: int, source: str) -> None:
    # Meta tensors: exact counts without allocating or initialising ~230M parameters.
    with torch.device("meta"):
        cifar = count_params(create_model(variant, num_classes=num_classes))
        imagenet = count_params(create_model(variant, num_classes=num_classes, stem="imagenet"))
        reference = count_params(timm.create_model(_timm_name(variant), pretrained=False, num_classes=num_classes))
    assert cifar == expected, source
    assert imagenet == reference
    assert cifar == reference - (7 * 7 - 3 * 3) * 3 * STEM_CHS[variant]


def test_imagenet_stem_matches_timm_layout() -> None:
    with torch.device("meta"):
        ours = bit.bit_r50x1(stem="imagenet")
        ref = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert [type(m) for m in ours.stem] == [type(m) for m in ref.stem]


def test_registry_and_layers() -> None:
    assert model_family("bit_r152x2") == "bit"
    model = bit.bit_r50x1(base_width=8)
    convs = [m for m in model.modules() if isinstance(m, StdConv2d)]
    assert convs and all(m.eps == 1e-10 for m in convs)  # the official code's eps, not timm's 1e-8
    assert model_defaults("bit_r50x1")["ws_eps"] == 1e-10
    timm_eps = create_model("bit_r50x1", base_width=8, ws_eps=1e-8)
    assert all(m.eps == 1e-8 for m in timm_eps.modules() if isinstance(m, StdConv2d))
    assert count_params(timm_eps) == count_params(model)
    assert model.stem.conv.kernel_size == (3, 3) and model.stem.conv.stride == (1, 1) and len(model.stem) == 1
    assert all(isinstance(m, GroupNormAct) for m in (model.norm, model.stages[0].blocks[0].norm1))


@pytest.mark.parametrize("channels,groups", [(64, 32), (2048, 32), (16, 16), (48, 24), (24, 24), (40, 20), (8, 8)])
def test_num_groups(channels: int, groups: int) -> None:
    assert bit.bit_num_groups(channels) == groups


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_forward_shape(stem: str, num_classes: int) -> None:
    model = bit.bit_r50x1(num_classes=num_classes, stem=stem, base_width=8).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


@pytest.mark.parametrize("base_width,width_factor", [(16, 1), (16, 3), (8, 3)])
def test_narrow_width_builds_and_runs(base_width: int, width_factor: int) -> None:
    model = bit.bit_resnetv2((1, 1, 1, 1), base_width=base_width, width_factor=width_factor)
    stem_chs = base_width * width_factor
    assert model.stem.conv.out_channels == stem_chs
    assert model.num_features == 32 * stem_chs
    for m in model.modules():
        if isinstance(m, GroupNormAct):
            assert m.num_groups == bit.bit_num_groups(m.num_channels)
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stem="big"), "stem must be one of"),
        (dict(width_factor=0), "width_factor"),
        (dict(base_width=12), "multiple of 8"),
        (dict(drop_rate=1.0), r"drop_rate must be a number in \[0, 1\), got 1.0"),
        (dict(drop_rate="a"), r"drop_rate must be a number in \[0, 1\), got 'a'"),
        (dict(ws_eps=0), r"ws_eps must be a number in \(0, 1\), got 0"),
        (dict(ws_eps="1e-8"), r"ws_eps must be a number in \(0, 1\), got '1e-8'"),
        (dict(width_factor=True), "width_factor must be an integer >= 1"),
        (dict(depth=50), "no hyperparameter"),
    ],
)
def test_bad_hparams(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("bit_r50x1", **kwargs)


# --- official .npz checkpoints ----------------------------------------------------------------

_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.(conv|norm)([123])\.(weight|bias)")
_PROJ = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.downsample\.conv\.weight")
_TOP = {
    "stem.conv.weight": "root_block/standardized_conv2d/kernel",
    "norm.weight": "group_norm/gamma",
    "norm.bias": "group_norm/beta",
    "head.fc.weight": "head/conv2d/kernel",
    "head.fc.bias": "head/conv2d/bias",
}


def _official_key(name: str) -> str:
    """Our parameter name -> the BiT release's key, written out independently of zoo.bit."""
    if name in _TOP:
        return "resnet/" + _TOP[name]
    if m := _PROJ.fullmatch(name):
        return f"resnet/block{int(m[1]) + 1}/unit{int(m[2]) + 1:02d}/a/proj/standardized_conv2d/kernel"
    m = _BLOCK.fullmatch(name)
    assert m, f"unmapped parameter {name}"
    unit = f"resnet/block{int(m[1]) + 1}/unit{int(m[2]) + 1:02d}/{'abc'[int(m[4]) - 1]}/"
    if m[3] == "conv":
        return unit + "standardized_conv2d/kernel"
    return unit + ("group_norm/gamma" if m[5] == "weight" else "group_norm/beta")


def _write_checkpoint(model: torch.nn.Module, path, drop: str | None = None) -> None:
    arrays = {}
    for name, p in model.state_dict().items():
        a = p.detach().numpy()
        arrays[_official_key(name)] = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a  # OIHW -> HWIO
    arrays.pop(drop, None)
    np.savez(path, **arrays)


def _narrow(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Two units in stage 1 exercise unit numbering; every stage's first unit has a projection.
    return bit.bit_resnetv2((2, 1, 1, 1), base_width=8, **kwargs).eval()


def _body(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_load_round_trip(tmp_path, stem: str) -> None:
    src, dst = _narrow(0, stem=stem), _narrow(1, stem=stem)
    path = tmp_path / "BiT-M-narrow.npz"
    _write_checkpoint(src, path)
    report = bit.load_bit_weights(dst, path)
    assert report["skipped"] == []
    assert sorted(report["loaded"]) == sorted(n for n, _ in dst.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_loader_agrees_with_timm(tmp_path) -> None:
    # timm's own ResNetV2.load_pretrained reads the same file into an imagenet-stem model.
    src = _narrow(0, stem="imagenet")
    path = tmp_path / "ckpt.npz"
    _write_checkpoint(src, path)
    ours, theirs = _narrow(1, stem="imagenet"), _narrow(2, stem="imagenet")
    bit.load_bit_weights(ours, path)
    theirs.load_pretrained(str(path))
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_load_other_num_classes_skips_head(tmp_path) -> None:
    src, dst = _narrow(0, num_classes=21), _narrow(1, num_classes=10)
    path = tmp_path / "ckpt.npz"
    _write_checkpoint(src, path)
    head_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("head.")}
    report = bit.load_bit_weights(dst, path)
    assert [name for name, _ in report["skipped"]] == ["head.fc.weight", "head.fc.bias"]
    assert "(21, 256, 1, 1)" in report["skipped"][0][1]
    for k, v in _body(src).items():
        torch.testing.assert_close(_body(dst)[k], v, rtol=0, atol=0, msg=k)
    for k, v in head_before.items():
        assert torch.equal(dst.state_dict()[k], v), f"{k} should keep its initialisation"


def test_load_imagenet_checkpoint_into_cifar_stem(tmp_path) -> None:
    src, dst = _narrow(0, stem="imagenet"), _narrow(1, stem="cifar")
    path = tmp_path / "ckpt.npz"
    _write_checkpoint(src, path)
    stem_before = dst.stem.conv.weight.clone()
    report = bit.load_bit_weights(dst, path)
    assert [name for name, _ in report["skipped"]] == ["stem.conv.weight"]
    assert "(8, 3, 7, 7)" in report["skipped"][0][1] and "(8, 3, 3, 3)" in report["skipped"][0][1]
    assert torch.equal(dst.stem.conv.weight, stem_before)
    assert torch.equal(dst.stages[0].blocks[0].conv2.weight, src.stages[0].blocks[0].conv2.weight)


def test_load_other_width_raises_and_leaves_model_untouched(tmp_path) -> None:
    path = tmp_path / "wide.npz"
    _write_checkpoint(bit.bit_resnetv2((2, 1, 1, 1), base_width=16), path)
    dst = _narrow(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    # The stem is the first mismatch: 16 vs 8 output channels, which no stem option explains.
    message = (
        "checkpoint resnet/root_block/standardized_conv2d/kernel has shape (16, 3, 3, 3), "
        "model stem.conv.weight has (8, 3, 3, 3)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        bit.load_bit_weights(dst, path)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected checkpoint"


def test_load_head_of_other_width_raises(tmp_path) -> None:
    # Only the class count of the head may differ; a head over another feature width is not "another task".
    src = _narrow(0)
    src.head.fc = torch.nn.Conv2d(128, 10, kernel_size=1)
    path = tmp_path / "ckpt.npz"
    _write_checkpoint(src, path)
    with pytest.raises(ValueError, match=re.escape("model head.fc.weight has (10, 256, 1, 1)")):
        bit.load_bit_weights(_narrow(1), path)


def test_load_errors(tmp_path) -> None:
    model = _narrow(0)
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        bit.load_bit_weights(model, missing)

    key = "resnet/block1/unit02/b/group_norm/gamma"
    partial = tmp_path / "partial.npz"
    _write_checkpoint(model, partial, drop=key)
    with pytest.raises(ValueError, match=re.escape(f"partial.npz does not match this model: missing key '{key}'")):
        bit.load_bit_weights(model, partial)

    # A deeper model needs units the narrow checkpoint does not have.
    deeper = bit.bit_resnetv2((3, 1, 1, 1), base_width=8)
    full = tmp_path / "full.npz"
    _write_checkpoint(model, full)
    with pytest.raises(ValueError, match="unit03"):
        bit.load_bit_weights(deeper, full)
    # ...and a shallower model has no place for the deeper checkpoint's extra unit.
    deep_ckpt = tmp_path / "deep.npz"
    _write_checkpoint(deeper, deep_ckpt)
    with pytest.raises(ValueError, match=r"key 'resnet/block1/unit03/\S+' has no place in it \(9 unused"):
        bit.load_bit_weights(model, deep_ckpt)

    junk = tmp_path / "junk.npz"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.npz"):
        bit.load_bit_weights(model, junk)


def test_save_writes_the_official_layout_and_zero_head_zeroes_the_head(tmp_path) -> None:
    src = _narrow(0, stem="imagenet")
    ours = bit.save_bit_weights(src, tmp_path / "ours")  # .npz is added
    _write_checkpoint(src, tmp_path / "reference.npz")  # the independent writer above
    with np.load(ours) as a, np.load(tmp_path / "reference.npz") as b:
        assert ours.name == "ours.npz" and sorted(a.files) == sorted(b.files)
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    dst = _narrow(1, stem="imagenet")
    report = bit.load_bit_weights(dst, ours, zero_head=True)
    assert [name for name, _ in report["skipped"]] == ["head.fc.weight", "head.fc.bias"]
    assert all(torch.count_nonzero(p) == 0 for p in dst.head.parameters())
    torch.testing.assert_close(_body(dst), _body(src), rtol=0, atol=0)


# --- what the official code computes -------------------------------------------------------------------

OFFICIAL_LAYERS = (2, 1, 1, 1)


def _official_forward(weights: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """google-research/big_transfer bit_pytorch/models.py ResNetV2.forward, written out on the .npz arrays:
    StdConv2d w = (w - m) / torch.sqrt(v + 1e-10) with v, m = var_mean over (I, H, W), unbiased=False;
    GroupNorm(32, eps 1e-5); root 7x7/2 conv, ConstantPad2d(1, 0), MaxPool2d(3, 2); pre-activation units
    whose first unit projects from the pre-activated input and strides its 3x3 conv (stages 2-4); head GN,
    ReLU, global mean, 1x1 conv with bias."""
    def conv(key: str, h: torch.Tensor, stride: int = 1) -> torch.Tensor:
        w = torch.from_numpy(weights[key]).permute(3, 2, 0, 1)  # HWIO -> OIHW, as tf2th
        v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (w - m) / torch.sqrt(v + 1e-10)
        return F.conv2d(h, w, stride=stride, padding=w.shape[-1] // 2)

    def gn_relu(prefix: str, h: torch.Tensor) -> torch.Tensor:
        gamma, beta = (torch.from_numpy(weights[f"{prefix}group_norm/{k}"]) for k in ("gamma", "beta"))
        return F.relu(F.group_norm(h, 32, gamma, beta, eps=1e-5))

    h = conv("resnet/root_block/standardized_conv2d/kernel", x, stride=2)
    h = F.max_pool2d(F.pad(h, (1, 1, 1, 1)), kernel_size=3, stride=2)
    for b, units in enumerate(OFFICIAL_LAYERS, start=1):
        for u in range(1, units + 1):
            unit, stride = f"resnet/block{b}/unit{u:02d}/", 2 if b > 1 and u == 1 else 1
            out = gn_relu(f"{unit}a/", h)
            residual = conv(f"{unit}a/proj/standardized_conv2d/kernel", out, stride) if u == 1 else h
            out = conv(f"{unit}a/standardized_conv2d/kernel", out)
            out = conv(f"{unit}b/standardized_conv2d/kernel", gn_relu(f"{unit}b/", out), stride)
            h = conv(f"{unit}c/standardized_conv2d/kernel", gn_relu(f"{unit}c/", out)) + residual
    h = gn_relu("resnet/", h).mean(dim=(2, 3), keepdim=True)
    head = torch.from_numpy(weights["resnet/head/conv2d/kernel"]).permute(3, 2, 0, 1)
    return F.conv2d(h, head, torch.from_numpy(weights["resnet/head/conv2d/bias"]))[..., 0, 0]


def test_official_weights_compute_what_the_official_code_computes(tmp_path) -> None:
    # base_width 32: every width is a multiple of 32, so our group counts equal the official GroupNorm(32, c).
    torch.manual_seed(0)
    src = bit.bit_resnetv2(OFFICIAL_LAYERS, base_width=32, stem="imagenet")
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, (GroupNormAct, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
        # One residual branch's last conv gets zero-mean filters of variance 1e-10, where the eps decides the
        # branch's scale against the identity it is added to (a GroupNorm follows every other conv and undoes
        # any scale): the official 1e-10 multiplies it by 1/sqrt(2), timm's 1e-8 by about 1/10.
        w = src.stages[0].blocks[1].conv3.weight
        w.copy_((w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True, unbiased=False) * 1e-5)
    path = tmp_path / "BiT-M-tiny.npz"
    _write_checkpoint(src, path)
    x = torch.randn(2, 3, 32, 32)
    with np.load(path) as weights:
        expected = _official_forward(dict(weights), x)

    def loaded(**kwargs) -> torch.Tensor:
        model = bit.bit_resnetv2(OFFICIAL_LAYERS, base_width=32, stem="imagenet", **kwargs).eval()
        assert bit.load_bit_weights(model, path)["skipped"] == []
        with torch.no_grad():
            return model(x)

    torch.testing.assert_close(loaded(), expected, rtol=1e-4, atol=1e-5)
    # timm's eps gives another function on the same weights.
    assert (loaded(ws_eps=1e-8) - expected).abs().max() > 0.1 * expected.abs().max()
