"""Pure functions over the runs DataFrame of ``analysis.mlflow_data.runs_frame`` (one row per MLflow run).

Nothing here talks to MLflow, so tests feed these functions synthetic frames.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis.references import REFERENCES, Reference, references_frame

TRAIN_KINDS = ("train", "retrain")
FINISHED = "FINISHED"
HISTORY_METRICS = ("val_acc", "test_acc")
# Group identity of one "model" row: never averages across recipes, datasets or hyperparameters.
GROUP_KEYS = ["recipe", "recipe_hash", "dataset", "family", "arch", "config"]
# Shown in a model's label whenever the architecture has them (L and k name a DenseNet).
ALWAYS_LABELLED = ("depth", "growth_rate")
SHORT_NAMES = {"depth": "L", "growth_rate": "k", "compression": "θ"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
MODEL_PREFIX = "model."
# Without these a run cannot be grouped: it is reported and left out.
REQUIRED_PARAMS = ("arch", "family", "dataset", "recipe", "recipe_hash")


class AnalysisError(Exception):
    """A problem the CLIs report as one line on stderr, exiting with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MixedRecipesError(AnalysisError):
    """Runs of different recipes were about to share a figure or table."""


class EmptyFigureError(AnalysisError):
    """A figure would have no points (e.g. every run lacks the metric on its x axis)."""


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def recipe_label(recipe: object, recipe_hash: object) -> str:
    """``standard (0123456789ab)``: what every figure title and table row names a recipe by."""
    return f"{recipe} ({recipe_hash})"


def model_columns(runs: pd.DataFrame) -> list[str]:
    return sorted(c for c in runs.columns if c.startswith(MODEL_PREFIX))


def _hp(column: str) -> str:
    return column[len(MODEL_PREFIX):]


def finished_runs(runs: pd.DataFrame, kinds: Sequence[str] = TRAIN_KINDS) -> pd.DataFrame:
    """Runs of the given ``cnn_zoo.kind`` tags whose status is FINISHED: the only ones that count."""
    return runs[runs["kind"].isin(kinds) & (runs["status"] == FINISHED)]


def ignored_runs_note(runs: pd.DataFrame, kinds: Sequence[str] = TRAIN_KINDS) -> str | None:
    """One line saying how many runs of ``kinds`` were left out for not being FINISHED, or None."""
    of_kind = runs[runs["kind"].isin(kinds)]
    left = of_kind[of_kind["status"] != FINISHED]
    if left.empty:
        return None
    counts = ", ".join(f"{n} {status}" for status, n in left["status"].value_counts().sort_index().items())
    return f"ignored {len(left)} of {len(of_kind)} {'/'.join(kinds)} runs that did not finish ({counts})"


def _required_metrics(row: pd.Series) -> list[str]:
    if row["kind"] == "trial":
        return ["best_val_acc", "param_count"]
    required = ["param_count", "flops", "final_test_acc", "train_seconds"]
    # A full-train retrain (val_size 0) has no validation metrics by design.
    if _has_validation(row):
        required += ["best_val_acc", "test_acc_at_best_val"]
    return required


def missing_metrics(runs: pd.DataFrame, history: pd.DataFrame | None = None) -> pd.DataFrame:
    """What FINISHED runs should carry but do not, one row per (run, item); ``item`` is a metric name,
    ``<metric> (per epoch)`` or ``param <name>``.

    Summary metrics are checked by kind (trials need ``best_val_acc`` and ``param_count``; train and
    retrain runs the rest, without the validation ones when ``val_size`` is 0), as are the grouping params
    of train and retrain runs. With ``history`` (``load_histories``' long frame) their per-epoch
    ``val_acc``/``test_acc`` are checked too.
    """
    rows = []
    have_history = set(zip(history["run_id"], history["metric"])) if history is not None else set()
    for _, run in runs.iterrows():
        items = [m for m in _required_metrics(run) if m not in runs.columns or pd.isna(run[m])]
        if run["kind"] in TRAIN_KINDS:
            items += [f"param {p}" for p in REQUIRED_PARAMS if pd.isna(run[p])]
            if history is not None:
                items += [f"{m} (per epoch)" for m in _required_history(run) if (run["run_id"], m) not in have_history]
        rows += [(run["run_id"], run["run_name"], run["kind"], item) for item in items]
    return pd.DataFrame(rows, columns=["run_id", "run_name", "kind", "item"])


def _has_validation(run: pd.Series) -> bool:
    return bool(pd.isna(run.get("val_size")) or run["val_size"] > 0)


def _required_history(run: pd.Series) -> list[str]:
    return ["test_acc", "val_acc"] if _has_validation(run) else ["test_acc"]


