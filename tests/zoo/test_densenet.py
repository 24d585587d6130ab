"""DenseNet: transition widths under compression, memory-efficient equivalence, hyperparameter rules."""
from __future__ import annotations

from decimal import Decimal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.densenet import DenseBlock, Transition


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
