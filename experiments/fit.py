"""fit(): the one training loop behind run.py, the sweeps and the benchmarks.

fit() reads top to bottom: prepare -> data -> model -> epochs -> record. One epoch: train (device-resident
batches) -> evaluate val/test -> checkpoint (atomic) -> log to the tracker -> per-epoch callbacks. Model
selection uses validation accuracy only; test accuracy is recorded every epoch but never chooses anything.
One Recorder makes every tracker call and writes every checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from tqdm import tqdm

import zoo
from experiments import checkpoint as ckpt_io
from experiments import names, transfer
from experiments.config import RunConfig, flatten, load_recipe
from experiments.data import DatasetBundle, DeviceLoader, load_dataset
from experiments.errors import Interrupted, NonFiniteLoss, UserError
from experiments.monitor import (QUICKSTART, QUICKSTART_AFTER_SECONDS, QUICKSTART_ARCH, RunLength, divergence,
                                 estimate_line, eval_batches_left, preview_line, quickstart_line)
from experiments.resume import (Checkpoint, PartialEpoch, Progress, check_compatible, check_same_data,
                                pin_legacy_speed)
from experiments.runtime import (COMPILE_COSTS, DistEnv, any_rank, cpu_heap_policy, graceful_signals, process_group,
                                 rank_seed, resolve_device, seed_everything, speed_settings)
from experiments.tracking import Tracker, environment_tags
from experiments.trainer import FINITE_CHECK_EVERY, Splits, StepMeter, Trainer, make_splits, train_loader

# A callback sees (epoch, metrics) after each epoch; returning True stops training early
# (the run then ends KILLED with stop_reason=callback, e.g. an Optuna prune).
EpochCallback = Callable[[int, dict[str, float]], bool | None]

# Under torchrun, steps between the collective where ranks agree to stop on a signal (and reseed dropout).
RANK_SYNC_EVERY = FINITE_CHECK_EVERY
TRAIN_FLOPS_PER_FORWARD = 3  # a training step ~ forward + backward (gradients w.r.t. activations and weights)


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
    resume: dict[str, Any] | None = None  # a checkpoint as experiments.checkpoint.load returns it
    force_resume: bool = False
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None


def fit(cfg: RunConfig, tracker: Tracker | None = None, callbacks: Sequence[EpochCallback] = (),
        options: FitOptions | None = None, data: DatasetBundle | None = None) -> FitResult:
    """Train ``cfg.arch`` under ``cfg.recipe``; record everything in ``tracker``; checkpoint every epoch.

    Ends the tracker run FINISHED, KILLED (SIGTERM/Ctrl-C, or a callback stopped it) or FAILED
    (an exception, e.g. a non-finite loss); never leaves it RUNNING.
    """
    started = time.perf_counter()
    options = options or FitOptions()
    env = DistEnv.from_environ()
    device = resolve_device(cfg.device, env.local_rank)
    with cpu_heap_policy(device), process_group(env, device):
        # --- prepare: only rank 0 records, shows progress and writes checkpoints; a resumed run goes on
        # only under the architecture, recipe and model it started with ---
        if not env.main:
            tracker, options = Tracker(), dataclasses.replace(options, progress=False)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        resume = Checkpoint.from_dict(options.resume) if options.resume is not None else None
        forced = check_compatible(resume, cfg, options.force_resume) if resume is not None else []

        # --- data ---
        bundle = data or load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
        if resume is not None:
            forced += check_same_data(resume, bundle.digest, bundle.source, options.force_resume)
            cfg = pin_legacy_speed(cfg, device.type == "cuda")
        cfg, pinned = transfer.pin_weights(cfg, options.force_resume)  # fine-tuning: the weights' sha256
        forced += pinned

        # --- model (fresh, or as the checkpoint left it); its FLOPs settle whether compiling pays ---
        model, info = build_model(cfg, bundle.num_classes, bundle.train.images.shape[1:3])
        plan = make_plan(cfg, env, device, bundle, forward_flops=info["flops"])
        trainer = build_trainer(plan, model)
        batches = make_batches(plan, options.evaluate_test)
        progress = resume.restore(trainer, batches.generator) if resume is not None else Progress()

        # --- epochs -> record. SIGTERM / Ctrl-C from here on only set a flag: the run always ends KILLED
        # with a usable checkpoint ---
        recorder = Recorder(tracker or Tracker(), plan, info, options, started)
        forecast = Forecast(plan, trainer, batches, progress, recorder.say if env.main else None, info["flops"])
        with graceful_signals(announce=env.main) as pending, recorder.run(resume, model, forced):
            forecast.preview()  # a compiled run: an estimate now, before compilation takes minutes
            stopped = run_epochs(Session(plan, trainer, batches, progress, recorder, pending, forecast), callbacks)
            if pending:  # arrived after the last step: the final checkpoint is complete, --resume records the rest
                raise Interrupted(pending[0])
            return recorder.finish(trainer, progress, stopped)


# ----------------------------------------------------------------------------------------------
# prepare -> data -> model
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What fit() settles before it builds anything: where it runs, on which splits, for how many steps."""

    cfg: RunConfig  # amp, channels_last and compile resolved: what the run trains with
    env: DistEnv
    device: torch.device
    amp: bool
    channels_last: bool
    bundle: DatasetBundle
    splits: Splits
    steps_per_epoch: int
    total_steps: int
    compile_rule: str = ""  # why cfg.compile is what it is

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def warmup_epochs(self) -> int:
        """Epochs the learning-rate warm-up reaches into."""
        warmup_steps = round(self.cfg.recipe.schedule.warmup_fraction * self.total_steps)
        return math.ceil(warmup_steps / self.steps_per_epoch)

    def epoch_steps(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch)


