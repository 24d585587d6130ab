"""Pure functions over the runs DataFrame of ``analysis.mlflow_data.runs_frame`` (one row per MLflow run).

Nothing here talks to MLflow, so tests feed these functions synthetic frames.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.recipes import recipe_label
from analysis.references import REFERENCES, Reference, references_frame
from analysis.stats import ci_half_width, compare_to_best
from experiments.names import (BEST_VAL_ACC, EVAL_SECONDS, FINAL_TEST_ACC, FLOPS, KIND_RETRAIN, KIND_TRAIN, KIND_TRIAL,
                               MODEL_PARAM_PREFIX, PARAM_COUNT, TEST_ACC, TEST_ACC_AT_BEST_VAL, TRAIN_SECONDS, VAL_ACC,
                               WALL_SECONDS)

TRAIN_KINDS = (KIND_TRAIN, KIND_RETRAIN)
FINISHED = "FINISHED"
HISTORY_METRICS = (VAL_ACC, TEST_ACC)
# Averaged over seeds per model row, each with its std, 95% CI half-width and count.
SEED_METRICS = (FINAL_TEST_ACC, TEST_ACC_AT_BEST_VAL, BEST_VAL_ACC, TRAIN_SECONDS, EVAL_SECONDS, WALL_SECONDS)
# Group identity of one "model" row: never averages across recipes, datasets or hyperparameters.
GROUP_KEYS = ["recipe", "recipe_hash", "dataset", "family", "arch", "config"]
# Shown in a model's label whenever the architecture has them (L and k name a DenseNet).
ALWAYS_LABELLED = ("depth", "growth_rate")
SHORT_NAMES = {"depth": "L", "growth_rate": "k", "compression": "θ"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
# Without these a run cannot be grouped: it is reported and left out.
REQUIRED_PARAMS = ("arch", "family", "dataset", "recipe", "recipe_hash")
# How a model row's train_seconds was measured: runs that log eval_seconds time training steps alone; runs
# recorded before the harness timed evaluation apart included it in train_seconds.
TIMING_STEPS, TIMING_WITH_EVAL, TIMING_MIXED = "steps only", "steps + evaluation", "mixed"


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def model_columns(runs: pd.DataFrame) -> list[str]:
    return sorted(c for c in runs.columns if c.startswith(MODEL_PARAM_PREFIX))


def _hp(column: str) -> str:
    return column[len(MODEL_PARAM_PREFIX):]


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
    if row["kind"] == KIND_TRIAL:
        return [BEST_VAL_ACC, PARAM_COUNT]
    required = [PARAM_COUNT, FLOPS, FINAL_TEST_ACC, TRAIN_SECONDS]
    # A full-train retrain (val_size 0) has no validation metrics by design.
    if _has_validation(row):
        required += [BEST_VAL_ACC, TEST_ACC_AT_BEST_VAL]
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
    return [TEST_ACC, VAL_ACC] if _has_validation(run) else [TEST_ACC]


def missing_report(missing: pd.DataFrame) -> list[str]:
    """One warning line per run that lacks something, naming the run and each missing item."""
    return [f"warning: {kind} run {run_id} ({name}) is missing {', '.join(group['item'])}"
            for (run_id, name, kind), group in missing.groupby(["run_id", "run_name", "kind"], sort=False,
                                                              dropna=False)]


def complete_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that have every grouping param (the others are in ``missing_metrics``' report)."""
    return runs.dropna(subset=list(REQUIRED_PARAMS))


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
    """One row per (recipe, dataset, architecture, hyperparameters): means, sample stds and 95% CI
    half-widths (Student t) over seeds, and each row's difference to the best row of its recipe and dataset
    in final test accuracy, with its Welch 95% CI (``analysis.stats.compare_to_best``).

    ``n_runs`` counts the runs averaged, ``n_seeds`` their distinct seeds; each ``<metric>_n`` counts the
    runs that carry that metric (missing ones are reported by ``missing_metrics``, and averaged over
    what is there). ``param_count``/``flops`` are the median over runs (identical for one architecture).
    ``timing`` says what ``train_seconds`` measured (a ``TIMING_*``); ``n_diverged`` counts the runs tagged
    diverged and ``diverged`` gives their reasons (they stay in the means: a diverged run is a result).
    """
    if runs.empty:
        raise AnalysisError("no FINISHED train or retrain runs to aggregate")
    runs = runs.join(model_labels(runs))
    columns = model_columns(runs)
    agg = pd.DataFrame([_aggregate_group(dict(zip(GROUP_KEYS, keys)), group, columns)
                        for keys, group in runs.groupby(GROUP_KEYS, sort=True, dropna=False)])
    agg["recipe_label"] = [recipe_label(r, h) for r, h in zip(agg["recipe"], agg["recipe_hash"])]
    agg = agg.join(compare_to_best(agg, FINAL_TEST_ACC, ["recipe_hash", "dataset"]))
    return agg.sort_values(["recipe_label", "dataset", "family", PARAM_COUNT, "model"], ignore_index=True)


