"""What every process of a sweep shares: its settings, checked once from the command line and handed to the
worker processes as they are, the search-space interface the generic sweep code relies on, and the Optuna
sampler and pruner the settings choose."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import optuna

from experiments.config import RunConfig
from experiments.tracking import TrackingStore


class Column(NamedTuple):
    """A hyperparameter's column in the result table, e.g. ``θ`` for ``compression`` with 3 decimals."""

    header: str
    key: str
    width: int
    precision: str = ""  # a format spec's precision and type, e.g. ".3f"


class Space(Protocol):
    """A search space as the generic sweep code sees it; sweeps/space.py has DenseNet-BC's."""

    columns: ClassVar[tuple[Column, ...]]  # how the result table and the progress lines show a point
    contour: ClassVar[tuple[str, tuple[str, str]]]  # the contour plot's name and its two parameters

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]: ...  # the trial's model hyperparameters
    def model_kwargs(self, params: dict[str, Any]) -> dict[str, Any]: ...  # the same, from a finished trial
    def default_params(self) -> dict[str, Any] | None: ...  # a reference point to train first, if any
    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SweepSettings:
    run: RunConfig  # every trial's training run but its model hyperparameters, which the space suggests
    space: Space
    study_name: str
    trials: int  # the study's total across workers, machines and restarts
    objective: str  # val_acc | pareto
    sampler: str  # tpe | nsga2 | random
    pruner: str | None  # median | hyperband | none; None: median under val_acc
    max_params: int | None  # points with more parameters are rejected untrained
    retrain_best: bool
    storage: str  # a journal file path or a postgresql:// URL
    heartbeat: int  # seconds, PostgreSQL only
    workers: int  # processes on this machine
    tracking_uri: str | None  # None: --no-tracking
    experiment: str

    @property
    def multi(self) -> bool:
        return self.objective == "pareto"

    @property
    def directions(self) -> list[str]:
        return ["maximize", "minimize"] if self.multi else ["maximize"]

    def tracking_store(self) -> TrackingStore | None:
        return TrackingStore(self.tracking_uri, self.experiment) if self.tracking_uri else None


def hp_text(space: Space, hp: dict[str, Any]) -> str:
    """``(depth 40, k 12, θ 0.500)``: a point as the progress lines show it."""
    return "(" + ", ".join(f"{c.header} {hp[c.key]:{c.precision}}" for c in space.columns) + ")"


def make_sampler(s: SweepSettings, seed: int) -> optuna.samplers.BaseSampler:
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "nsga2":
        # Optuna's default population of 50 would leave a sweep of a few dozen trials pure random search.
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, s.trials // 4)))
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(s: SweepSettings) -> optuna.pruners.BasePruner:
    if s.multi or s.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=s.run.recipe.epochs, reduction_factor=3)
    # The first quarter of a schedule (warm-up, high lr) says little about the final accuracy.
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=s.run.recipe.epochs // 4)
