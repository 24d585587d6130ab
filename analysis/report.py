"""Results table of a cnn-zoo experiment, from its MLflow records alone.

    python analysis/report.py --experiment cnn-zoo [--tracking-uri URI] [--out .]
                              [--recipe NAME_OR_HASH] [--allow-mixed-recipes]

Writes results.md and results.csv: one row per architecture (with its hyperparameters) and dataset with
params, FLOPs, seeds, final test accuracy mean ± std, test accuracy at best validation, training time,
recipe, and the published reference with its source and our difference to it. Only FINISHED train and
retrain runs count; several recipes need --allow-mixed-recipes (rows then carry their recipe).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python analysis/report.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd

from analysis.aggregate import (AnalysisError, aggregate_runs, check_recipe_exists, complete_runs, dataset_name,
                                finished_runs, ignored_runs_note, match_references, missing_metrics, missing_report,
                                recipe_label, recipe_mask, results_table, select_recipes)
from analysis.cli import build_parser, warn
from analysis.mlflow_data import load_experiment
from analysis.references import CITATIONS

DASH = "—"
COLUMNS = ("Architecture", "Family", "Dataset", "Params (M)", "GFLOPs", "Seeds", "Final test acc (%)",
           "Test acc @ best val (%)", "Train time (min)", "Recipe", "Reference (%)", "Source", "Δ vs ref (pp)")
TEXT_COLUMNS = {"Architecture", "Family", "Dataset", "Recipe", "Source"}  # left-aligned; numbers right


def _num(value: float, digits: int) -> str:
    return DASH if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _mean_std(mean: float, std: float, digits: int = 2) -> str:
    if pd.isna(mean):
        return DASH
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _signed(value: float) -> str:
    return DASH if pd.isna(value) else f"{value:+.2f}"


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
        rows.append([r["model"], r["family"], dataset_name(r["dataset"]), _num(r["params"] / 1e6, 2),
                     _num(r["gflops"], 3), seeds, _mean_std(r["final_test_acc_mean"], r["final_test_acc_std"]),
                     _mean_std(r["test_acc_at_best_val_mean"], r["test_acc_at_best_val_std"]),
                     _mean_std(r["train_minutes_mean"], r["train_minutes_std"], 1),
                     recipe_label(r["recipe"], r["recipe_hash"]), _num(r["reference_test_acc"], 2), source,
                     _signed(r["diff_vs_reference"])])
    return rows


def markdown_report(table: pd.DataFrame, experiment: str, missing_lines: list[str]) -> str:
    """results.md: the table, how to read it, the full references and the runs that lack metrics."""
    lines = [
        f"# Results: experiment `{experiment}`",
        "",
        f"{int(table['runs'].sum())} FINISHED train/retrain runs in {len(table)} rows. Final test acc: test "
        "accuracy after the last epoch, mean ± sample std over seeds. Test acc @ best val: test accuracy at the "
        f"epoch of best validation accuracy ({DASH} where the recipe has no validation split). Δ vs ref: our final "
        "test accuracy minus the published number, in percentage points. GFLOPs: forward FLOPs per 32×32 image "
        "(1 MAC = 2 FLOPs).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c in TEXT_COLUMNS else "---:" for c in COLUMNS) + "|",
        *("| " + " | ".join(_cell(c) for c in row) + " |" for row in markdown_rows(table)),
    ]
    sources = list(dict.fromkeys(table["reference_source"].dropna()))
    if sources:
        lines += ["", "## References", "", *(f"- **{s}**: {CITATIONS.get(s, s)}" for s in sources)]
    if missing_lines:
        lines += ["", "## Runs with missing metrics", "", *(f"- {line.removeprefix('warning: ')}"
                                                          for line in missing_lines)]
    return "\n".join(lines) + "\n"


def write_report(uri: str, experiment: str, out: Path, recipe: str | None = None,
                 allow_mixed: bool = False) -> list[Path]:
    """Read the experiment, write results.md and results.csv into ``out``; returns both paths."""
    _, runs = load_experiment(uri, experiment)
    note = ignored_runs_note(runs)
    if note:
        warn(note)
    train = finished_runs(runs)
    if train.empty:
        raise AnalysisError(f"experiment {experiment!r} has no FINISHED train or retrain runs "
                            f"({len(runs)} runs in all)")
    check_recipe_exists(train, recipe)
    if recipe is not None:
        train = train[recipe_mask(train, recipe)]
    missing_lines = missing_report(missing_metrics(train))
    for line in missing_lines:
        warn(line)
    agg = aggregate_runs(select_recipes(complete_runs(train), allow_mixed=allow_mixed))
    table = results_table(agg, match_references(agg))
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "results.md"
    table.assign(params=table["params"].round().astype("Int64")).to_csv(csv_path, index=False, float_format="%.6g")
    md_path.write_text(markdown_report(table, experiment, missing_lines), encoding="utf-8")
    return [md_path, csv_path]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("report.py", __doc__, ".")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.tracking_uri, args.experiment, Path(args.out), args.recipe,
                               args.allow_mixed_recipes)
    except AnalysisError as e:
        parser.fail(e)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