def make_plan(cfg: RunConfig, env: DistEnv, device: torch.device, bundle: DatasetBundle,
              forward_flops: float = 0.0) -> Plan:
    """The splits and step counts, and the device defaults for the speed flags left None (compile by the
    rule in experiments.runtime.speed_settings, from ``forward_flops`` per image and the planned steps)."""
    splits = transfer.few_shot_splits(make_splits(bundle, cfg.recipe, cfg.seed), cfg.shots, cfg.seed)
    # BiT-HyperRule recipes take their schedule, MixUp and resolution from the training set here.
    cfg = dataclasses.replace(cfg, recipe=transfer.resolve_recipe(cfg.recipe, len(splits.train),
                                                                  bundle.train.images.shape[1:3]))
    recipe = cfg.recipe
    steps_per_epoch = recipe.epoch_steps or len(splits.train) // recipe.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"batch size {recipe.batch_size} is larger than the {len(splits.train)} training images")
    total_steps = recipe.max_steps if recipe.max_steps is not None else recipe.epochs * steps_per_epoch
    train_flops = TRAIN_FLOPS_PER_FORWARD * forward_flops * total_steps * recipe.batch_size / env.world
    speed = speed_settings(device, cfg.amp, cfg.channels_last, cfg.compile, train_flops)
    resolved = dataclasses.replace(cfg, amp=speed.amp, channels_last=speed.channels_last, compile=speed.compile)
    return Plan(resolved, env, device, amp=speed.amp, channels_last=speed.channels_last, bundle=bundle,
                splits=splits, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                compile_rule=speed.compile_rule)


def build_model(cfg: RunConfig, num_classes: int, image_shape: tuple[int, int] = (32, 32)
                ) -> tuple[nn.Module, dict[str, int]]:
    """The seeded model and its params/FLOPs per image at the size it trains on (BiT-HyperRule: 128x128)."""
    seed_everything(cfg.seed)
    try:
        model = zoo.create_model(cfg.arch, num_classes=num_classes, **cfg.model)
    except ValueError as e:  # unknown name or hyperparameters breaking the architecture's rules
        raise UserError(str(e)) from None
    transfer.load_pretrained(model, cfg)  # fine-tuning: the pretrained weights, head zeroed
    height, width = transfer.input_shape(cfg.recipe, image_shape)
    return model, zoo.model_info(model, (3, height, width)) | {"input_height": height, "input_width": width}


def build_trainer(plan: Plan, model: nn.Module) -> Trainer:
    """The Trainer for ``model`` under the plan's device, precision, layout and compile settings."""
    cfg = plan.cfg
    return Trainer(model, cfg.recipe, plan.device, plan.total_steps, amp=plan.amp, channels_last=plan.channels_last,
                   compile=cfg.compile, distributed=plan.env.world > 1)


@dataclass
class Batches:
    generator: torch.Generator  # the training order (and crops and flips); checkpointed
    train: DeviceLoader
    val: DeviceLoader | None
    test: DeviceLoader | None


def make_batches(plan: Plan, evaluate_test: bool) -> Batches:
    recipe, splits = plan.cfg.recipe, plan.splits
    generator = torch.Generator(device=plan.device)
    generator.manual_seed(plan.cfg.seed)
    mean, std = transfer.input_stats(plan.cfg, plan.bundle)  # pretrained weights expect their own
    kw = dict(device=plan.device, mean=mean, std=std, channels_last=plan.channels_last)
    shard = (plan.env.rank, plan.env.world)
    train = train_loader(splits.train, recipe, recipe.batch_size, generator, shard=shard,
                         num_classes=plan.bundle.num_classes, **kw)
    kw["resize"] = recipe.resize.sides()  # evaluation at the training crop's resolution
    val = DeviceLoader(splits.val, recipe.eval_batch_size, train=False, **kw) if len(splits.val) else None
    test = DeviceLoader(splits.test, recipe.eval_batch_size, train=False, **kw) if evaluate_test else None
    return Batches(generator, train, val, test)


