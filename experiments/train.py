"""fit(): the one training loop behind run.py, the sweeps and the benchmarks.

Order of one epoch: train (device-resident batches) -> evaluate val/test -> checkpoint (atomic)
-> log to the tracker -> per-epoch callbacks. Model selection uses validation accuracy only;
test accuracy is recorded every epoch but never chooses anything.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from tqdm import tqdm

import zoo
from experiments import checkpoint as ckpt_io
from experiments.config import OptimizerConfig, Recipe, RunConfig, ScheduleConfig, flatten, recipe_from_dict
from experiments.data import ArrayDataset, DatasetBundle, DeviceLoader, class_balanced_subset, load_dataset, split_train_val
from experiments.errors import Interrupted, NonFiniteLoss, UserError
from experiments.tracking import Tracker, environment_tags

# A callback sees (epoch, metrics) after each epoch; returning True stops training early
# (the run then ends KILLED with stop_reason=callback, e.g. an Optuna prune).
EpochCallback = Callable[[int, dict[str, float]], bool | None]

FINITE_CHECK_EVERY = 25  # steps between host syncs that look for a non-finite loss
# Under torchrun, steps between the collective where ranks agree to stop on a signal (and reseed dropout).
RANK_SYNC_EVERY = FINITE_CHECK_EVERY




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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (CPU training, process-wide).

    By default every activation above 128 KiB is its own mmap, returned to the kernel when freed and
    faulted in page by page at the next step: on a 2-core CPU that spent about 40% of a DenseNet sweep's
    CPU time in the kernel. Heap-only allocation without trimming reuses the pages; the arithmetic is
    untouched. Returns False where there is no glibc (nothing changes).
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim(0)``); False without glibc.

    The counterpart of retain_freed_memory() once training ends: otherwise a process that goes on (a sweep
    worker between trials, or waiting for the other worker) keeps its largest model's peak resident. Two
    sweep workers on 24 GiB were OOM-killed that way.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> "DistEnv":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """NCCL on CUDA, Gloo on CPU; created (and destroyed) here unless the caller already made one."""
    create = env.world > 1 and not dist.is_initialized()
    if create:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if create:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Trainer: the step mechanics (also driven directly by experiments/bench.py)
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
        return loss.detach() * y.shape[0], (logits.argmax(1) == y).sum()

    @torch.no_grad()
    def evaluate(self, loader: DeviceLoader) -> tuple[float, float]:
        """(mean loss, accuracy %) over every sample of an eval-mode loader."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        for x, y, valid in loader:
            with self.autocast():
                logits = self.eval_forward(x)
            logits, y = logits[:valid].float(), y[:valid]
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            n += valid
        self.model.train()
        return loss_sum.item() / n, 100.0 * correct.item() / n


def train_loader(ds: ArrayDataset, recipe: Recipe, batch_size: int, generator: torch.Generator, *,
                 device: torch.device, mean: Sequence[float], std: Sequence[float], channels_last: bool,
                 shard: tuple[int, int] = (0, 1)) -> DeviceLoader:
    """The training batches of fit(): the recipe's crop and flip, on the device, in ``generator``'s order."""
    padding = recipe.augment.crop_padding if recipe.augment.random_crop else 0
    return DeviceLoader(ds, batch_size, train=True, crop_padding=padding, hflip=recipe.augment.hflip,
                        generator=generator, shard=shard, device=device, mean=mean, std=std,
                        channels_last=channels_last)


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


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any (a collective: every rank must call it)."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _rank_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """A seed of its own per rank and resumable position, so ranks draw different dropout masks."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{epoch}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# ----------------------------------------------------------------------------------------------
# fit()
# ----------------------------------------------------------------------------------------------

@dataclass
class FitResult:
    run_id: str
    status: str  # FINISHED | KILLED (stopped early by a callback)
    history: list[dict[str, float]]
    summary: dict[str, float]
    checkpoint_dir: Path
    stopped_early: bool = False


