"""Results table of a cnn-zoo experiment, from its MLflow records alone.

    python analysis/report.py --experiment cnn-zoo [--tracking-uri URI] [--out analysis/figures]
                              [--recipe NAME_OR_HASH] [--allow-mixed-recipes]

Writes results.md and results.csv into OUT/<experiment>/<recipe hash>/ (OUT/<experiment>/mixed/ for several
recipes): one row per architecture (with its hyperparameters) and dataset with params, FLOPs, seeds, final
test accuracy (mean ± std and its 95% confidence interval over seeds), the difference to the best model of
the same recipe and dataset (Welch 95% CI, "n.s." where not significant), test accuracy at best validation,
training and wall time, recipe, and the published reference with its source and our difference to it. The
recipe's protocol (epochs, batch, train / validation images) heads the table; runs the harness tagged
diverged are marked. Only FINISHED train and retrain runs count; several recipes need --allow-mixed-recipes
(rows then carry their recipe). --recipe takes a hash, or a name that one hash carries.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python analysis/report.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd

from analysis.aggregate import (TIMING_STEPS, aggregate_runs, complete_runs, dataset_name, finished_runs,
                                ignored_runs_note, match_references, missing_metrics, missing_report, model_labels,
                                results_table)
from analysis.cli import output_dir, run_cli, warn
from analysis.errors import AnalysisError
from analysis.mlflow_data import load_experiment
from analysis.recipes import filter_recipe, recipe_label, recipe_title, select_recipes
from analysis.references import CITATIONS
from analysis.stats import LEVEL

DASH = "—"
DIVERGED_MARK = "⚠"
WITH_EVAL_MARK = "†"
CI = f"{LEVEL:.0%} CI"
COLUMNS = ("Architecture", "Family", "Dataset", "Params (M)", "GFLOPs", "Seeds", "Final test acc (%)", CI,
           f"Δ vs best (pp) [{CI}]", "Test acc @ best val (%)", "Train time (min)", "Wall time (min)", "Recipe",
           "Reference (%)", "Source", "Δ vs ref (pp)")
TEXT_COLUMNS = {"Architecture", "Family", "Dataset", "Recipe", "Source"}  # left-aligned; numbers right


def _num(value: float, digits: int) -> str:
    return DASH if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _mean_std(mean: float, std: float, digits: int = 2) -> str:
    if pd.isna(mean):
        return DASH
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _interval(mean: float, half: float) -> str:
    return DASH if pd.isna(mean) or pd.isna(half) else f"[{mean - half:.2f}, {mean + half:.2f}]"


def _signed(value: float) -> str:
    return DASH if pd.isna(value) else f"{value:+.2f}"


def _vs_best(r: pd.Series) -> str:
    """``-3.20 [-5.42, -0.98]``, ``n.s.`` after an interval that holds 0, "best" for the best row itself."""
    if r["is_best"]:
        return "best"
    if pd.isna(r["diff_vs_best_ci95"]):
        return f"{_signed(r['diff_vs_best'])} (no CI: 1 seed)" if not pd.isna(r["diff_vs_best"]) else DASH
    interval = f"[{r['diff_vs_best'] - r['diff_vs_best_ci95']:+.2f}, {r['diff_vs_best'] + r['diff_vs_best_ci95']:+.2f}]"
    return f"{r['diff_vs_best']:+.2f} {interval}" + ("" if r["diff_vs_best_significant"] else " n.s.")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def markdown_rows(table: pd.DataFrame) -> list[list[str]]:
    """The table's cells as text: accuracies to 2 decimals, "—" where a number does not exist."""
    rows = []
    for _, r in table.iterrows():
        seeds = str(r["seeds"]) if r["runs"] == r["seeds"] else f"{r['seeds']} ({r['runs']} runs)"
        source = r["reference_source"] if isinstance(r["reference_source"], str) else DASH
        if isinstance(r["reference_note"], str) and r["reference_note"]:
            source += f" ({r['reference_note']})"
        train_time = _mean_std(r["train_minutes_mean"], r["train_minutes_std"], 1)
        if r["train_time_measures"] != TIMING_STEPS and train_time != DASH:
            train_time += f" {WITH_EVAL_MARK}"
        rows.append([r["model"] + (f" {DIVERGED_MARK}" if r["diverged_runs"] else ""), r["family"],
                     dataset_name(r["dataset"]), _num(r["params"] / 1e6, 2), _num(r["gflops"], 3), seeds,
                     _mean_std(r["final_test_acc_mean"], r["final_test_acc_std"]),
                     _interval(r["final_test_acc_mean"], r["final_test_acc_ci95"]), _vs_best(r),
                     _mean_std(r["test_acc_at_best_val_mean"], r["test_acc_at_best_val_std"]), train_time,
                     _mean_std(r["wall_minutes_mean"], r["wall_minutes_std"], 1),
                     recipe_label(r["recipe"], r["recipe_hash"]), _num(r["reference_test_acc"], 2), source,
                     _signed(r["diff_vs_reference"])])
    return rows


