"""A campaign file: its keys, checked before anything trains, and the cells it names (one training run each).

    name: cifar10-cpu                 # optional, default the file's stem
    experiment: campaign-cifar10-cpu  # optional, default campaign-NAME
    architectures: [resnet20, "densenet_bc:depth=40,growth_rate=12"]   # run.py's --arch grammar, per entry
    datasets: [cifar10]
    seeds: [0, 1, 2]
    recipe: fast                      # a preset name or a .yaml path
    recipe_overrides: {epochs: 30}    # optional, any recipe field (dotted keys for nested ones)

Optional: data_dir (./data), tracking_uri ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db), output_dir
(./outputs: checkpoints), report_dir (analysis/figures), device (auto), log_model (true). Relative paths are
relative to the current directory, as for run.py's flags.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from experiments import names
from experiments.config import (
    NUM_CLASSES,
    Recipe,
    RunConfig,
    apply_overrides,
    check_seed,
    load_recipe,
    parse_arch_spec,
    read_yaml_mapping,
)
from experiments.errors import UserError

REQUIRED = ("architectures", "datasets", "seeds", "recipe")
OPTIONAL = {"name": None, "experiment": None, "recipe_overrides": {}, "data_dir": "./data", "tracking_uri": None,
            "output_dir": "./outputs", "report_dir": "analysis/figures", "device": "auto", "log_model": True}
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Cell:
    """One (architecture, model arguments, dataset, seed): trained exactly once under the campaign's recipe."""

    arch: str
    model: dict[str, Any]  # the arguments the campaign gives
    hparams: dict[str, Any]  # what the model is built with: the zoo's defaults updated by ``model``
    label: str  # the architecture and its non-default arguments (experiments.config.arch_label)
    dataset: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.label}/{self.dataset}/seed{self.seed}"

    def model_params(self) -> dict[str, str]:
        """The ``model.*`` MLflow params that fit() logs for this cell's model."""
        return {f"{names.MODEL_PARAM_PREFIX}{k}": str(v) for k, v in self.hparams.items()}


@dataclass(frozen=True)
class Campaign:
    name: str
    experiment: str
    recipe: Recipe
    cells: tuple[Cell, ...]
    data_dir: str
    tracking_uri: str
    output_dir: str
    report_dir: str
    device: str = "auto"
    log_model: bool = True
    info: dict[str, dict[str, int]] = field(default_factory=dict)  # cell key -> params/FLOPs

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(c.dataset for c in self.cells))

    def run_config(self, cell: Cell) -> RunConfig:
        return RunConfig(arch=cell.arch, recipe=self.recipe, model=cell.model, dataset=cell.dataset,
                         data_dir=self.data_dir, seed=cell.seed, device=self.device, output_dir=self.output_dir)

    def cell(self, key: str) -> Cell:
        return next(c for c in self.cells if c.key == key)

    def fingerprint(self, digests: dict[str, str]) -> dict[str, Any]:
        """What the campaign's study holds it to: its recipe, its cells and the content of its datasets."""
        return {"recipe": f"{self.recipe.name} ({self.recipe.hash()})", "cells": [c.key for c in self.cells],
                "data": {d: digests[d] for d in self.datasets}}


@dataclass(frozen=True)
class Settings:
    """What every process of a campaign command shares (handed to the worker processes as it is)."""

    campaign: Campaign
    storage: str  # a journal file path or a postgresql:// URL
    heartbeat: int  # seconds, PostgreSQL only
    workers: int
    gpus: tuple[str, ...]  # one worker per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES)
    verbose: bool = False  # MLflow's own INFO messages shown (every process)


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def load_campaign(path: str | Path) -> Campaign:
    """Read and check a campaign file: every key, the recipe and every cell's model (on the meta device)."""
    from experiments.tracking import default_tracking_uri, normalize_uri

    raw = _read_mapping(Path(path))
    where = f"campaign {path}"
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; keys: {', '.join([*REQUIRED, *OPTIONAL])}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise UserError(f"{where}: missing key {missing[0]!r}")
    spec = OPTIONAL | raw
    name = _text(spec["name"] or Path(path).stem, f"{where}: name")
    if spec["device"] not in DEVICES:
        raise UserError(f"{where}: device must be one of {', '.join(DEVICES)}, got {spec['device']!r}")
    if not isinstance(spec["log_model"], bool):
        raise UserError(f"{where}: log_model must be true or false, got {spec['log_model']!r}")
    recipe = _recipe(spec, where)
    cells, info = _cells(spec, recipe, where)
    uri = spec["tracking_uri"]
    return Campaign(
        name=name, experiment=_text(spec["experiment"] or f"campaign-{name}", f"{where}: experiment"), recipe=recipe,
        cells=cells, data_dir=_text(spec["data_dir"], f"{where}: data_dir"),
        tracking_uri=normalize_uri(_text(uri, f"{where}: tracking_uri")) if uri else default_tracking_uri(),
        output_dir=_text(spec["output_dir"], f"{where}: output_dir"),
        report_dir=_text(spec["report_dir"], f"{where}: report_dir"), device=spec["device"],
        log_model=spec["log_model"], info=info)


def _read_mapping(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "campaign file", "campaign keys")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _listed(value: Any, where: str) -> list[Any]:
    """A list, or one value standing for a list of one."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise UserError(f"{where} must not be empty")
    return items


def _recipe(spec: dict[str, Any], where: str) -> Recipe:
    recipe = load_recipe(_text(spec["recipe"], f"{where}: recipe"))
    overrides = spec["recipe_overrides"] or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{where}: recipe_overrides must be a mapping of recipe fields, got {overrides!r}")
    return apply_overrides(recipe, overrides) if overrides else recipe


def _cells(spec: dict[str, Any], recipe: Recipe, where: str) -> tuple[tuple[Cell, ...], dict[str, dict[str, int]]]:
    """Every (architecture, dataset, seed), architectures first in the order given; each model is built
    once per dataset on the meta device, so that a bad name or argument fails now."""
    from experiments.run import (
        plan_run,  # imports the zoo (torch): after the cheap checks above
    )

    archs = [entry for text in _listed(spec["architectures"], f"{where}: architectures")
             for entry in parse_arch_spec(_text(text, f"{where}: architectures"), f"{where}: architectures")]
    datasets = _listed(spec["datasets"], f"{where}: datasets")
    for d in datasets:
        if d not in NUM_CLASSES:
            raise UserError(f"{where}: unknown dataset {d!r}; choose from {', '.join(NUM_CLASSES)}")
    seeds = _listed(spec["seeds"], f"{where}: seeds")
    for s in seeds:
        check_seed(s, f"{where}: seed")
    cells: dict[str, Cell] = {}
    info: dict[str, dict[str, int]] = {}
    for arch, model in archs:
        for dataset in datasets:
            planned = plan_run(RunConfig(arch=arch, recipe=recipe, model=model, dataset=dataset))
            for seed in seeds:
                cell = Cell(arch, model, planned.hparams, planned.label, dataset, seed)
                if cell.key in cells:
                    raise UserError(f"{where}: cell {cell.key} is listed twice")
                cells[cell.key], info[cell.key] = cell, planned.info
    return tuple(cells.values()), info
