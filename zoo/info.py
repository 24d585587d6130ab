"""Model complexity, measured from the module itself: parameters by ``numel``, FLOPs by tracing."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> int:
    """Forward FLOPs for ONE image in eval mode, traced with ``FlopCounterMode``.

    FlopCounterMode counts a multiply-accumulate as 2 FLOPs (so MACs = flops / 2) and covers
    convolutions, matmuls and linear layers; elementwise ops (BN, ReLU, pooling) are not counted.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(1, *input_size, device=device)
        with FlopCounterMode(display=False) as counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)


def model_info(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> dict[str, int]:
    """``params`` (trainable), ``total_params`` and ``flops`` for one image of ``input_size``.

    ``flops`` comes from ``torch.utils.flop_counter.FlopCounterMode``: 1 MAC = 2 FLOPs; ``macs``
    is given as ``flops // 2`` for readers used to MAC counts.
    """
    flops = count_flops(model, input_size)
    return {
        "params": count_params(model),
        "total_params": count_params(model, trainable_only=False),
        "flops": flops,
        "macs": flops // 2,
    }


def variant_info(name: str, num_classes: int, input_size: tuple[int, ...] = (3, 32, 32), **hparams) -> dict[str, int]:
    """``model_info`` of a registered variant built on the meta device: exact shapes and traced FLOPs with no
    memory and no initialisation cost, so huge variants count in milliseconds."""
    from zoo._registry import create_model  # the registry imports every family; keep this module a leaf

    with torch.device("meta"):
        return model_info(create_model(name, num_classes=num_classes, **hparams), input_size)