def missing_report(missing: pd.DataFrame) -> list[str]:
    """One warning line per run that lacks something, naming the run and each missing item."""
    return [f"warning: {kind} run {run_id} ({name}) is missing {', '.join(group['item'])}"
            for (run_id, name, kind), group in missing.groupby(["run_id", "run_name", "kind"], sort=False,
                                                              dropna=False)]


def complete_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that have every grouping param (the others are in ``missing_metrics``' report)."""
    return runs.dropna(subset=list(REQUIRED_PARAMS))


def recipe_mask(runs: pd.DataFrame, recipe: str) -> pd.Series:
    """Runs whose recipe name or recipe hash is ``recipe``."""
    return (runs["recipe"] == recipe) | (runs["recipe_hash"] == recipe)


def check_recipe_exists(runs: pd.DataFrame, recipe: str | None) -> None:
    """Raise when ``--recipe`` names no recipe of ``runs``, listing the recipes there are."""
    if recipe is not None and not recipe_mask(runs, recipe).any():
        raise AnalysisError(f"no FINISHED runs with recipe name or hash {recipe!r}; recipes present: "
                            f"{_recipe_list(runs)}")


def select_recipes(runs: pd.DataFrame, allow_mixed: bool = False) -> pd.DataFrame:
    """``runs``, unless they mix recipe hashes and ``allow_mixed`` is false (figures then get one panel per
    recipe): then raises ``MixedRecipesError``, listing the recipes found. ``--recipe`` is applied
    before, with ``recipe_mask``, so that the missing-metrics report covers that recipe only."""
    if runs["recipe_hash"].nunique() > 1 and not allow_mixed:
        raise MixedRecipesError(
            f"runs of {runs['recipe_hash'].nunique()} different recipes found ({_recipe_list(runs)}); "
            f"choose one with --recipe NAME_OR_HASH, or pass --allow-mixed-recipes to facet by recipe")
    return runs


def _recipe_list(runs: pd.DataFrame) -> str:
    counts = runs.groupby(["recipe", "recipe_hash"], dropna=False).size()
    return ", ".join(f"{recipe_label(name, h)}: {n} runs" for (name, h), n in counts.items()) or "none"


def _config(run: pd.Series, columns: Iterable[str]) -> str:
    return ",".join(f"{_hp(c)}={run[c]}" for c in columns if not pd.isna(run[c]))


def model_labels(runs: pd.DataFrame) -> pd.DataFrame:
    """``config`` (every model hyperparameter, the grouping key) and ``model`` (a readable label) per run.

    The label is the arch plus the hyperparameters that differ between its runs in ``runs`` (and depth
    and growth rate where the arch has them): ``densenet_bc (L=100, k=12)``.
    """
    columns = model_columns(runs)
    config = runs.apply(lambda r: _config(r, columns), axis=1) if len(runs) else pd.Series(dtype=str)
    labels = pd.Series("", index=runs.index, dtype=object)
    for arch, group in runs.groupby("arch"):
        varying = [c for c in columns
                   if group[c].notna().any() and (group[c].nunique(dropna=False) > 1
                                                  or _hp(c) in ALWAYS_LABELLED)]
        for idx, run in group.iterrows():
            parts = [f"{SHORT_NAMES.get(_hp(c), _hp(c))}={run[c]}" for c in varying if not pd.isna(run[c])]
            labels[idx] = f"{arch} ({', '.join(parts)})" if parts else str(arch)
    return pd.DataFrame({"config": config.astype(object), "model": labels}, index=runs.index)


def _hparams(run: pd.Series, columns: Iterable[str]) -> dict[str, object]:
    return {_hp(c): run[c] for c in columns if not pd.isna(run[c])}


def aggregate_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (recipe, dataset, architecture, hyperparameters): means and sample stds over seeds.

    ``n_runs`` counts the runs averaged, ``n_seeds`` their distinct seeds; each ``<metric>_n`` counts the
    runs that carry that metric (missing ones are reported by ``missing_metrics``, and averaged over
    what is there). ``param_count``/``flops`` are the median over runs (identical for one architecture).
    """
    if runs.empty:
        raise AnalysisError("no FINISHED train or retrain runs to aggregate")
    runs = runs.join(model_labels(runs))
    columns = model_columns(runs)
    rows = []
    for keys, group in runs.groupby(GROUP_KEYS, sort=True, dropna=False):
        row = dict(zip(GROUP_KEYS, keys))
        row.update(
            model=group["model"].iloc[0],
            model_id="|".join(str(k) for k in (row["recipe_hash"], row["dataset"], row["arch"], row["config"])),
            hparams=_hparams(group.iloc[0], columns),
            n_runs=len(group),
            n_seeds=int(group["seed"].nunique()),
            seeds=",".join(str(s) for s in sorted(group["seed"].dropna().unique())),
            epochs=group["epochs"].max(),
            val_size=group["val_size"].max(),
            param_count=_column(group, "param_count").median(),
            flops=_column(group, "flops").median(),
            run_ids=",".join(group["run_id"]),
        )
        for metric in ("final_test_acc", "test_acc_at_best_val", "best_val_acc", "train_seconds"):
            values = _column(group, metric)
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_std"] = values.std(ddof=1)
            row[f"{metric}_n"] = int(values.notna().sum())
        rows.append(row)
    agg = pd.DataFrame(rows)
    agg["recipe_label"] = [recipe_label(r, h) for r, h in zip(agg["recipe"], agg["recipe_hash"])]
    return agg.sort_values(["recipe_label", "dataset", "family", "param_count", "model"], ignore_index=True)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name].astype(float) if name in frame.columns else pd.Series(np.nan, index=frame.index)


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The most accurate point at or below each ``x``: rows whose ``y`` beats every row with smaller or
    equal ``x``, sorted by ``x`` (rows missing either value are skipped)."""
    ordered = points.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, False], kind="stable")
    keep, best = [], -math.inf
    for idx, value in ordered[y].items():
        if value > best:
            keep.append(idx)
            best = value
    return ordered.loc[keep]