# ----------------------------------------------------------------------------------------------
# record: the one place that talks to the tracker and writes checkpoints
# ----------------------------------------------------------------------------------------------

class Recorder:
    """The tracker run of one fit() and its checkpoints: the run's start, each epoch, its end."""

    def __init__(self, tracker: Tracker, plan: Plan, info: dict[str, int], options: FitOptions, started: float):
        self.tracker, self.plan, self.info, self.options = tracker, plan, info, options
        self.started = started  # time.perf_counter() when this session's fit() began
        self.wall_before = 0.0  # wall seconds of the run's earlier sessions
        self.main = plan.env.main
        self.say = print if self.main else (lambda *a, **k: None)
        self.show_progress = sys.stderr.isatty() if options.progress is None else options.progress
        self.run_id = ""
        self.out_dir = Path()
        self.status = "FAILED"

    @contextlib.contextmanager
    def run(self, resume: Checkpoint | None, model: nn.Module, forced: list[str]) -> Iterator[None]:
        """Start the tracker run (or reopen a resumed one) and end it FINISHED, KILLED or FAILED, whatever
        happens inside."""
        cfg, options = self.plan.cfg, self.options
        fresh = resume is None
        self.run_id = self.tracker.start(run_id=None if fresh else resume.run_id, run_name=options.run_name,
                                         tags={**environment_tags(self.plan.device), **options.tags} if fresh else None,
                                         parent_run_id=options.parent_run_id if fresh else None)
        self.out_dir = ckpt_io.run_dir(cfg.output_dir, self.run_id)
        self.status = "FAILED"
        try:
            if fresh:
                self._begin(model)
            else:
                self._reopen(resume, forced)
            self.say(self._header(), flush=True)
            if not fresh:
                self.say(self._resume_line(resume.progress), flush=True)
            yield
        except Interrupted as e:
            self.status = "KILLED"
            if self.main:
                print(f"\n[{cfg.arch}] {e} received: checkpoint written to {self.out_dir / ckpt_io.LAST}; "
                      f"resume with --resume {self.run_id}", file=sys.stderr, flush=True)
            raise
        except KeyboardInterrupt:
            self.status = "KILLED"
            raise
        except NonFiniteLoss as e:
            self.tracker.set_tags({names.FAILURE: str(e)})
            raise
        finally:
            self.tracker.end(self.status)

    def _begin(self, model: nn.Module) -> None:
        cfg, plan = self.plan.cfg, self.plan
        self.tracker.log_params(run_params(plan))
        self.tracker.log_metrics({names.PARAM_COUNT: self.info["params"], names.FLOPS: self.info["flops"]}, step=0)
        self.tracker.log_text(yaml.safe_dump(cfg.to_dict() | {names.RECIPE_HASH: cfg.recipe.hash()}, sort_keys=False),
                              "config.yaml")
        self.tracker.log_text(model_summary(model, self.info, cfg.arch), "model_summary.txt")
        contexts = {"train": "training", "test": "testing"}
        splits = (("train", plan.splits.train), ("validation", plan.splits.val), ("test", plan.splits.test))
        for split_name, ds in splits:
            if len(ds):
                self.tracker.log_dataset(f"{cfg.dataset}-{split_name}", plan.bundle.digest, plan.bundle.source,
                                         ds.images, ds.labels, context=contexts.get(split_name, split_name))

    def _reopen(self, resume: Checkpoint, forced: list[str]) -> None:
        if forced:
            self.tracker.set_tags({names.FORCED_RESUME: "; ".join(forced)})
        # Epochs checkpointed before a crash but never logged are logged now, once.
        logged = self.tracker.logged_steps(names.EPOCH_SECONDS)
        for row in resume.progress.history:
            if row["epoch"] not in logged:
                self.tracker.log_metrics(_logged(row), step=int(row["epoch"]))
        self.wall_before = resume.progress.wall_seconds
        if found := self._divergence(resume.progress):  # tagged again in case the crash came before the tag
            self.tracker.set_tags({names.DIVERGED: found[1]})

    def _resume_line(self, progress: Progress) -> str:
        plan = self.plan
        if progress.epoch >= plan.epochs:
            return (f"[{plan.cfg.arch}] resuming run {self.run_id} after its last epoch ({progress.epoch}/"
                    f"{plan.epochs}): recording its results")
        step = progress.partial.step if progress.partial else 0
        return (f"[{plan.cfg.arch}] resuming run {self.run_id} at epoch {progress.epoch + 1}/{plan.epochs}, "
                f"step {step}/{plan.epoch_steps(progress.epoch + 1)}")

    def _header(self) -> str:
        plan, cfg, info = self.plan, self.plan.cfg, self.info
        splits, world = plan.splits, plan.env.world
        return (f"[{cfg.arch}] {info['params']:,} params, {info['flops'] / 1e6:,.1f} MFLOPs/image | recipe "
                f"{cfg.recipe.name} ({cfg.recipe.hash()}) | {len(splits.train)} train / {len(splits.val)} val / "
                f"{len(splits.test)} test | {plan.epochs} epochs x {plan.steps_per_epoch} steps | "
                f"{plan.device.type}{' bf16' if plan.amp else ''}{' compiled' if cfg.compile else ''}"
                f"{f' x {world} processes' if world > 1 else ''} | "
                f"run {self.run_id}")

    def save_best(self, trainer: Trainer, epoch: int, val_acc: float) -> None:
        if self.main:
            cfg = self.plan.cfg
            ckpt_io.save_atomic({"model": trainer.model.state_dict(), "epoch": epoch, "val_acc": val_acc,
                                 "config": cfg.to_dict(), "arch": cfg.arch}, self.out_dir / ckpt_io.BEST)

    def save_last(self, trainer: Trainer, generator: torch.Generator, progress: Progress) -> None:
        progress.wall_seconds = self.wall_seconds()
        if self.main:
            cfg = self.plan.cfg
            ckpt = Checkpoint(run_id=self.run_id, arch=cfg.arch, recipe_hash=cfg.recipe.hash(), config=cfg.to_dict(),
                              model=trainer.model.state_dict(), optimizer=trainer.optimizer.state_dict(),
                              scheduler=trainer.scheduler.state_dict(), rng=ckpt_io.rng_state(generator),
                              progress=progress, tracking_uri=getattr(self.tracker, "uri", None),
                              data_digest=self.plan.bundle.digest)
            ckpt_io.save_atomic(ckpt.to_dict(), self.out_dir / ckpt_io.LAST)

    def end_epoch(self, row: dict[str, float], trainer: Trainer, generator: torch.Generator,
                  progress: Progress) -> None:
        """Checkpoint the finished epoch, then log and show its metrics."""
        self.save_last(trainer, generator, progress)
        self.tracker.log_metrics(_logged(row), step=int(row["epoch"]))
        self.say(epoch_line(self.plan.cfg.arch, self.plan.epochs, row), flush=True)
        found = self._divergence(progress)
        if found and found[0] == row["epoch"]:  # newly diverged: say it once; the run goes on (it is a result)
            self.tracker.set_tags({names.DIVERGED: found[1]})
            if self.main:
                print(f"warning: [{self.plan.cfg.arch}] the run looks diverged: {found[1]}; it trains on to the end, "
                      f"tagged {names.DIVERGED}", file=sys.stderr, flush=True)

    def _divergence(self, progress: Progress) -> tuple[int, str] | None:
        return divergence(progress.history, self.plan.bundle.num_classes, self.plan.warmup_epochs)

    def wall_seconds(self) -> float:
        """The run's wall time so far: its earlier sessions and this one."""
        return self.wall_before + time.perf_counter() - self.started

    def finish(self, trainer: Trainer, progress: Progress, stopped: bool) -> FitResult:
        """The summary metrics, the checkpoints and the model as artifacts; the run ends FINISHED (KILLED
        when a callback stopped it)."""
        progress.wall_seconds = self.wall_seconds()
        summary = summarize(progress, self.info)
        at_end = {k: v for k, v in summary.items() if k not in (names.PARAM_COUNT, names.FLOPS)}  # logged at the start
        self.tracker.log_metrics(at_end, step=0)
        if stopped:
            self.tracker.set_tags({names.STOP_REASON: "callback"})
        if self.options.log_checkpoints:
            for name in (ckpt_io.BEST, ckpt_io.LAST):
                if (self.out_dir / name).exists():
                    self.tracker.log_artifact(self.out_dir / name, "checkpoints")
        if self.options.log_model and not stopped:
            self.tracker.log_model(copy.deepcopy(trainer.model).cpu().float().eval(), (3, 32, 32))
        self.status = "KILLED" if stopped else "FINISHED"
        return FitResult(self.run_id, self.status, progress.history, summary, self.out_dir, stopped_early=stopped)


