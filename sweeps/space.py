"""The DenseNet-BC search space: a small YAML file, validated before any trial runs.

    growth_rate: {low: 8, high: 48, step: 4}   # k
    compression: {low: 0.2, high: 1.0}         # θ
    depths: [100]                              # one: fixed; several: searched (categorical)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import optuna
import yaml

from experiments.errors import UserError
from sweeps.settings import Column
from zoo.densenet import is_densenet_bc_depth

DEFAULT_SPACE = Path(__file__).resolve().parent / "spaces" / "densenet_bc.yaml"
DEFAULT_POINT = {"growth_rate": 12, "compression": 0.5, "depth": 100}  # Huang et al. 2017's DenseNet-BC
_RANGE_KEYS = {"growth_rate": {"low", "high", "step"}, "compression": {"low", "high"}}


@dataclass(frozen=True)
class SearchSpace:
    growth_rate: tuple[int, int, int] = (8, 48, 4)  # low, high, step
    compression: tuple[float, float] = (0.2, 1.0)  # low, high
    depths: tuple[int, ...] = (100,)

    # How the generic sweep code shows a point: result-table columns and the contour plot of k against θ.
    columns: ClassVar[tuple[Column, ...]] = (Column("depth", "depth", 6), Column("k", "growth_rate", 4),
                                             Column("θ", "compression", 6, ".3f"))
    contour: ClassVar[tuple[str, tuple[str, str]]] = ("contour_k_theta", ("growth_rate", "compression"))

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The model hyperparameters of ``trial`` (zoo.create_model kwargs)."""
        low, high, step = self.growth_rate
        depth = self.depths[0] if len(self.depths) == 1 else trial.suggest_categorical("depth", list(self.depths))
        return {"depth": depth,
                "growth_rate": trial.suggest_int("growth_rate", low, high, step=step),
                "compression": trial.suggest_float("compression", *self.compression)}

    def default_params(self) -> dict[str, Any] | None:
        """Huang et al.'s DenseNet-BC (k = 12, θ = 0.5; L = 100 where depth is searched and 100 is listed) as
        Optuna params, or None where the space excludes it."""
        low, high, step = self.growth_rate
        k, theta = DEFAULT_POINT["growth_rate"], DEFAULT_POINT["compression"]
        if not (low <= k <= high and (k - low) % step == 0 and self.compression[0] <= theta <= self.compression[1]):
            return None
        params: dict[str, Any] = {"growth_rate": k, "compression": theta}
        if len(self.depths) > 1:
            params["depth"] = DEFAULT_POINT["depth"] if DEFAULT_POINT["depth"] in self.depths else self.depths[0]
        return params

    def model_kwargs(self, params: dict[str, Any]) -> dict[str, Any]:
        """The hyperparameters of a finished trial, from its Optuna params."""
        return {"depth": params.get("depth", self.depths[0]), "growth_rate": params["growth_rate"],
                "compression": params["compression"]}

    def smallest_model(self) -> dict[str, Any]:
        """The hyperparameters of the space's model with the fewest parameters."""
        return {"depth": min(self.depths), "growth_rate": self.growth_rate[0], "compression": self.compression[0]}

    def to_dict(self) -> dict[str, Any]:
        low, high, step = self.growth_rate
        return {"growth_rate": {"low": low, "high": high, "step": step},
                "compression": {"low": self.compression[0], "high": self.compression[1]},
                "depths": list(self.depths)}


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; every problem is a one-line UserError naming the file. A pipe reads
    too (``--space <(...)``, a /dev/fd path)."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise UserError(f"search space file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read search space file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"search space {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"search space {path} must be a mapping with keys {', '.join(sorted([*_RANGE_KEYS, 'depths']))}")
    where = f"search space {path}"
    unknown = sorted(set(raw) - {*_RANGE_KEYS, "depths"})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted([*_RANGE_KEYS, 'depths']))}")
    defaults = SearchSpace()
    return SearchSpace(
        growth_rate=_growth_rate(raw["growth_rate"], where) if "growth_rate" in raw else defaults.growth_rate,
        compression=_compression(raw["compression"], where) if "compression" in raw else defaults.compression,
        depths=_depths(raw["depths"], where) if "depths" in raw else defaults.depths,
    )


def _range(value: Any, key: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key} must be a mapping like {{low: ..., high: ...}}, got {value!r}")
    unknown = sorted(set(value) - _RANGE_KEYS[key])
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} in {key}; known: {', '.join(sorted(_RANGE_KEYS[key]))}")
    missing = sorted({"low", "high"} - set(value))
    if missing:
        raise UserError(f"{where}: {key} needs {missing[0]!r}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _growth_rate(value: Any, where: str) -> tuple[int, int, int]:
    r = _range(value, "growth_rate", where)
    low, high, step = r["low"], r["high"], r.get("step", 1)
    if not all(_is_int(v) for v in (low, high, step)):
        raise UserError(f"{where}: growth_rate low, high and step must be integers, got {low!r}, {high!r}, {step!r}")
    if not 1 <= low <= high or step < 1:
        raise UserError(f"{where}: growth_rate needs 1 <= low <= high and step >= 1, "
                        f"got low {low}, high {high}, step {step}")
    if (high - low) % step:
        raise UserError(f"{where}: growth_rate high - low ({high - low}) must be a multiple of step {step}")
    return low, high, step


def _compression(value: Any, where: str) -> tuple[float, float]:
    r = _range(value, "compression", where)
    low, high = r["low"], r["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise UserError(f"{where}: compression low and high must be numbers, got {low!r}, {high!r}")
    if not 0 < low <= high <= 1:
        raise UserError(f"{where}: compression needs 0 < low <= high <= 1, got low {low}, high {high}")
    return float(low), float(high)


def _depths(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: depths must be a non-empty list of integers, got {value!r}")
    for d in value:
        if not _is_int(d) or not is_densenet_bc_depth(d):
            raise UserError(f"{where}: depth {d!r} is not a DenseNet-BC depth: need an integer L >= 10 with "
                            f"(L - 4) % 6 == 0 (e.g. 40, 100, 190)")
    if len(set(value)) != len(value):
        raise UserError(f"{where}: depths lists a depth twice: {value}")
    return tuple(value)