def _matches(hparams: dict[str, object], wanted: dict[str, object]) -> bool:
    for key, value in wanted.items():
        if key not in hparams:
            return False
        ours = hparams[key]
        if isinstance(value, float) or isinstance(ours, float):
            try:
                if not math.isclose(float(ours), float(value)):
                    return False
            except (TypeError, ValueError):
                return False
        elif ours != value:
            return False
    return True


def match_references(agg: pd.DataFrame, references: tuple[Reference, ...] = REFERENCES) -> pd.DataFrame:
    """Every (model row, published reference) pair that describes the same network and dataset.

    A reference matches on arch and dataset and on each hyperparameter it names (e.g. depth, growth rate
    and θ for DenseNet-BC). Returns ``model_id`` plus the ``ref_*`` columns, in reference priority order.
    """
    refs = references_frame(references)
    pairs = agg[["model_id", "arch", "dataset", "hparams"]].merge(refs, on=["arch", "dataset"])
    keep = [_matches(h, w) for h, w in zip(pairs["hparams"], pairs["ref_hparams"])]
    return pairs[keep].drop(columns=["hparams", "ref_hparams"]).sort_values(
        ["model_id", "priority"], ignore_index=True)


def results_table(agg: pd.DataFrame, matched: pd.DataFrame) -> pd.DataFrame:
    """The report's numbers: one row per model row of ``agg`` with its first-priority reference.

    Accuracies are percent, ``diff_vs_reference`` is ours (final test accuracy, mean over seeds) minus the
    published number in percentage points; NaN marks what does not exist (e.g. no validation split).
    """
    primary = matched.drop_duplicates("model_id", keep="first").set_index("model_id")
    table = pd.DataFrame({
        "recipe": agg["recipe"],
        "recipe_hash": agg["recipe_hash"],
        "dataset": agg["dataset"],
        "family": agg["family"],
        "model": agg["model"],
        "arch": agg["arch"],
        "params": agg["param_count"],
        "gflops": agg["flops"] / 1e9,
        "seeds": agg["n_seeds"],
        "runs": agg["n_runs"],
        "epochs": agg["epochs"],
        "final_test_acc_mean": agg["final_test_acc_mean"],
        "final_test_acc_std": agg["final_test_acc_std"],
        "test_acc_at_best_val_mean": agg["test_acc_at_best_val_mean"],
        "test_acc_at_best_val_std": agg["test_acc_at_best_val_std"],
        "train_minutes_mean": agg["train_seconds_mean"] / 60,
        "train_minutes_std": agg["train_seconds_std"] / 60,
        "reference_test_acc": agg["model_id"].map(primary["ref_test_acc"]),
        "reference_params_m": agg["model_id"].map(primary["ref_params_m"]),
        "reference_source": agg["model_id"].map(primary["ref_source"]),
        "reference_note": agg["model_id"].map(primary["ref_note"]),
    })
    table["diff_vs_reference"] = table["final_test_acc_mean"] - table["reference_test_acc"]
    return table


def curves_frame(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Join per-epoch history (``run_id, metric, epoch, value``) with each run's panel of the
    learning-curve figure: model label, dataset and recipe."""
    labelled = runs.join(model_labels(runs))[["run_id", "model", "dataset", "family", "recipe", "recipe_hash"]]
    curves = history.merge(labelled, on="run_id")
    curves["recipe_label"] = [recipe_label(r, h) for r, h in zip(curves["recipe"], curves["recipe_hash"])]
    curves["panel"] = [f"{m} · {dataset_name(d)}" for m, d in zip(curves["model"], curves["dataset"])]
    return curves