def _logged(row: dict[str, float]) -> dict[str, float]:
    """A row of the history as the tracker logs it (the epoch is the step)."""
    return {k: v for k, v in row.items() if k != "epoch"}


def run_params(plan: Plan) -> dict[str, Any]:
    """The flattened resolved config, as MLflow params."""
    cfg, bundle, splits = plan.cfg, plan.bundle, plan.splits
    defaults = zoo.model_defaults(cfg.arch) if not cfg.arch.startswith("timm:") else {}
    model_hp = {**defaults, **cfg.model}
    return {
        "arch": cfg.arch,
        "family": zoo.model_family(cfg.arch),
        "dataset": cfg.dataset,
        "recipe": cfg.recipe.name,
        names.RECIPE_HASH: cfg.recipe.hash(),
        "seed": cfg.seed,
        "epochs": plan.epochs,
        "total_steps": plan.total_steps,
        "batch_size": cfg.recipe.batch_size,
        **{f"{names.MODEL_PARAM_PREFIX}{k}": v for k, v in model_hp.items()},
        **flatten(cfg.recipe.content(), "recipe."),
        names.DATA_DIGEST: bundle.digest,
        "data.source": bundle.source,
        names.DATA_PREPROCESS: bundle.preprocess,
        "data.num_classes": bundle.num_classes,
        "data.train_size": len(splits.train),
        "data.val_size": len(splits.val),
        "data.test_size": len(splits.test),
        "device": plan.device.type,
        "amp": plan.amp,
        "channels_last": plan.channels_last,
        "compile": cfg.compile,
        names.COMPILE_RULE: plan.compile_rule,
        **transfer.run_params(cfg),
    }


