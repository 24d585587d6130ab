"""The step mechanics fit() drives (and experiments/bench.py measures): optimizer, learning-rate schedule,
Trainer, StepMeter, and the splits and loaders a run trains and evaluates on."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments.config import OptimizerConfig, Recipe, ScheduleConfig
from experiments.data import ArrayDataset, DatasetBundle, DeviceLoader, class_balanced_subset, split_train_val
from experiments.errors import UserError

FINITE_CHECK_EVERY = 25  # steps between host syncs that look for a non-finite loss


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.decay_norm_and_bias:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:  # 1-D tensors are norm scales/shifts and biases
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    fused = device.type == "cuda"  # same update math, one kernel
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), fused=fused or None)


def lr_factor(schedule: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base lr for the update at ``step`` (0-based) out of ``total_steps``."""
    warmup = int(round(schedule.warmup_fraction * total_steps))
    if step < warmup:
        start = schedule.warmup_start_factor
        return start + (1.0 - start) * step / warmup
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "multistep":
        passed = sum(step >= int(round(m * total_steps)) for m in schedule.milestones)
        return schedule.gamma ** passed
    # cosine and onecycle: cosine from 1 down to min_lr_factor after the warm-up
    t = (step - warmup) / max(1, total_steps - warmup)
    return schedule.min_lr_factor + (1.0 - schedule.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step, total_steps))


# ----------------------------------------------------------------------------------------------
# Trainer and StepMeter
# ----------------------------------------------------------------------------------------------

class Trainer:
    """Model + optimizer + schedule + loss on one device, with bf16 autocast / channels_last / compile."""

    def __init__(self, model: nn.Module, recipe: Recipe, device: torch.device, total_steps: int, *,
                 amp: bool, channels_last: bool, compile: bool, distributed: bool = False):
        self.device = device
        self.recipe = recipe
        if distributed and device.type == "cuda":
            # One BatchNorm over the global batch keeps the recipe's math identical to one process.
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        train_module: nn.Module = self.model
        if distributed:
            train_module = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(train_module) if compile else train_module
        # Evaluation runs the same weights on every rank without collectives.
        self.eval_forward = self.forward if not distributed else self.model
        self.optimizer = build_optimizer(self.model, recipe.optimizer, device)
        self.scheduler = build_scheduler(self.optimizer, recipe.schedule, total_steps)
        self.amp = amp
        self.aux_weight = recipe.aux_loss_weight
        self.label_smoothing = recipe.label_smoothing

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def loss(self, out: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, main logits). A tuple output in training mode is (main, *auxiliary classifiers)."""
        if isinstance(out, torch.Tensor):
            return F.cross_entropy(out, y, label_smoothing=self.label_smoothing), out
        main, *aux = out
        loss = F.cross_entropy(main, y, label_smoothing=self.label_smoothing)
        for a in aux:
            loss = loss + self.aux_weight * F.cross_entropy(a, y, label_smoothing=self.label_smoothing)
        return loss, main

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update; returns (summed loss, number correct) as device tensors (no host sync)."""
        with self.autocast():
            loss, logits = self.loss(self.forward(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        label = y if y.ndim == 1 else y.argmax(1)  # MixUp's soft targets count as their larger share
        return loss.detach() * y.shape[0], (logits.argmax(1) == label).sum()

    @torch.inference_mode()  # no autograd bookkeeping at all (lighter than no_grad)
    def evaluate(self, loader: DeviceLoader, max_batches: int | None = None) -> tuple[float, float]:
        """(mean loss, accuracy %) over every sample of an eval-mode loader (its first ``max_batches`` batches
        if given), in the training's precision and memory layout; the only host syncs are at the end."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        for b, (x, y, valid) in enumerate(loader):
            if b == max_batches:
                break
            with self.autocast():
                logits = self.eval_forward(x)
            logits, y = logits[:valid].float(), y[:valid]
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            n += valid
        self.model.train()
        return loss_sum.item() / n, 100.0 * correct.item() / n


class StepMeter:
    """Runs Trainer.train_step and sums loss and correct predictions on the device; the only host sync is
    a look at the loss sum every FINITE_CHECK_EVERY steps, which clears ``finite`` if it is not."""

    def __init__(self, trainer: Trainer, loss_sum: float = 0.0, correct: int = 0):
        self.trainer = trainer
        self.loss_sum = torch.tensor(loss_sum, device=trainer.device, dtype=torch.float64)
        self.correct = torch.tensor(correct, device=trainer.device, dtype=torch.int64)
        self.steps = 0
        self.finite = True

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        step_loss, step_correct = self.trainer.train_step(x, y)
        self.loss_sum += step_loss
        self.correct += step_correct
        self.steps += 1
        if self.steps % FINITE_CHECK_EVERY == 0:
            self.finite = self.finite and bool(torch.isfinite(self.loss_sum))


# ----------------------------------------------------------------------------------------------
# Splits and loaders
# ----------------------------------------------------------------------------------------------

@dataclass
class Splits:
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


def make_splits(bundle: DatasetBundle, recipe: Recipe, seed: int) -> Splits:
    if recipe.val_size >= len(bundle.train):
        raise UserError(f"val_size {recipe.val_size} leaves no training images ({len(bundle.train)} in {bundle.source})")
    train, val = split_train_val(bundle.train, recipe.val_size, seed)
    if recipe.subset is not None:
        if recipe.subset > len(train):
            raise UserError(f"--subset {recipe.subset} is larger than the {len(train)} training images left after validation")
        train = class_balanced_subset(train, recipe.subset)
    return Splits(train, val, bundle.test)


def train_loader(ds: ArrayDataset, recipe: Recipe, batch_size: int, generator: torch.Generator, *,
                 device: torch.device, mean: Sequence[float], std: Sequence[float], channels_last: bool,
                 shard: tuple[int, int] = (0, 1), num_classes: int | None = None) -> DeviceLoader:
    """The training batches of fit(): the recipe's crop (or resize and crop), flip and MixUp (over
    ``num_classes``), on the device, in ``generator``'s order."""
    padding = recipe.augment.crop_padding if recipe.augment.random_crop else 0
    return DeviceLoader(ds, batch_size, train=True, crop_padding=padding, hflip=recipe.augment.hflip,
                        generator=generator, shard=shard, device=device, mean=mean, std=std,
                        channels_last=channels_last, resize=recipe.resize.sides(), mixup_alpha=recipe.mixup_alpha,
                        num_classes=num_classes, epoch_size=recipe.epoch_steps and recipe.epoch_steps * batch_size)