def _aggregate_group(row: dict[str, object], group: pd.DataFrame, columns: list[str]) -> dict[str, object]:
    row.update(
        model=group["model"].iloc[0],
        model_id="|".join(str(k) for k in (row["recipe_hash"], row["dataset"], row["arch"], row["config"])),
        hparams=_hparams(group.iloc[0], columns),
        recipe_protocol=group["recipe_protocol"].iloc[0],
        n_runs=len(group),
        n_seeds=int(group["seed"].nunique()),
        seeds=",".join(str(s) for s in sorted(group["seed"].dropna().unique())),
        epochs=group["epochs"].max(),
        val_size=group["val_size"].max(),
        param_count=_column(group, PARAM_COUNT).median(),
        flops=_column(group, FLOPS).median(),
        run_ids=",".join(group["run_id"]),
        timing=_timing(group),
        n_diverged=int(group["diverged"].notna().sum()),
        diverged="; ".join(dict.fromkeys(group["diverged"].dropna())),
    )
    for metric in SEED_METRICS:
        values = _column(group, metric)
        row[f"{metric}_mean"] = values.mean()
        row[f"{metric}_std"] = values.std(ddof=1)
        row[f"{metric}_ci"] = ci_half_width(values)
        row[f"{metric}_n"] = int(values.notna().sum())
    return row


def _timing(group: pd.DataFrame) -> str:
    timed_apart = _column(group, EVAL_SECONDS).notna()
    return TIMING_STEPS if timed_apart.all() else TIMING_MIXED if timed_apart.any() else TIMING_WITH_EVAL


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

    Accuracies are percent; ``*_ci95`` are half-widths of 95% CIs (Student t over seeds; Welch for
    ``diff_vs_best``, the gap to the best model of the same recipe and dataset). ``diff_vs_reference`` is
    ours (final test accuracy, mean over seeds) minus the published number in percentage points; NaN marks
    what does not exist (e.g. no validation split, a single seed).
    """
    primary = matched.drop_duplicates("model_id", keep="first").set_index("model_id")
    minutes = {f"{name}_minutes_{stat}": agg[f"{metric}_{stat}"] / 60
               for name, metric in (("train", TRAIN_SECONDS), ("eval", EVAL_SECONDS), ("wall", WALL_SECONDS))
               for stat in ("mean", "std")}
    table = pd.DataFrame({
        "recipe": agg["recipe"],
        "recipe_hash": agg["recipe_hash"],
        "recipe_protocol": agg["recipe_protocol"],
        "dataset": agg["dataset"],
        "family": agg["family"],
        "model": agg["model"],
        "arch": agg["arch"],
        "params": agg[PARAM_COUNT],
        "gflops": agg[FLOPS] / 1e9,
        "seeds": agg["n_seeds"],
        "runs": agg["n_runs"],
        "epochs": agg["epochs"],
        **{column: agg[f"{metric}_{stat}"] for metric in (FINAL_TEST_ACC, TEST_ACC_AT_BEST_VAL)
           for stat, column in (("mean", f"{metric}_mean"), ("std", f"{metric}_std"), ("ci", f"{metric}_ci95"))},
        "best_model": agg["best_model"],
        "is_best": agg["is_best"],
        "diff_vs_best": agg["diff_vs_best"],
        "diff_vs_best_ci95": agg["diff_vs_best_ci"],
        "diff_vs_best_significant": agg["diff_vs_best_significant"],
        **minutes,
        "train_time_measures": agg["timing"],
        "diverged_runs": agg["n_diverged"],
        "diverged_reason": agg["diverged"],
        "reference_test_acc": agg["model_id"].map(primary["ref_test_acc"]),
        "reference_params_m": agg["model_id"].map(primary["ref_params_m"]),
        "reference_source": agg["model_id"].map(primary["ref_source"]),
        "reference_note": agg["model_id"].map(primary["ref_note"]),
    })
    table["diff_vs_reference"] = table["final_test_acc_mean"] - table["reference_test_acc"]
    return table


def curves_frame(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Join per-epoch history (``run_id, metric, epoch, value``) with each run's panel of the
    learning-curve figure (model label, dataset, recipe) and what the panel marks: the number of classes
    (for the chance line) and the run's divergence reason (missing unless tagged)."""
    labelled = runs.join(model_labels(runs))[["run_id", "model", "dataset", "family", "recipe", "recipe_hash",
                                              "recipe_protocol", "num_classes", "diverged"]]
    curves = history.merge(labelled, on="run_id")
    curves["recipe_label"] = [recipe_label(r, h) for r, h in zip(curves["recipe"], curves["recipe_hash"])]
    curves["panel"] = [f"{m} · {dataset_name(d)}" for m, d in zip(curves["model"], curves["dataset"])]
    return curves