def model_summary(model: nn.Module, info: dict[str, int], arch: str) -> str:
    lines = [f"{arch}: {info['params']:,} trainable parameters, {info['flops']:,} forward FLOPs per "
             f"3x{info['input_height']}x{info['input_width']} image "
             f"(torch.utils.flop_counter, 1 MAC = 2 FLOPs)", "", f"{'module':<40}{'params':>14}"]
    for name, child in model.named_children():
        lines.append(f"{name:<40}{sum(p.numel() for p in child.parameters()):>14,}")
    return "\n".join(lines + ["", repr(model)])


def summarize(progress: Progress, info: dict[str, int]) -> dict[str, float]:
    last = progress.history[-1] if progress.history else {}
    summary: dict[str, float] = {names.PARAM_COUNT: info["params"], names.FLOPS: info["flops"],
                                 names.TRAIN_SECONDS: progress.train_seconds, names.EVAL_SECONDS: progress.eval_seconds,
                                 names.WALL_SECONDS: progress.wall_seconds}
    for key, value in ((names.FINAL_TEST_ACC, last.get(names.TEST_ACC)), (names.FINAL_VAL_ACC, last.get(names.VAL_ACC)),
                       (names.BEST_VAL_ACC, progress.best_val_acc), (names.BEST_EPOCH, progress.best_epoch),
                       (names.TEST_ACC_AT_BEST_VAL, progress.best_test_acc)):
        if value is not None:
            summary[key] = value
    return summary


def epoch_line(arch: str, epochs: int, row: dict[str, float]) -> str:
    parts = [f"[{arch}] epoch {row['epoch']}/{epochs}", f"loss {row[names.TRAIN_LOSS]:.4f}",
             f"train {row[names.TRAIN_ACC]:.2f}%"]
    if names.VAL_ACC in row:
        parts.append(f"val {row[names.VAL_ACC]:.2f}%")
    if names.TEST_ACC in row:
        parts.append(f"test {row[names.TEST_ACC]:.2f}%")
    parts += [f"lr {row[names.LR]:.4g}", f"{row[names.EPOCH_SECONDS]:.1f}s",
              f"{row[names.IMAGES_PER_SECOND]:.0f} img/s"]
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------------
# epochs
# ----------------------------------------------------------------------------------------------

@dataclass
class Session:
    """What the epochs work on."""

    plan: Plan
    trainer: Trainer
    batches: Batches
    progress: Progress
    recorder: Recorder
    pending: list[int]  # signals received since graceful_signals() began
    forecast: Forecast


def run_epochs(s: Session, callbacks: Sequence[EpochCallback]) -> bool:
    """Train, evaluate and record the epochs still to run; True when a callback stopped the run early."""
    for epoch in range(s.progress.epoch + 1, s.plan.epochs + 1):
        row = {"epoch": epoch, **EpochTraining(s, epoch).run(), names.LR: s.trainer.scheduler.get_last_lr()[0]}
        if epoch % s.plan.cfg.recipe.eval_every == 0 or epoch == s.plan.epochs:
            evaluate(s, row)
        s.progress.finish_epoch(row)
        s.recorder.end_epoch(row, s.trainer, s.batches.generator, s.progress)
        if any(cb(epoch, row) for cb in callbacks):
            return True
    return False