def _legend_lines(table: pd.DataFrame) -> list[str]:
    """How to read the table: its recipes' protocols, then the columns."""
    recipes = table.drop_duplicates("recipe_hash")
    return [
        *(f"- Recipe **{recipe_title(recipe_label(r['recipe'], r['recipe_hash']), r['recipe_protocol'])}**"
          for _, r in recipes.iterrows()),
        "",
        f"{int(table['runs'].sum())} FINISHED train/retrain runs in {len(table)} rows. Final test acc: test "
        "accuracy after the last epoch, mean ± sample std over seeds (Seeds: how many). "
        f"{CI}: {LEVEL:.0%} confidence interval of that mean (Student t, seeds − 1 degrees of freedom; "
        f"{DASH} for a single seed). Δ vs best: our mean minus the best mean of the same recipe and dataset, with "
        f"its {CI} (Welch); n.s.: not significant at the seeds available (the interval holds 0). Test acc @ best "
        "val: test accuracy at the epoch of best validation accuracy "
        f"({DASH} where the recipe has no validation split). Train time: training steps only "
        f"({WITH_EVAL_MARK}: runs recorded before the harness timed evaluation apart, whose train time includes "
        "evaluation); Wall time: the whole run. Δ vs ref: our final test accuracy minus the published number, in "
        "percentage points. GFLOPs: forward FLOPs per 32×32 image (1 MAC = 2 FLOPs)."
        + (f" {DIVERGED_MARK}: includes runs the harness flagged as diverged (listed below; they stay in the "
           "means)." if table["diverged_runs"].any() else ""),
    ]


def markdown_report(table: pd.DataFrame, experiment: str, missing_lines: list[str],
                    diverged_lines: list[str] = ()) -> str:
    """results.md: the recipes, the table and how to read it, the full references, the runs flagged as
    diverged and the runs that lack metrics."""
    lines = [
        f"# Results: experiment `{experiment}`",
        "",
        *_legend_lines(table),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c in TEXT_COLUMNS else "---:" for c in COLUMNS) + "|",
        *("| " + " | ".join(_cell(c) for c in row) + " |" for row in markdown_rows(table)),
    ]
    sources = list(dict.fromkeys(table["reference_source"].dropna()))
    if sources:
        lines += ["", "## References", "", *(f"- **{s}**: {CITATIONS.get(s, s)}" for s in sources)]
    if diverged_lines:
        lines += ["", f"## Diverged runs {DIVERGED_MARK}", "", *(f"- {line}" for line in diverged_lines)]
    if missing_lines:
        lines += ["", "## Runs with missing metrics", "", *(f"- {line.removeprefix('warning: ')}"
                                                          for line in missing_lines)]
    return "\n".join(lines) + "\n"


def diverged_report(runs: pd.DataFrame) -> list[str]:
    """One line per run tagged diverged: model, dataset, seed, run and the harness's reason."""
    labelled = runs.join(model_labels(runs))  # labelled among all runs, as in the table
    flagged = labelled[labelled["diverged"].notna()]
    return [f"{r['model']} · {dataset_name(r['dataset'])} · seed {r['seed']}: run {r['run_id']} ({r['run_name']}), "
            f"{r['diverged']}" for _, r in flagged.iterrows()]


def write_report(uri: str, experiment: str, out: Path, recipe: str | None = None,
                 allow_mixed: bool = False) -> list[Path]:
    """Read the experiment, write results.md and results.csv into ``output_dir(out, ...)``; returns both paths."""
    _, runs = load_experiment(uri, experiment)
    note = ignored_runs_note(runs)
    if note:
        warn(note)
    train = finished_runs(runs)
    if train.empty:
        raise AnalysisError(f"experiment {experiment!r} has no FINISHED train or retrain runs "
                            f"({len(runs)} runs in all)")
    train = filter_recipe(train, recipe, train)
    missing_lines = missing_report(missing_metrics(train))
    for line in missing_lines:
        warn(line)
    train = select_recipes(complete_runs(train), allow_mixed=allow_mixed)
    agg = aggregate_runs(train)
    table = results_table(agg, match_references(agg))
    folder = output_dir(out, experiment, table["recipe_hash"])
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = folder / "results.csv", folder / "results.md"
    table.assign(params=table["params"].round().astype("Int64")).to_csv(csv_path, index=False, float_format="%.6g")
    md_path.write_text(markdown_report(table, experiment, missing_lines, diverged_report(train)), encoding="utf-8")
    return [md_path, csv_path]


def main(argv: list[str] | None = None) -> int:
    return run_cli("report.py", __doc__, write_report, argv)


if __name__ == "__main__":
    sys.exit(main())
