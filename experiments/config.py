"""Typed, frozen configuration: recipes (YAML presets) and the resolved run config.

A recipe fully specifies the training protocol (optimizer, schedule, duration, batch size,
augmentation, label smoothing, data split, evaluation). Its hash covers every field but the
name and the free-text description, so two runs with the same hash were trained the same way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from experiments.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
# YAML 1.1 (PyYAML) reads 1e-4 as a string: only 1.0e-4 is a float there.
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
MAX_SEED = 2**32  # numpy's legacy seeding takes seeds in [0, 2**32)
TIMM_PREFIX = "timm:"  # zoo._registry.TIMM_PREFIX: a timm model's name in the zoo (the zoo imports torch)
# Dataset names and class counts, here (torch-free) so the CLIs can offer them without importing torch;
# experiments.data reads the files. svhn-extra is SVHN with its 531,131 extra images added to training.
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "svhn-extra": 10, "mnist": 10, "fashion-mnist": 10}


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9  # SGD momentum, or AdamW beta1
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = True  # False: no weight decay on norm weights and biases (1-D params)


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, updated every iteration. Positions are fractions of all training steps."""

    name: str = "cosine"  # cosine | multistep | onecycle | constant
    milestones: tuple[float, ...] = ()  # multistep: fractions of total steps where lr *= gamma
    gamma: float = 0.1
    warmup_fraction: float = 0.0  # linear warm-up from lr * warmup_start_factor over this fraction
    warmup_start_factor: float = 0.0
    min_lr_factor: float = 0.0  # cosine/onecycle end at lr * min_lr_factor


@dataclass(frozen=True)
class AugmentConfig:
    random_crop: bool = True
    crop_padding: int = 4
    hflip: bool = True