def evaluate(s: Session, row: dict[str, float]) -> None:
    """Validation and test metrics into ``row``; a new best validation accuracy writes best.pt."""
    t0 = time.perf_counter()
    if s.batches.val is not None:
        row[names.VAL_LOSS], row[names.VAL_ACC] = s.trainer.evaluate(s.batches.val)
    if s.batches.test is not None:
        row[names.TEST_LOSS], row[names.TEST_ACC] = s.trainer.evaluate(s.batches.test)
    seconds = time.perf_counter() - t0  # evaluate() ends in a host sync: the device work is done
    s.progress.elapsed += seconds
    s.progress.eval_seconds += seconds
    if s.progress.update_best(row):
        s.recorder.save_best(s.trainer, int(row["epoch"]), row[names.VAL_ACC])


class EpochTraining:
    """One epoch's training; on SIGTERM/Ctrl-C it writes a mid-epoch checkpoint from which resume is exact.

    Under torchrun the ranks decide together, every RANK_SYNC_EVERY steps, whether a signal stops them (so
    all stop at the same step) and reseed their global RNG there, each with its own seed (so dropout masks
    differ between ranks and a resume at such a step draws the same masks as an uninterrupted run).
    """

    def __init__(self, s: Session, epoch: int):
        self.s, self.epoch = s, epoch
        self.steps = s.plan.epoch_steps(epoch)
        generator = s.batches.generator
        partial = s.progress.take_partial()
        if partial is None:
            partial = PartialEpoch(step=0, data_state=generator.get_state())
        else:
            generator.set_state(partial.data_state)
        self.partial = partial
        self.meter = StepMeter(s.trainer, partial.loss_sum, partial.correct)
        self.t0 = 0.0

    def run(self) -> dict[str, float]:
        """Train the epoch's remaining steps; its training metrics."""
        s, partial, world = self.s, self.partial, self.s.plan.env.world
        bs = s.batches.train.batch_size
        bar = tqdm(total=self.steps * bs, initial=partial.step * bs, unit="img", unit_scale=True, leave=False,
                   disable=not s.recorder.show_progress, desc=f"{s.plan.cfg.arch} {self.epoch}/{s.plan.epochs}",
                   dynamic_ncols=True)
        s.trainer.model.train()
        resume_rng = partial.torch_rng if world == 1 else None
        self.t0 = time.perf_counter()
        for step, (x, y) in enumerate(s.batches.train):
            if step >= self.steps:
                break
            if step < partial.step:
                continue  # replay the data RNG up to the interrupted step
            if resume_rng is not None:
                torch.set_rng_state(resume_rng)  # the global RNG (dropout) as it was at the interruption
                resume_rng = None
            if self._stop_at(step):
                self._checkpoint(step)
                bar.close()
                raise Interrupted(s.pending[0] if s.pending else signal.SIGTERM)  # a rank without the signal stops too
            self.meter.step(x, y)
            self._not_training(s.forecast.step_done(self.epoch, last=step == self.steps - 1))
            if not self.meter.finite:
                raise NonFiniteLoss(f"non-finite training loss at epoch {self.epoch} step {step + 1}; "
                                    f"lower the learning rate (--lr) or check the data")
            bar.update(bs)
        bar.close()
        return self._metrics(bs)

    def _not_training(self, seconds: float) -> None:
        """``seconds`` spent evaluating inside the epoch's loop: off its training clock, on evaluation's."""
        self.t0 += seconds
        self.s.progress.elapsed += seconds
        self.s.progress.eval_seconds += seconds

    def _stop_at(self, step: int) -> bool:
        s, env = self.s, self.s.plan.env
        if env.world == 1:
            return bool(s.pending)
        if step % RANK_SYNC_EVERY:
            return False
        stop = any_rank(bool(s.pending), s.trainer.device)
        torch.manual_seed(rank_seed(s.plan.cfg.seed, env.rank, self.epoch, step))
        return stop

    def _checkpoint(self, step: int) -> None:
        """The mid-epoch last.pt: the data order, the sums so far and the global RNG at ``step``."""
        s, meter = self.s, self.meter
        session = time.perf_counter() - self.t0
        s.progress.partial = dataclasses.replace(self.partial, step=step, loss_sum=meter.loss_sum.item(),
                                                 correct=meter.correct.item(), seconds=self.partial.seconds + session,
                                                 torch_rng=torch.get_rng_state())
        s.progress.elapsed += session
        s.recorder.save_last(s.trainer, s.batches.generator, s.progress)

    def _metrics(self, bs: int) -> dict[str, float]:
        s, meter = self.s, self.meter
        if s.trainer.device.type == "cuda":
            torch.cuda.synchronize()
        session = time.perf_counter() - self.t0
        seconds = self.partial.seconds + session
        s.progress.elapsed += session
        if s.plan.env.world > 1:  # each rank saw its shard of every global batch
            dist.all_reduce(meter.loss_sum)
            dist.all_reduce(meter.correct)
        total = meter.loss_sum.item()
        if not math.isfinite(total):
            raise NonFiniteLoss(f"non-finite training loss in epoch {self.epoch}; lower the learning rate (--lr) "
                                f"or check the data")
        n = self.steps * bs
        return {names.TRAIN_LOSS: total / n, names.TRAIN_ACC: 100.0 * meter.correct.item() / n,
                names.EPOCH_SECONDS: seconds, names.IMAGES_PER_SECOND: n / seconds if seconds > 0 else 0.0}


