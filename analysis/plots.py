"""Figures of a cnn-zoo experiment, from its MLflow records alone.

    python analysis/plots.py --experiment cnn-zoo [--tracking-uri URI] [--out analysis/figures]
                             [--recipe NAME_OR_HASH] [--allow-mixed-recipes]

Writes PNG and SVG files into OUT/<experiment>/<recipe hash>/ (OUT/<experiment>/mixed/ for figures of several
recipes): accuracy_vs_params, accuracy_vs_flops, accuracy_vs_train_time, learning_curves and, per sweep
study, sweep_<study> (k × θ map and Pareto front of its trials), and transfer_shots (test accuracy against
shots of the fine-tuning runs, --pretrained). Only FINISHED runs count; runs of different
recipes never share a figure unless --allow-mixed-recipes is given (one panel per recipe). --recipe takes a
hash, or a name that one hash carries. Runs that lack a metric are listed on stderr.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # `python analysis/plots.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from matplotlib.figure import Figure

from analysis.aggregate import (FINISHED, TRAIN_KINDS, aggregate_runs, complete_runs, curves_frame, finished_runs,
                                ignored_runs_note, match_references, missing_metrics, missing_report)
from analysis.cli import output_dir, run_cli, slug, warn
from analysis.errors import AnalysisError, EmptyFigureError
from analysis.figures import X_AXES, accuracy_figure, learning_curves_figure, save_figure, sweep_figure
from analysis.mlflow_data import load_experiment, load_histories, store_errors
from analysis.recipes import filter_recipe, select_recipes
from analysis.transfer import shots_figure, shots_table
from experiments.names import KIND_TRIAL, PRETRAINED


def study_trials(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """FINISHED and PRUNED trial runs per study (the ``optuna.study_name`` tag, else the parent run id)."""
    trials = runs[(runs["kind"] == KIND_TRIAL) & ((runs["status"] == FINISHED) | (runs["trial_state"] == "PRUNED"))]
    key = trials["study"].fillna(trials["parent_run_id"]).fillna("unnamed-study")
    return {str(name): group for name, group in trials.groupby(key, sort=True)}


def make_figures(uri: str, experiment: str, out: Path, recipe: str | None = None,
                 allow_mixed: bool = False) -> list[Path]:
    """Read the experiment and write every figure it has data for into ``output_dir(out, experiment, <the
    figure's recipe hashes>)``; returns the files written."""
    client, runs = load_experiment(uri, experiment)
    for note in (ignored_runs_note(runs, TRAIN_KINDS), ignored_runs_note(runs, (KIND_TRIAL,))):
        if note:
            warn(note)
    finished = finished_runs(runs, (*TRAIN_KINDS, KIND_TRIAL))
    if finished.empty:
        raise AnalysisError(f"experiment {experiment!r} has no FINISHED train, retrain or trial runs "
                            f"({len(runs)} runs in all)")
    runs = filter_recipe(runs, recipe, finished)  # the one filter: every figure and warning below sees only it
    train, trials = finished_runs(runs, TRAIN_KINDS), finished_runs(runs, (KIND_TRIAL,))
    with store_errors(uri):
        history = load_histories(client, train["run_id"])
    for line in missing_report(missing_metrics(pd.concat([train, trials]), history)):
        warn(line)

    written: list[Path] = []
    tuned = train[train[PRETRAINED].notna()] if PRETRAINED in train else train.iloc[:0]
    if not tuned.empty:  # fine-tuning runs, one figure across shots (each shot count resolves its own recipe hash)
        folder = output_dir(out, experiment, tuned["recipe_hash"])
        written += _save_or_warn(lambda: shots_figure(shots_table(tuned)), folder, "transfer_shots")
        train = train.drop(tuned.index)  # fine-tuned runs never share a figure with runs trained from scratch
    train = complete_runs(train)
    if not train.empty:
        train = select_recipes(train, allow_mixed=allow_mixed)
        folder = output_dir(out, experiment, train["recipe_hash"])
        agg = aggregate_runs(train)
        matched = match_references(agg)
        for x in X_AXES:
            written += _save_or_warn(partial(accuracy_figure, agg, matched, x), folder, f"accuracy_vs_{x}")
        curves = curves_frame(train, history)
        written += _save_or_warn(partial(learning_curves_figure, curves), folder, "learning_curves")
    for study, group in study_trials(runs).items():
        group = select_recipes(group, allow_mixed=allow_mixed)
        folder = output_dir(out, experiment, group["recipe_hash"].dropna())
        written += _save_or_warn(partial(sweep_figure, group, study), folder, f"sweep_{slug(study)}")
    return written


def _save_or_warn(build: Callable[[], Figure], out: Path, stem: str) -> list[Path]:
    try:
        return save_figure(build(), out, stem)
    except EmptyFigureError as e:
        warn(f"warning: {e}")
        return []


def main(argv: list[str] | None = None) -> int:
    return run_cli("plots.py", __doc__, make_figures, argv)


if __name__ == "__main__":
    sys.exit(main())
