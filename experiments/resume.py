"""What a run carries from one epoch to the next and across a restart: its progress and its checkpoint
(typed here, a flat dict of tensors and plain values on disk), and the checks before a run continues."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

from experiments import checkpoint as ckpt_io
from experiments import names
from experiments.config import RunConfig, recipe_from_dict
from experiments.errors import UserError
from experiments.trainer import Trainer


@dataclass
class PartialEpoch:
    """Where an interrupted epoch stopped: resuming replays its data order and continues its sums."""

    step: int
    data_state: torch.Tensor  # the data generator at the start of the epoch
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0
    torch_rng: torch.Tensor | None = None  # the global RNG (dropout) at ``step``

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Progress:
    """The run so far: finished epochs, their metrics and the best validation accuracy."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float | None = None
    best_epoch: int | None = None
    best_test_acc: float | None = None
    elapsed: float = 0.0  # training and evaluation seconds
    partial: PartialEpoch | None = None
    eval_seconds: float = 0.0  # evaluation alone (0 in checkpoints older than the split: elapsed holds it)
    wall_seconds: float = 0.0  # the run's sessions start to end, setup and recording included

    @property
    def train_seconds(self) -> float:
        """Training steps alone."""
        return self.elapsed - self.eval_seconds

    def take_partial(self) -> PartialEpoch | None:
        """The interrupted epoch to continue, if any; the progress no longer holds it."""
        partial, self.partial = self.partial, None
        return partial

    def update_best(self, row: Mapping[str, float]) -> bool:
        """Record ``row`` as the best epoch if its validation accuracy beats every earlier one; True if so."""
        if names.VAL_ACC not in row or (self.best_val_acc is not None and row[names.VAL_ACC] <= self.best_val_acc):
            return False
        self.best_val_acc, self.best_epoch = row[names.VAL_ACC], int(row["epoch"])
        self.best_test_acc = row.get(names.TEST_ACC)
        return True

    def finish_epoch(self, row: dict[str, float]) -> None:
        self.epoch = int(row["epoch"])
        self.history.append(row)


_PROGRESS_KEYS = ("epoch", "history", "best_val_acc", "best_epoch", "best_test_acc", "elapsed")
_TIMING_KEYS = ("eval_seconds", "wall_seconds")  # appended to the layout later: older checkpoints lack them


@dataclass
class Checkpoint:
    """One ``last.pt``: weights, optimizer, schedule, RNG, progress and where the run is recorded."""

    run_id: str
    arch: str
    recipe_hash: str
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    progress: Progress
    tracking_uri: str | None = None
    data_digest: str | None = None  # None in checkpoints older than the data check

    def to_dict(self) -> dict[str, Any]:
        """The on-disk layout (keys and order as every earlier version wrote them, then the timing keys)."""
        p = self.progress
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "rng": self.rng,
                "run_id": self.run_id, "arch": self.arch, "recipe_hash": self.recipe_hash, "config": self.config,
                **{k: getattr(p, k) for k in _PROGRESS_KEYS},
                "partial": p.partial.to_dict() if p.partial else None,
                "tracking_uri": self.tracking_uri, "data_digest": self.data_digest,
                **{k: getattr(p, k) for k in _TIMING_KEYS}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Checkpoint":
        partial = PartialEpoch(**d["partial"]) if d["partial"] else None
        progress = Progress(**{k: d[k] for k in _PROGRESS_KEYS}, partial=partial,
                            **{k: d[k] for k in _TIMING_KEYS if k in d})
        return cls(d["run_id"], d["arch"], d["recipe_hash"], d["config"], d["model"], d["optimizer"],
                   d["scheduler"], d["rng"], progress, d.get("tracking_uri"), d.get("data_digest"))

    def restore(self, trainer: Trainer, data_generator: torch.Generator) -> Progress:
        """Put weights, optimizer, schedule and every RNG back as they were; returns the run's progress."""
        trainer.model.load_state_dict(self.model)
        trainer.optimizer.load_state_dict(self.optimizer)
        trainer.scheduler.load_state_dict(self.scheduler)
        ckpt_io.set_rng_state(self.rng, data_generator)
        return self.progress


def pin_legacy_speed(cfg: RunConfig, on_cuda: bool) -> RunConfig:
    """A resumed config whose amp / channels_last is still None comes from a checkpoint written before the
    CPU speed defaults, when None meant "on for CUDA only": keep it on the numerics it started with (new
    checkpoints record the resolved values; a flag given at resume has already replaced None)."""
    return dataclasses.replace(cfg, amp=on_cuda if cfg.amp is None else cfg.amp,
                               channels_last=on_cuda if cfg.channels_last is None else cfg.channels_last)


def check_compatible(ckpt: Checkpoint, cfg: RunConfig, force: bool) -> list[str]:
    """Refuse to continue a run under another architecture, recipe or model; returns what --force-resume let through."""
    problems = []
    if ckpt.arch != cfg.arch:
        problems.append(f"architecture {ckpt.arch} != {cfg.arch}")
    if ckpt.recipe_hash != cfg.recipe.hash():
        problems.append(f"recipe {ckpt.config['recipe']['name']} ({ckpt.recipe_hash}) != {cfg.recipe.name} "
                        f"({cfg.recipe.hash()})")
    if ckpt.config.get("model", {}) != cfg.model:
        problems.append(f"model hyperparameters {ckpt.config.get('model')} != {cfg.model}")
    return refuse_unless_forced(ckpt, problems, force)


def check_same_data(ckpt: Checkpoint, digest: str, source: str, force: bool) -> list[str]:
    """Refuse to continue on other data than the run trained on (same content elsewhere is fine)."""
    if ckpt.data_digest is None or ckpt.data_digest == digest:
        return []
    return refuse_unless_forced(ckpt, [f"data {source} (sha256 {digest[:12]}) is not the data the run trained on "
                                       f"({ckpt.data_digest[:12]})"], force)


def refuse_unless_forced(ckpt: Checkpoint, problems: list[str], force: bool) -> list[str]:
    if problems and not force:
        raise UserError(f"refusing to resume run {ckpt.run_id}: {'; '.join(problems)} (add --force-resume to override)")
    return problems


def saved_config(resume: Mapping[str, Any]) -> RunConfig:
    """The RunConfig a checkpoint (as experiments.checkpoint.load returns it) was written with."""
    raw = dict(resume["config"])
    return RunConfig(**{**raw, "recipe": recipe_from_dict(raw["recipe"])})