class Forecast:
    """Times this session's first training steps and prints, once, how long the rest of the run will take on
    this machine (training from the measured step time, evaluation from one timed evaluation batch) and, on
    the CPU beyond an hour, the quickstart's command with how long it would train here. A compiled run first
    prints a preview measured on an eager copy of the model, before compilation takes its minutes."""

    WARMUP_STEPS = 1  # a session's first step is slower (allocator and oneDNN warm-up, compilation)
    SAMPLE_STEPS, SAMPLE_SECONDS = 20, 20.0  # the estimate comes after this many timed steps or seconds
    PREVIEW_STEPS, PREVIEW_SECONDS = 2, 10.0  # the preview times this many eager steps, or fewer past these seconds

    def __init__(self, plan: Plan, trainer: Trainer, batches: Batches, progress: Progress,
                 say: Callable[..., None] | None, forward_flops: float = 0.0):
        self.plan, self.trainer, self.batches, self.say = plan, trainer, batches, say
        done = progress.epoch * plan.steps_per_epoch + (progress.partial.step if progress.partial else 0)
        self.steps_left = plan.total_steps - done  # at the start of this session
        self.first_epoch = progress.epoch + 1
        self.resumed = done > 0
        self.train_flops = TRAIN_FLOPS_PER_FORWARD * forward_flops  # per training image
        self.steps = 0
        self.t0 = 0.0
        self.active = say is not None  # only the main process reports
        self.offered = False  # the quickstart, offered once

    def preview(self) -> None:
        """Before a compiled run's first step: the estimate from eager steps (eager_step_seconds), compiled by
        the tabulated speed-up, plus the tabulated compile time. Nothing the run uses changes."""
        plan, cfg = self.plan, self.plan.cfg
        cost = COMPILE_COSTS.get(plan.device.type)  # no row: nothing measured to scale eager steps by
        # Under torchrun a rank alone in a SyncBatchNorm forward would wait for the others: no preview there.
        if not (self.active and cfg.compile and cost is not None and plan.env.world == 1 and self.steps_left > 0):
            return
        height, width = transfer.input_shape(cfg.recipe, plan.bundle.train.images.shape[1:3])  # what the loaders give
        step, eval_batch, timed = eager_step_seconds(
            self.trainer, (cfg.recipe.batch_size, 3, height, width), cfg.recipe.eval_batch_size,
            plan.bundle.num_classes, plan.channels_last, self.PREVIEW_STEPS, self.PREVIEW_SECONDS)
        length = self._length(self.first_epoch)
        seconds = cost.compile_seconds + length.seconds(step / cost.speedup, eval_batch / cost.speedup)
        eager_rate = cfg.recipe.batch_size / step
        self.say(f"[{cfg.arch}] {preview_line(length, seconds, eager_rate, timed, cost.speedup, cost.compile_seconds)}",
                 flush=True)
        self._offer_quickstart(seconds, eager_rate)

    def step_done(self, epoch: int, last: bool) -> float:
        """After each training step of the session (``last``: the epoch's last); reports once, in the first
        epoch. Returns the seconds it spent evaluating (for the estimate)."""
        if not self.active:
            return 0.0
        self.steps += 1
        timed = self.steps - self.WARMUP_STEPS
        spent = 0.0
        if timed == 0:
            self.t0 = _synced_now(self.trainer.device)
        elif timed >= self.SAMPLE_STEPS or last or time.perf_counter() - self.t0 >= self.SAMPLE_SECONDS:
            spent = self.report(epoch, (_synced_now(self.trainer.device) - self.t0) / timed)
        if last:
            self.active = False  # a sample across the evaluation in between would measure it too
        return spent

    def report(self, epoch: int, step_seconds: float) -> float:
        """Print the estimate; returns the seconds spent timing evaluation for it."""
        self.active = False
        t0 = time.perf_counter()
        plan, cfg = self.plan, self.plan.cfg
        length = self._length(epoch)
        seconds = length.seconds(step_seconds, self._eval_batch_seconds(self._eval_loaders()))
        rate = cfg.recipe.batch_size / step_seconds
        self.say(f"[{cfg.arch}] {estimate_line(length, seconds, rate)}", flush=True)
        cost = COMPILE_COSTS.get(plan.device.type)
        self._offer_quickstart(seconds, rate / cost.speedup if cfg.compile and cost else rate)
        return time.perf_counter() - t0

    def _eval_loaders(self) -> list[DeviceLoader]:
        return [loader for loader in (self.batches.val, self.batches.test) if loader is not None]

    def _length(self, epoch: int) -> RunLength:
        """What is left of the run from ``epoch`` on (this session's first, or the one being trained)."""
        plan, cfg = self.plan, self.plan.cfg
        per_eval = sum(len(loader) for loader in self._eval_loaders())
        return RunLength(train_steps=self.steps_left, batch_size=cfg.recipe.batch_size,
                         eval_batches=eval_batches_left(epoch, plan.epochs, cfg.recipe.eval_every, per_eval),
                         epochs=plan.epochs - epoch + 1, resumed=self.resumed)

    def _offer_quickstart(self, seconds: float, eager_images_per_second: float) -> None:
        """On the CPU, a run over QUICKSTART_AFTER_SECONDS is offered the quickstart, timed at this run's eager
        FLOP rate (the quickstart is too short to compile); once."""
        plan, cfg = self.plan, self.plan.cfg
        if (self.offered or seconds <= QUICKSTART_AFTER_SECONDS or plan.device.type != "cpu"
                or cfg.recipe.name == QUICKSTART):
            return
        self.offered = True
        line = quickstart_line(cfg.data_dir, cfg.dataset, quickstart_flops(plan.bundle),
                               eager_images_per_second * self.train_flops)
        self.say(f"[{cfg.arch}] {line}", flush=True)

    def _eval_batch_seconds(self, loaders: list[DeviceLoader]) -> float:
        """One evaluation batch, timed after an untimed one (warm-up, or the evaluation graph's compilation).
        Evaluation changes no state (eval mode, no gradients, no RNG), so the run's numbers stay the same."""
        if not loaders:
            return 0.0
        self.trainer.evaluate(loaders[0], max_batches=1)
        t0 = time.perf_counter()
        self.trainer.evaluate(loaders[0], max_batches=1)  # ends in a host sync (and back in train mode)
        return time.perf_counter() - t0