@dataclass(frozen=True)
class ResizeConfig:
    """Training: resize to ``precrop`` x ``precrop``, random ``crop`` x ``crop`` crop (then the recipe's flip);
    evaluation: resize to ``crop`` x ``crop``. 0 = images keep their size (BiT-HyperRule: 160 and 128)."""

    precrop: int = 0
    crop: int = 0

    def sides(self) -> tuple[int, int] | None:
        return (self.precrop, self.crop) if self.crop else None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    epochs: int = 200
    max_steps: int | None = None  # iteration budget (resnet-paper); the last epoch stops at it
    batch_size: int = 128
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    label_smoothing: float = 0.0
    aux_loss_weight: float = 0.3  # weight of auxiliary classifier losses (GoogLeNet, Inception)
    val_size: int = 5000  # held out from the training set, stratified, fixed by the seed
    subset: int | None = None  # class-balanced first N training images (after the validation split)
    eval_batch_size: int = 500
    eval_every: int = 1  # epochs between evaluations; the last epoch is always evaluated
    # Fields added later: left out of the hash at their defaults, so earlier recipes keep their hashes.
    mixup_alpha: float = 0.0  # MixUp with lambda ~ Beta(alpha, alpha), one lambda per batch; 0 = off
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    epoch_steps: int | None = None  # steps per epoch (None: one pass); a smaller training set is repeated
    hyperrule: bool = False  # BiT-HyperRule: fit() derives the schedule, MixUp and resize from the data

    def content(self) -> dict[str, Any]:
        """What the hash covers and the run records: every field except name and description, and the fields
        added later only where they differ from their defaults."""
        content = dataclasses.asdict(self)
        content.pop("description")
        content.pop("name")
        for key, default in _LATER_FIELDS.items():
            if content[key] == default:
                content.pop(key)
        return content

    def hash(self) -> str:
        """12 hex chars over ``content()``: identical recipe => identical hash."""
        blob = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def validate(self) -> "Recipe":
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1 or null"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.optimizer.name in ("sgd", "adamw"), "optimizer.name must be sgd or adamw"),
            (self.optimizer.lr > 0, "optimizer.lr must be > 0"),
            (self.optimizer.weight_decay >= 0, "optimizer.weight_decay must be >= 0"),
            (self.schedule.name in ("cosine", "multistep", "onecycle", "constant"),
             "schedule.name must be cosine, multistep, onecycle or constant"),
            (all(0 < m < 1 for m in self.schedule.milestones), "schedule.milestones are fractions in (0, 1)"),
            (0 <= self.schedule.warmup_fraction < 1, "schedule.warmup_fraction must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.val_size >= 0, "val_size must be >= 0"),
            (self.subset is None or self.subset >= 1, "subset must be >= 1 or null"),
            (self.augment.crop_padding >= 0, "augment.crop_padding must be >= 0"),
            (self.mixup_alpha >= 0, "mixup_alpha must be >= 0"),
            (self.epoch_steps is None or self.epoch_steps >= 1, "epoch_steps must be >= 1 or null"),
            (self.resize.crop >= 0 and (self.resize.crop == 0) == (self.resize.precrop == 0)
             and self.resize.precrop >= self.resize.crop, "resize: precrop >= crop >= 1, or both 0"),
            (not (self.resize.crop and self.augment.random_crop),
             "resize crops already: set augment.random_crop to false"),
        ]
        for ok, rule in checks:
            if not ok:
                raise UserError(f"recipe {self.name!r}: {rule}")
        return self


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run depends on; saved with the run."""

    arch: str
    recipe: Recipe
    model: dict[str, Any] = field(default_factory=dict)  # model hyperparameters (zoo.create_model kwargs)
    dataset: str = "cifar10"
    data_dir: str = "./data"
    download: bool = False
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool | None = None  # bf16 autocast; None = on for CUDA and CPUs with native bf16 (runtime.speed_settings)
    channels_last: bool | None = None  # None = on
    compile: bool | None = None  # None = on when the run is long enough to repay compiling (runtime.speed_settings)
    output_dir: str = "./outputs"
    pretrained: str | None = None  # fine-tune from: a weights file, or "timm" (timm's own, from its cache)
    pretrained_sha256: str | None = None  # set by fit() from the file; a resumed run must find the same
    shots: int | None = None  # train on K images per class, drawn with the seed from the training split

    def __post_init__(self) -> None:
        check_seed(self.seed, "seed")
        if self.shots is not None and (isinstance(self.shots, bool) or not isinstance(self.shots, int)
                                       or self.shots < 1):
            raise UserError(f"--shots must be an integer >= 1, got {self.shots!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_LATER_FIELDS = {name: dataclasses.asdict(Recipe(name=""))[name]
                 for name in ("mixup_alpha", "resize", "epoch_steps", "hyperrule")}


# ----------------------------------------------------------------------------------------------
# Loading and overriding recipes
# ----------------------------------------------------------------------------------------------

def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def read_yaml_mapping(path: Path, what: str, holds: str) -> dict[str, Any]:
    """The mapping a YAML file (``what``: e.g. "recipe file") holds; anything else is one UserError line."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path} must hold a mapping of {holds}")
    return raw


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by preset name (experiments/recipes/NAME.yaml) or by path to a YAML file."""
    path = Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) or path.is_file()):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown recipe {name_or_path!r}; presets: {', '.join(list_recipes())} (or pass a .yaml path)")
    raw = read_yaml_mapping(path, "recipe file", "recipe fields")
    raw.setdefault("name", path.stem)
    return build_dataclass(Recipe, raw, where=f"recipe {path.name}").validate()


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Rebuild a recipe saved with a run or checkpoint."""
    return build_dataclass(Recipe, raw, where="saved recipe").validate()


def apply_overrides(recipe: Recipe, overrides: list[str] | dict[str, Any]) -> Recipe:
    """Apply ``KEY=VALUE`` overrides (dotted keys, YAML values) with type checking."""
    items = overrides.items() if isinstance(overrides, dict) else [parse_key_value(s, "--set") for s in overrides]
    data = dataclasses.asdict(recipe)
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise UserError(f"unknown recipe key {key!r}; keys: {', '.join(recipe_keys())}")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise UserError(f"unknown recipe key {key!r}; keys: {', '.join(recipe_keys())}")
        node[parts[-1]] = value
    return build_dataclass(Recipe, data, where="override").validate()


