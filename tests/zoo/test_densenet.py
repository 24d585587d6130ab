"""DenseNet: transition widths under compression, memory-efficient equivalence, hyperparameter rules."""
from __future__ import annotations

import copy
from decimal import Decimal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import zoo
from zoo.densenet import DenseBlock, DenseLayer, Transition


@pytest.mark.parametrize(
    ("depth", "growth_rate", "compression"),
    [
        (40, 12, "0.5"),
        (52, 8, "0.3"),
        (64, 12, "0.75"),
        (28, 6, "1.0"),
        (34, 7, "0.3"),
        (28, 15, "0.7"),  # m = 90 after block 1: θ·m = 63 exactly, but the float product floors to 62
        (22, 20, "0.29"),  # m = 100: θ·m = 29, float product floors to 28
    ],
)
def test_bc_transition_widths(depth: int, growth_rate: int, compression: str) -> None:
    model = zoo.create_model("densenet_bc", depth=depth, growth_rate=growth_rate, compression=float(compression))
    layers_per_block = (depth - 4) // 6
    stages = [m for m in model.features if isinstance(m, (DenseBlock, Transition))]
    assert [type(m) for m in stages] == [DenseBlock, Transition, DenseBlock, Transition, DenseBlock]

    chs = 2 * growth_rate
    for stage in stages:
        if isinstance(stage, DenseBlock):
            assert len(stage) == layers_per_block
            assert next(iter(stage.values())).norm1.num_features == chs
            chs += layers_per_block * growth_rate
        else:
            assert stage.conv.in_channels == chs
            # floor(θ·m) in exact decimal arithmetic (int() floors a positive Decimal).
            assert stage.conv.out_channels == int(Decimal(compression) * chs)
            chs = stage.conv.out_channels
    assert model.classifier.in_features == chs

    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.train()
    torch.manual_seed(123)  # same dropout masks for both paths
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach()


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("densenet_bc", {"depth": 22, "growth_rate": 6}),
        ("densenet_bc", {"depth": 22, "growth_rate": 6, "compression": 0.3, "drop_rate": 0.2}),
        ("densenet", {"depth": 13, "growth_rate": 6, "drop_rate": 0.2}),
    ],
)
def test_memory_efficient_matches_standard(name: str, hparams: dict) -> None:
    torch.manual_seed(0)
    standard = zoo.create_model(name, **hparams)
    efficient = zoo.create_model(name, memory_efficient=True, **hparams)
    efficient.load_state_dict(standard.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    torch.testing.assert_close(_train_step(efficient, x, y), _train_step(standard, x, y))
    for (name_s, p_s), (_, p_e) in zip(standard.named_parameters(), efficient.named_parameters(), strict=True):
        torch.testing.assert_close(p_e.grad, p_s.grad, msg=f"gradient of {name_s}")
    buffers_e = dict(efficient.named_buffers())
    for name_s, b_s in standard.named_buffers():
        torch.testing.assert_close(buffers_e[name_s], b_s, msg=f"buffer {name_s}")
    # One training step: running statistics updated exactly once despite the recomputation.
    assert all(b.item() == 1 for n, b in efficient.named_buffers() if n.endswith("num_batches_tracked"))

    standard.eval()
    efficient.eval()
    with torch.no_grad():
        torch.testing.assert_close(efficient(x), standard(x))


@pytest.mark.slow  # forward and backward of two DenseNet-BC-100s
def test_memory_efficient_saves_fewer_tensors_for_backward() -> None:
    def saved_activation_bytes(model: nn.Module) -> int:
        params = {p.data_ptr() for p in model.parameters()}
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if t.data_ptr() not in params:
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(4, 3, 32, 32)).sum().backward()
        return total

    standard = zoo.create_model("densenet_bc", depth=40, growth_rate=12)
    efficient = zoo.create_model("densenet_bc", depth=40, growth_rate=12, memory_efficient=True)
    # The concatenation and first BN-ReLU of every layer are recomputed rather than stored
    # (measured: 69% of the standard path at L=40, 55% at L=100).
    assert saved_activation_bytes(efficient) < 0.75 * saved_activation_bytes(standard)


