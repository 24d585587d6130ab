"""Few-shot transfer (BiT's protocol): test accuracy against shots per pretrained model, mean and 95% CI over
seeds. Only fine-tuning runs (param ``pretrained``) count, so transfer never mixes with training from scratch;
every panel's title says which weights its models were fine-tuned from."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.aggregate import FINISHED, dataset_name
from analysis.errors import EmptyFigureError
from analysis.figures import CI, _figure, _style
from analysis.stats import ci_half_width
from experiments.names import FINAL_TEST_ACC, PRETRAINED

FULL = "full"  # the shots column of runs on the whole training split
GROUP = ["dataset", PRETRAINED, "arch", "recipe", "shots"]


def shots_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset, weights, architecture, recipe and shots (``full`` without --shots): the final test
    accuracy's mean, 95% CI half-width (Student t) and number of seeds, ordered by shots with full last."""
    tuned = runs[(runs["status"] == FINISHED) & runs[PRETRAINED].notna()].copy()
    if tuned.empty:
        raise EmptyFigureError("no finished fine-tuning runs (runs with --pretrained) to show against shots")
    tuned["shots"] = tuned["shots"].astype(object).where(tuned["shots"].notna(), FULL)
    rows = [dict(zip(GROUP, key), test_acc_mean=g[FINAL_TEST_ACC].mean(), test_acc_ci=ci_half_width(g[FINAL_TEST_ACC]),
                 n=int(g[FINAL_TEST_ACC].notna().sum()), train_size=int(g["train_size"].median()))
            for key, g in tuned.groupby(GROUP, dropna=False)]
    table = pd.DataFrame(rows)
    order = table["shots"].map(lambda s: math.inf if s == FULL else int(s))
    return table.assign(_order=order).sort_values([*GROUP[:4], "_order"]).drop(columns="_order")


def shots_figure(table: pd.DataFrame) -> Figure:
    """One panel per dataset and weights: test accuracy (mean, 95% CI bars) against shots, one line per
    architecture; the shots are evenly spaced categories (1, 5, 10, 25, ..., full)."""
    panels = list(table.groupby(["dataset", PRETRAINED]))
    shots = sorted(table["shots"].unique(), key=lambda s: math.inf if s == FULL else int(s))
    with _style():
        fig = _figure(4.5 * len(panels), 3.6)
        for ax, ((dataset, weights), panel) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            for arch, line in panel.groupby("arch"):
                x = [shots.index(s) for s in line["shots"]]
                ax.errorbar(x, line["test_acc_mean"], yerr=np.nan_to_num(line["test_acc_ci"]), marker="o",
                            capsize=3, label=arch, gid="errorbars")
            ax.set_xticks(range(len(shots)), [str(s) for s in shots])
            ax.set_title(f"{dataset_name(dataset)}: fine-tuned from {weights}")
            ax.set_xlabel("training images per class (shots)")
            ax.set_ylabel("final test accuracy (%)")
            ax.set_ylim(0, 100)  # an accuracy: a wide interval of two seeds must not stretch the axis past 100%
            ax.legend(fontsize="small")
        fig.suptitle(f"Few-shot transfer: mean and {CI} over seeds")
    return fig