@dataclass
class FitOptions:
    """What a caller of fit() may switch; the recipe itself is never changed here."""

    evaluate_test: bool = True  # sweeps' trials never look at the test set
    log_model: bool = True
    log_checkpoints: bool = True
    progress: bool | None = None  # None: a bar only when stderr is a terminal
    resume: dict[str, Any] | None = None  # a checkpoint loaded with experiments.checkpoint.load
    force_resume: bool = False
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def graceful_signals() -> Iterator[list[int]]:
    """SIGTERM, SIGHUP (the terminal or SSH session closed) and the first Ctrl-C only set a flag, checked
    between steps; a second Ctrl-C aborts."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def handler(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and pending:
            raise KeyboardInterrupt
        pending.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield pending
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def model_summary(model: nn.Module, info: dict[str, int], arch: str) -> str:
    lines = [f"{arch}: {info['params']:,} trainable parameters, {info['flops']:,} forward FLOPs per 3x32x32 image "
             f"(torch.utils.flop_counter, 1 MAC = 2 FLOPs)", "", f"{'module':<40}{'params':>14}"]
    for name, child in model.named_children():
        lines.append(f"{name:<40}{sum(p.numel() for p in child.parameters()):>14,}")
    return "\n".join(lines + ["", repr(model)])


def run_params(cfg: RunConfig, bundle: DatasetBundle, splits: Splits, device: torch.device,
               amp: bool, channels_last: bool, epochs: int, total_steps: int) -> dict[str, Any]:
    """The flattened resolved config, as MLflow params."""
    defaults = zoo.model_defaults(cfg.arch) if not cfg.arch.startswith("timm:") else {}
    model_hp = {**defaults, **cfg.model}
    return {
        "arch": cfg.arch,
        "family": zoo.model_family(cfg.arch),
        "dataset": cfg.dataset,
        "recipe": cfg.recipe.name,
        "recipe_hash": cfg.recipe.hash(),
        "seed": cfg.seed,
        "epochs": epochs,
        "total_steps": total_steps,
        "batch_size": cfg.recipe.batch_size,
        **{f"model.{k}": v for k, v in model_hp.items()},
        **flatten({k: v for k, v in dataclasses.asdict(cfg.recipe).items() if k not in ("name", "description")},
                  "recipe."),
        "data.digest": bundle.digest,
        "data.source": bundle.source,
        "data.num_classes": bundle.num_classes,
        "data.train_size": len(splits.train),
        "data.val_size": len(splits.val),
        "data.test_size": len(splits.test),
        "device": device.type,
        "amp": amp,
        "channels_last": channels_last,
        "compile": cfg.compile,
    }


def fit(cfg: RunConfig, tracker: Tracker | None = None, callbacks: Sequence[EpochCallback] = (),
        options: FitOptions | None = None, data: DatasetBundle | None = None) -> FitResult:
    """Train ``cfg.arch`` under ``cfg.recipe``; record everything in ``tracker``; checkpoint every epoch.

    Ends the tracker run FINISHED, KILLED (SIGTERM/Ctrl-C, or a callback stopped it) or FAILED
    (an exception, e.g. a non-finite loss); never leaves it RUNNING.
    """
    options = options or FitOptions()
    env = DistEnv.from_environ()
    device = resolve_device(cfg.device, env.local_rank)
    if device.type == "cpu":
        retain_freed_memory()
    try:
        with process_group(env, device):
            return _fit(cfg, tracker or Tracker(), callbacks, options, data, env, device)
    finally:
        if device.type == "cpu":  # _fit's tensors are freed by now; give back what retain_freed_memory kept
            release_freed_memory()


def _fit(cfg: RunConfig, tracker: Tracker, callbacks: Sequence[EpochCallback], options: FitOptions,
         data: DatasetBundle | None, env: DistEnv, device: torch.device) -> FitResult:
    if not env.main:  # only rank 0 records, shows progress and writes checkpoints
        tracker, options = Tracker(), dataclasses.replace(options, progress=False)
    recipe = cfg.recipe
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    resume = options.resume
    forced = _check_resume_compatible(resume, cfg, options.force_resume) if resume is not None else []

    # --- data ---
    bundle = data or load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
    if resume is not None and resume.get("data_digest", bundle.digest) != bundle.digest:
        forced += _refuse_unless_forced(resume, [f"data {bundle.source} (sha256 {bundle.digest[:12]}) is not the data "
                                                 f"the run trained on ({resume['data_digest'][:12]})"],
                                        options.force_resume)
    splits = make_splits(bundle, recipe, cfg.seed)
    steps_per_epoch = len(splits.train) // recipe.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"batch size {recipe.batch_size} is larger than the {len(splits.train)} training images")
    total_steps = recipe.epochs * steps_per_epoch
    if recipe.max_steps is not None:
        total_steps = recipe.max_steps
    epochs = math.ceil(total_steps / steps_per_epoch)

    # --- model ---
    seed_everything(cfg.seed)
    try:
        model = zoo.create_model(cfg.arch, num_classes=bundle.num_classes, **cfg.model)
    except ValueError as e:  # unknown name or hyperparameters breaking the architecture's rules
        raise UserError(str(e)) from None
    info = zoo.model_info(model)
    trainer = Trainer(model, recipe, device, total_steps, amp=amp, channels_last=channels_last, compile=cfg.compile,
                      distributed=env.world > 1)

    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    loader_kw = dict(device=device, mean=bundle.mean, std=bundle.std, channels_last=channels_last)
    loader = train_loader(splits.train, recipe, recipe.batch_size, generator, shard=(env.rank, env.world), **loader_kw)
    val_loader = DeviceLoader(splits.val, recipe.eval_batch_size, train=False, **loader_kw) if len(splits.val) else None
    test_loader = (DeviceLoader(splits.test, recipe.eval_batch_size, train=False, **loader_kw)
                   if options.evaluate_test else None)

    # --- state (fresh or resumed) ---
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val_acc": None, "best_epoch": None,
                             "best_test_acc": None, "elapsed": 0.0, "partial": None}
    if resume is not None:
        trainer.model.load_state_dict(resume["model"])
        trainer.optimizer.load_state_dict(resume["optimizer"])
        trainer.scheduler.load_state_dict(resume["scheduler"])
        ckpt_io.set_rng_state(resume["rng"], generator)
        state.update({k: resume[k] for k in state})
    state["tracking_uri"] = getattr(tracker, "uri", None)  # so --resume finds the same store
    state["data_digest"] = bundle.digest
    say = print if env.main else (lambda *a, **k: None)
    # SIGTERM / Ctrl-C from here on only set a flag: the run always ends KILLED with a usable checkpoint.
    with graceful_signals() as pending:
        run_id = tracker.start(run_id=resume["run_id"] if resume else None, run_name=options.run_name,
                               tags=None if resume else {**environment_tags(device), **options.tags},
                               parent_run_id=None if resume else options.parent_run_id)
        out_dir = ckpt_io.run_dir(cfg.output_dir, run_id)
        status = "FAILED"
        try:
            if resume is None:
                tracker.log_params(run_params(cfg, bundle, splits, device, amp, channels_last, epochs, total_steps))
                tracker.log_metrics({"param_count": info["params"], "flops": info["flops"]}, step=0)
                tracker.log_text(yaml.safe_dump(cfg.to_dict() | {"recipe_hash": recipe.hash()}, sort_keys=False),
                                 "config.yaml")
                tracker.log_text(model_summary(model, info, cfg.arch), "model_summary.txt")
                for split_name, ds in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
                    if len(ds):
                        tracker.log_dataset(f"{cfg.dataset}-{split_name}", bundle.digest, bundle.source, ds.images,
                                            ds.labels, context={"train": "training", "test": "testing"}.get(split_name,
                                                                                                          split_name))
            else:
                if forced:
                    tracker.set_tags({"forced_resume": "; ".join(forced)})
                # Epochs checkpointed before a crash but never logged are logged now, once.
                logged = tracker.logged_steps("epoch_seconds")
                for row in state["history"]:
                    if row["epoch"] not in logged:
                        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
            say(f"[{cfg.arch}] {info['params']:,} params, {info['flops'] / 1e6:,.1f} MFLOPs/image | recipe {recipe.name} "
                f"({recipe.hash()}) | {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test | "
                f"{epochs} epochs x {steps_per_epoch} steps | {device.type}{' bf16' if amp else ''}"
                f"{f' x {env.world} processes' if env.world > 1 else ''} | run {run_id}", flush=True)

            stopped = False
            for epoch in range(state["epoch"] + 1, epochs + 1):
                epoch_steps = min(steps_per_epoch, total_steps - (epoch - 1) * steps_per_epoch)
                train_metrics = _train_epoch(trainer, loader, generator, epoch, epochs, epoch_steps,
                                             state, out_dir, cfg, pending, options.progress, env)
                row = {"epoch": epoch, **train_metrics, "lr": trainer.scheduler.get_last_lr()[0]}
                if epoch % recipe.eval_every == 0 or epoch == epochs:
                    t0 = time.perf_counter()
                    if val_loader is not None:
                        row["val_loss"], row["val_acc"] = trainer.evaluate(val_loader)
                    if test_loader is not None:
                        row["test_loss"], row["test_acc"] = trainer.evaluate(test_loader)
                    state["elapsed"] += time.perf_counter() - t0
                    if "val_acc" in row and (state["best_val_acc"] is None or row["val_acc"] > state["best_val_acc"]):
                        state["best_val_acc"], state["best_epoch"] = row["val_acc"], epoch
                        state["best_test_acc"] = row.get("test_acc")
                        if env.main:
                            ckpt_io.save_atomic({"model": trainer.model.state_dict(), "epoch": epoch,
                                                 "val_acc": row["val_acc"], "config": cfg.to_dict(),
                                                 "arch": cfg.arch}, out_dir / ckpt_io.BEST)
                state["epoch"] = epoch
                state["history"].append(row)
                if env.main:
                    _save_last(trainer, generator, state, cfg, run_id, out_dir)
                tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                say(_epoch_line(cfg.arch, epoch, epochs, row), flush=True)
                if any(cb(epoch, row) for cb in callbacks):
                    stopped = True
                    break
            if pending:  # arrived after the last step: the final checkpoint is complete, --resume records the rest
                raise Interrupted(pending[0])

            summary = _summary(state, info)
            tracker.log_metrics({k: v for k, v in summary.items() if k not in ("param_count", "flops")}, step=0)
            if stopped:
                tracker.set_tags({"stop_reason": "callback"})
            if options.log_checkpoints:
                for name in (ckpt_io.BEST, ckpt_io.LAST):
                    if (out_dir / name).exists():
                        tracker.log_artifact(out_dir / name, "checkpoints")
            if options.log_model and not stopped:
                tracker.log_model(copy.deepcopy(trainer.model).cpu().float().eval(), (3, 32, 32))
            status = "KILLED" if stopped else "FINISHED"
            return FitResult(run_id, status, state["history"], summary, out_dir, stopped_early=stopped)
        except Interrupted as e:
            status = "KILLED"
            if env.main:
                print(f"\n[{cfg.arch}] {e} received: checkpoint written to {out_dir / ckpt_io.LAST}; "
                      f"resume with --resume {run_id}", file=sys.stderr, flush=True)
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except NonFiniteLoss as e:
            tracker.set_tags({"failure": str(e)})
            raise
        finally:
            tracker.end(status)


def _train_epoch(trainer: Trainer, loader: DeviceLoader, generator: torch.Generator, epoch: int, epochs: int,
                 steps: int, state: dict[str, Any], out_dir: Path, cfg: RunConfig, pending: list[int],
                 progress: bool | None, env: DistEnv) -> dict[str, float]:
    """Train one epoch; on SIGTERM/Ctrl-C write a mid-epoch checkpoint from which resume is exact.

    Under torchrun the ranks decide together, every RANK_SYNC_EVERY steps, whether a signal stops them (so
    all stop at the same step) and reseed their global RNG there, each with its own seed (so dropout masks
    differ between ranks and a resume at such a step draws the same masks as an uninterrupted run).
    """
    partial = state.pop("partial", None)
    state["partial"] = None
    if partial is None:
        partial = {"step": 0, "data_state": generator.get_state(), "loss_sum": 0.0, "correct": 0,
                   "seconds": 0.0}
    else:
        generator.set_state(partial["data_state"])
    bs = loader.batch_size
    meter = StepMeter(trainer, partial["loss_sum"], partial["correct"])
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=steps * bs, initial=partial["step"] * bs, unit="img", unit_scale=True, leave=False,
               disable=not show, desc=f"{cfg.arch} {epoch}/{epochs}", dynamic_ncols=True)
    trainer.model.train()
    resume_rng = partial.get("torch_rng") if env.world == 1 else None
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        if step < partial["step"]:
            continue  # replay the data RNG up to the interrupted step
        if resume_rng is not None:
            torch.set_rng_state(resume_rng)  # the global RNG (dropout) as it was at the interruption
            resume_rng = None
        if env.world == 1:
            stop = bool(pending)
        elif step % RANK_SYNC_EVERY == 0:
            stop = _any_rank(bool(pending), trainer.device)
            torch.manual_seed(_rank_seed(cfg.seed, env.rank, epoch, step))
        else:
            stop = False
        if stop:
            elapsed = partial["seconds"] + time.perf_counter() - t0
            state["partial"] = {**partial, "step": step, "loss_sum": meter.loss_sum.item(),
                                "correct": meter.correct.item(), "seconds": elapsed, "torch_rng": torch.get_rng_state()}
            state["elapsed"] += time.perf_counter() - t0
            if env.main:
                _save_last(trainer, generator, state, cfg, out_dir.name, out_dir)
            bar.close()
            raise Interrupted(pending[0] if pending else signal.SIGTERM)  # a rank without the signal stops too
        meter.step(x, y)
        if not meter.finite:
            raise NonFiniteLoss(f"non-finite training loss at epoch {epoch} step {step + 1}; "
                                f"lower the learning rate (--lr) or check the data")
        bar.update(bs)
    bar.close()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = partial["seconds"] + time.perf_counter() - t0
    state["elapsed"] += time.perf_counter() - t0
    if env.world > 1:  # each rank saw its shard of every global batch
        dist.all_reduce(meter.loss_sum)
        dist.all_reduce(meter.correct)
    total = meter.loss_sum.item()
    if not math.isfinite(total):
        raise NonFiniteLoss(f"non-finite training loss in epoch {epoch}; lower the learning rate (--lr) or check the data")
    n = steps * bs
    return {"train_loss": total / n, "train_acc": 100.0 * meter.correct.item() / n, "epoch_seconds": seconds,
            "images_per_second": n / seconds if seconds > 0 else 0.0}


def _save_last(trainer: Trainer, generator: torch.Generator, state: dict[str, Any], cfg: RunConfig,
               run_id: str, out_dir: Path) -> None:
    ckpt_io.save_atomic({
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "rng": ckpt_io.rng_state(generator),
        "run_id": run_id,
        "arch": cfg.arch,
        "recipe_hash": cfg.recipe.hash(),
        "config": cfg.to_dict(),
        **{k: state.get(k) for k in ("epoch", "history", "best_val_acc", "best_epoch", "best_test_acc", "elapsed", "partial",
                                     "tracking_uri", "data_digest")},
    }, out_dir / ckpt_io.LAST)


def _check_resume_compatible(resume: dict[str, Any], cfg: RunConfig, force: bool) -> list[str]:
    """Refuse to continue a run under another architecture, recipe or model; returns what --force-resume let through."""
    saved = resume["config"]
    problems = []
    if resume["arch"] != cfg.arch:
        problems.append(f"architecture {resume['arch']} != {cfg.arch}")
    if resume["recipe_hash"] != cfg.recipe.hash():
        problems.append(f"recipe {saved['recipe']['name']} ({resume['recipe_hash']}) != {cfg.recipe.name} ({cfg.recipe.hash()})")
    if saved.get("model", {}) != cfg.model:
        problems.append(f"model hyperparameters {saved.get('model')} != {cfg.model}")
    return _refuse_unless_forced(resume, problems, force)


def _refuse_unless_forced(resume: dict[str, Any], problems: list[str], force: bool) -> list[str]:
    if problems and not force:
        raise UserError(f"refusing to resume run {resume['run_id']}: {'; '.join(problems)} (add --force-resume to override)")
    return problems


def saved_config(resume: dict[str, Any]) -> RunConfig:
    """The RunConfig a checkpoint was written with."""
    raw = dict(resume["config"])
    return RunConfig(**{**raw, "recipe": recipe_from_dict(raw["recipe"])})


def _summary(state: dict[str, Any], info: dict[str, int]) -> dict[str, float]:
    last = state["history"][-1] if state["history"] else {}
    summary: dict[str, float] = {"param_count": info["params"], "flops": info["flops"], "train_seconds": state["elapsed"]}
    for key, value in (("final_test_acc", last.get("test_acc")), ("final_val_acc", last.get("val_acc")),
                       ("best_val_acc", state["best_val_acc"]), ("best_epoch", state["best_epoch"]),
                       ("test_acc_at_best_val", state.get("best_test_acc"))):
        if value is not None:
            summary[key] = value
    return summary


def _epoch_line(arch: str, epoch: int, epochs: int, row: dict[str, float]) -> str:
    parts = [f"[{arch}] epoch {epoch}/{epochs}", f"loss {row['train_loss']:.4f}", f"train {row['train_acc']:.2f}%"]
    if "val_acc" in row:
        parts.append(f"val {row['val_acc']:.2f}%")
    if "test_acc" in row:
        parts.append(f"test {row['test_acc']:.2f}%")
    parts += [f"lr {row['lr']:.4g}", f"{row['epoch_seconds']:.1f}s", f"{row['images_per_second']:.0f} img/s"]
    return " | ".join(parts)