def eager_step_seconds(trainer: Trainer, batch_shape: tuple[int, int, int, int], eval_batch_size: int,
                       num_classes: int, channels_last: bool, steps: int, budget: float) -> tuple[float, float, int]:
    """(seconds of one eager forward + backward pass at ``batch_shape``, seconds of one evaluation forward of
    ``eval_batch_size`` images, passes timed): ``steps`` passes after an untimed warm-up one (fewer once
    ``budget`` seconds are spent), under the trainer's autocast, on a copy of its model and random data.
    Nothing the run uses changes: the copy has its own weights, gradients and BatchNorm buffers, the data
    comes from a private generator, fork_rng restores the global RNG (dropout), and nothing steps an optimizer."""
    device = trainer.device
    model = copy.deepcopy(trainer.model).train()  # the eager module, whatever torch.compile wraps around it
    layout = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator(device=device)
    generator.manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randn((n, *batch_shape[1:]), generator=generator, device=device).contiguous(memory_format=layout)

    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device.index or 0] if cuda else [], device_type="cuda" if cuda else None):
        x = images(batch_shape[0])
        y = torch.randint(num_classes, (batch_shape[0],), generator=generator, device=device)
        t0 = now = 0.0
        for i in range(steps + 1):
            with trainer.autocast():
                loss, _ = trainer.loss(model(x), y)
            loss.backward()
            model.zero_grad(set_to_none=True)
            now = _synced_now(device)
            if i == 0:
                t0 = now  # the first pass warms up (allocator, oneDNN primitives): not timed
            elif now - t0 >= budget:
                break
        timed = i
        model.eval()
        x = images(eval_batch_size)
        start = _synced_now(device)
        with torch.inference_mode(), trainer.autocast():
            model(x)
        return (now - t0) / timed, _synced_now(device) - start, timed


def quickstart_flops(bundle: DatasetBundle) -> float:
    """Training FLOPs of the quickstart (QUICKSTART_ARCH under the quickstart recipe) on ``bundle``'s data,
    counted on the meta device; 0 when its validation split leaves no training batch."""
    recipe = load_recipe(QUICKSTART)
    height, width = bundle.train.images.shape[1:3]
    forward = zoo.variant_info(QUICKSTART_ARCH, bundle.num_classes, (3, height, width))["flops"]
    images = recipe.subset or max(0, len(bundle.train) - recipe.val_size)
    steps = recipe.epoch_steps or images // recipe.batch_size
    return TRAIN_FLOPS_PER_FORWARD * forward * recipe.epochs * steps * recipe.batch_size


def _synced_now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