@pytest.mark.parametrize(
    ("name", "hparams", "rule"),
    [
        ("densenet_bc", {"growth_rate": 0}, r"growth_rate must be an integer >= 1"),
        ("densenet", {"growth_rate": 0}, r"growth_rate must be an integer >= 1"),
        ("densenet_bc", {"compression": 0}, r"compression θ must be a number in \(0, 1\]"),
        ("densenet_bc", {"compression": 0.0}, r"compression θ must be a number in \(0, 1\]"),
        ("densenet_bc", {"compression": 1.2}, r"compression θ must be a number in \(0, 1\]"),
        ("densenet_bc", {"depth": 101}, r"\(depth - 4\) % 6 == 0"),
        ("densenet_bc", {"depth": 4}, r"depth >= 10"),
        ("densenet", {"depth": 41}, r"\(depth - 4\) % 3 == 0"),
        ("densenet_bc", {"bn_size": 0}, r"bn_size must be an integer >= 1"),
        ("densenet_bc", {"compression": "0.5"}, r"compression θ must be a number in \(0, 1\], got '0.5'"),
        ("densenet_bc", {"compression": True}, r"compression θ must be a number in \(0, 1\], got True"),
        ("densenet_bc", {"drop_rate": 1.0}, r"drop_rate must be a number in \[0, 1\), got 1.0"),
        ("densenet", {"drop_rate": -0.1}, r"drop_rate must be a number in \[0, 1\), got -0.1"),
        ("densenet", {"drop_rate": "a"}, r"drop_rate must be a number in \[0, 1\), got 'a'"),
        ("densenet_bc", {"memory_efficient": "yes"}, r"memory_efficient must be True or False, got 'yes'"),
        ("densenet121", {"memory_efficient": 1}, r"memory_efficient must be True or False, got 1"),
        ("densenet_bc", {"growth_rate": 12.0}, r"growth_rate must be an integer >= 1"),
        ("densenet_bc", {"depth": 10, "growth_rate": 1, "compression": 0.1}, r"floor\(θ·m\) >= 1"),
        ("densenet121", {"compression": 1.5}, r"compression θ must be a number in \(0, 1\]"),
    ],
)
def test_invalid_hyperparameters_state_the_rule(name: str, hparams: dict, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        zoo.create_model(name, **hparams)


# --- dropout placement (Huang et al. 2017, Sec. 4.2; the authors' models/DenseConnectLayer.lua) ------------

DROPOUT_CASES = [
    ("densenet", {"depth": 13, "growth_rate": 6}),
    ("densenet_bc", {"depth": 22, "growth_rate": 6}),
    ("densenet121", {"growth_rate": 4}),
]


def _leaf_calls(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Every leaf module in the order the forward pass runs it."""
    calls: list[tuple[str, nn.Module]] = []
    handles = [m.register_forward_hook(lambda m, i, o, name=name: calls.append((name, m)))
               for name, m in model.named_modules() if not list(m.children())]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize(("name", "hparams"), DROPOUT_CASES)
def test_dropout_follows_every_conv_but_the_stem(name: str, hparams: dict) -> None:
    model = zoo.create_model(name, drop_rate=0.2, **hparams).train()
    calls = _leaf_calls(model, torch.randn(2, 3, 32, 32))
    convs = [i for i, (_, m) in enumerate(calls) if isinstance(m, nn.Conv2d)]
    drops = [i for i, (_, m) in enumerate(calls) if isinstance(m, nn.Dropout)]
    assert calls[convs[0]][0] == "features.conv0" and not isinstance(calls[convs[0] + 1][1], nn.Dropout)
    # Each later conv is followed at once by a Dropout(0.2), and no Dropout runs anywhere else.
    assert drops == [i + 1 for i in convs[1:]]
    assert all(calls[i][1].p == 0.2 for i in drops)
    layers = [m for m in model.modules() if isinstance(m, DenseLayer)]
    transitions = [m for m in model.modules() if isinstance(m, Transition)]
    convs_per_layer = 1 if name == "densenet" else 2
    assert len(drops) == convs_per_layer * len(layers) + len(transitions)
    # Inside a bottleneck layer the first Dropout sits between the 1x1 conv and the second BN.
    if convs_per_layer == 2:
        first = next(i for i, (n, _) in enumerate(calls) if n.endswith("denselayer1.conv1"))
        assert [n.rsplit(".", 1)[1] for n, _ in calls[first:first + 6]] == [
            "conv1", "drop1", "norm2", "act2", "conv2", "drop2"]


def _drop_free_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network as it was before dropout moved: the same modules, composed without any dropout."""
    for name, stage in model.features.named_children():
        if isinstance(stage, DenseBlock):
            features = [x]
            for layer in stage.values():
                out = layer.conv1(layer.act1(layer.norm1(torch.cat(features, 1))))
                if layer.conv2 is not None:
                    out = layer.conv2(layer.act2(layer.norm2(out)))
                features.append(out)
            x = torch.cat(features, 1)
        elif isinstance(stage, Transition):
            x = stage.pool(stage.conv(stage.act(stage.norm(x))))
        else:
            x = stage(x)
    return model.classifier(torch.flatten(model.pool(x), 1))


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize(("name", "hparams"), DROPOUT_CASES)
def test_drop_rate_zero_is_the_drop_free_network(name: str, hparams: dict, memory_efficient: bool) -> None:
    torch.manual_seed(0)
    model = zoo.create_model(name, memory_efficient=memory_efficient, **hparams)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    reference = copy.deepcopy(model)
    x = torch.randn(3, 3, 32, 32, requires_grad=memory_efficient)  # the checkpointed path needs a grad input
    for train in (True, False):  # train: batch statistics (and running-stat updates); eval: running statistics
        model.train(train)
        reference.train(train)
        assert torch.equal(model(x), _drop_free_forward(reference, x))
    # Dropout owns no state and draws no random numbers at build time: same seed, same weights.
    torch.manual_seed(0)
    dropped = zoo.create_model(name, memory_efficient=memory_efficient, drop_rate=0.3, **hparams)
    assert dropped.state_dict().keys() == model.state_dict().keys()
    torch.manual_seed(0)
    fresh = zoo.create_model(name, memory_efficient=memory_efficient, **hparams)
    for key, value in fresh.state_dict().items():
        assert torch.equal(dropped.state_dict()[key], value), key


# --- the ImageNet configurations against torchvision's DenseNet ------------------------------------------

IMAGENET_CONFIGS = [
    ("densenet121", 32, (6, 12, 24, 16)),
    ("densenet169", 32, (6, 12, 32, 32)),
    ("densenet201", 32, (6, 12, 48, 32)),
    ("densenet161", 48, (6, 12, 36, 24)),
    ("densenet264", 32, (6, 12, 64, 48)),
]


def _torchvision_with_cifar_stem(growth_rate: int, blocks: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision's DenseNet with its ImageNet stem (conv0 7x7/2, norm0, relu0, pool0) replaced by ours: one
    bias-free 3x3/1 conv to 2k channels, nothing after it. Everything else is torchvision's own build."""
    model = torchvision.models.DenseNet(growth_rate=growth_rate, block_config=blocks,
                                        num_init_features=2 * growth_rate, num_classes=num_classes)
    model.features.conv0 = nn.Conv2d(3, 2 * growth_rate, kernel_size=3, padding=1, bias=False)
    for name in ("norm0", "relu0", "pool0"):
        setattr(model.features, name, nn.Identity())
    return model


@pytest.mark.slow  # builds and runs five ImageNet-sized DenseNets twice (ours and torchvision's)
@pytest.mark.parametrize(("name", "growth_rate", "blocks"), IMAGENET_CONFIGS)
def test_imagenet_configs_match_torchvision(name: str, growth_rate: int, blocks: tuple[int, ...]) -> None:
    """Checks, for each ImageNet block configuration (DenseNet-264: torchvision.models.DenseNet(growth_rate=32,
    block_config=(6, 12, 64, 48), num_init_features=64)):

    1. at the default k and 10 and 100 classes, ours has exactly as many parameters (numel) as torchvision's
       DenseNet with the stem swap of ``_torchvision_with_cifar_stem``: torchvision's own count minus
       (7*7 - 3*3) * 3 * 2k for the smaller stem kernel and 2 * 2k for norm0;
    2. at k = 4 (a small network of the same block layout), torchvision's state dict, with ``norm5`` renamed
       ``norm_final``, loads strictly into ours, and the eval-mode logits then agree exactly.
    """
    for num_classes in (10, 100):
        with torch.device("meta"):
            ours = zoo.count_params(zoo.create_model(name, num_classes=num_classes))
            theirs = zoo.count_params(_torchvision_with_cifar_stem(growth_rate, blocks, num_classes))
            imagenet = zoo.count_params(torchvision.models.DenseNet(growth_rate, blocks, 2 * growth_rate,
                                                                    num_classes=num_classes))
        assert ours == theirs == imagenet - (7 * 7 - 3 * 3) * 3 * 2 * growth_rate - 2 * 2 * growth_rate

    torch.manual_seed(0)
    reference = _torchvision_with_cifar_stem(4, blocks, 10).eval()
    model = zoo.create_model(name, growth_rate=4).eval()
    for m in reference.modules():  # non-trivial running statistics, so eval mode exercises them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.load_state_dict({k.replace("features.norm5.", "features.norm_final."): v
                           for k, v in reference.state_dict().items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