def check_seed(seed: Any, name: str) -> None:
    """``name``: how the message calls it (``seed``, ``--seed``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise UserError(f"{name} must be an integer in [0, 2**32), got {seed!r}")


def flag_overrides(shortcuts: dict[str, Any], epochs: int | None, sets: list[str]) -> dict[str, Any]:
    """A command's recipe overrides: the shortcut flags given (not None), ``--epochs`` (which replaces an
    iteration budget such as resnet-paper's) and each ``--set KEY=VALUE``, applied in that order."""
    overrides = {k: v for k, v in shortcuts.items() if v is not None}
    if epochs is not None:
        overrides |= {"epochs": epochs, "max_steps": None}
    return overrides | dict(parse_key_value(s, "--set") for s in sets)


def recipe_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += recipe_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def parse_key_value(text: str, flag: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (so 0.1 is a float, true a bool, [1,2] a list)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"{flag} expects KEY=VALUE, got {text!r}")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise UserError(f"{flag} {key}: cannot parse value {value!r}") from None
    return key.strip(), _scientific(parsed)


def _scientific(value: Any) -> Any:
    """``"1e-4"`` -> ``1e-4``; every other value unchanged."""
    return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()) else value


def build_dataclass(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Construct ``cls`` from a plain mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} in {cls.__name__}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}: {cls.__name__}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {type(value).__name__}")
        return build_dataclass(tp, value, where.split(":")[0])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(item_tp, v, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        value = _scientific(value)  # a recipe file's 1e-4
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    return value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and tuples stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------
# Architecture lists with their own model arguments (--arch)
# ----------------------------------------------------------------------------------------------

def parse_arch_spec(spec: str, flag: str = "--arch") -> list[tuple[str, dict[str, Any]]]:
    """``NAME[:KEY=VALUE[,KEY=VALUE...]][,NAME...]`` -> ``[(name, model arguments), ...]`` in the order given.

    A comma separates entries; an entry holding ``=`` with no ``:`` before it continues the previous
    architecture's arguments, so ``resnet20,densenet_bc:depth=40,growth_rate=12`` is resnet20 at its defaults
    and densenet_bc with L = 40, k = 12. ``timm:NAME`` is one name (``timm:NAME:KEY=VALUE`` gives it
    arguments). Values are YAML, as for --model-arg, and cannot hold a comma. Names are checked by the zoo.
    """
    entries: list[tuple[str, dict[str, Any]]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" in item and ":" not in item.partition("=")[0]:  # KEY=VALUE: the previous architecture's
            if not entries:
                raise UserError(f"{flag} {spec!r}: {item!r} follows no architecture; write NAME:{item}")
            _add_model_arg(entries[-1], item, flag)
            continue
        prefix = TIMM_PREFIX if item.startswith(TIMM_PREFIX) else ""
        name, colon, first_arg = item[len(prefix):].partition(":")
        if not name.strip():
            raise UserError(f"{flag} {spec!r}: {item!r} names no architecture")
        entries.append((prefix + name.strip(), {}))
        if colon:
            _add_model_arg(entries[-1], first_arg, flag)
    if not entries:
        raise UserError(f"{flag} {spec!r} names no architecture")
    return entries


def _add_model_arg(entry: tuple[str, dict[str, Any]], text: str, flag: str) -> None:
    name, model = entry
    key, value = parse_key_value(text.strip(), f"{flag} {name}:")
    if key in model:
        raise UserError(f"{flag} {name}: {key} is given twice")
    model[key] = value


def arch_label(arch: str, model: dict[str, Any], defaults: dict[str, Any]) -> str:
    """``arch`` followed by the model arguments that differ from ``defaults`` (sorted), for run names and
    seed groups: ``densenet_bc-depth=40-growth_rate=24``; plain ``arch`` at the defaults."""
    changed = [f"{k}={v}" for k, v in sorted(model.items()) if k not in defaults or defaults[k] != v]
    return "-".join([arch, *changed])
