"""Pure plotting functions: DataFrames in, matplotlib Figures out; only ``save_figure`` touches the disk.

Figures are built on the Agg canvas without pyplot (nothing global to close or leak), in seaborn's
whitegrid style. Every figure's title names its recipe(s); legends sit outside the axes. Artists that
carry data have a ``gid`` ("runs", "errorbars", "references", "pareto-<dataset>", "trials", ...), so
tests and SVG readers can find and count them; each "references" artist's label is its source.
"""
from __future__ import annotations

import contextlib
import math
import textwrap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window; before seaborn imports pyplot

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import EngFormatter, LogFormatter, MaxNLocator  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from analysis.aggregate import FINISHED, EmptyFigureError, dataset_name, pareto_front, recipe_label  # noqa: E402
from analysis.references import REFERENCES  # noqa: E402

FAMILY_ORDER = ("alexnet", "vgg", "googlenet", "inception", "resnet", "densenet", "bit", "timm")
DATASET_MARKERS = {"cifar10": "o", "cifar100": "s"}
DATASET_LINESTYLES = {"cifar10": "-", "cifar100": "--"}
# Hollow shapes of published numbers, one per source; none is a dataset marker, so ours never look published.
SOURCE_MARKERS = ("^", "v", "p", "h", "X", "<", ">", "*")
REFERENCE_DODGE = 8.0  # points between the markers of several sources of one model, side by side at its x
CURVE_METRICS = {"val_acc": "validation accuracy", "test_acc": "test accuracy"}
K, THETA, DEPTH = "model.growth_rate", "model.compression", "model.depth"
DEFAULT_BC = {"growth_rate": 12, "compression": 0.5}  # DenseNet-BC of Huang et al. 2017
HIGHLIGHT = "crimson"


@dataclass(frozen=True)
class XAxis:
    column: str  # in the aggregate frame
    label: str
    scale: float  # multiplies the column into the axis unit
    title: str
    std: str | None = None  # the column's std, drawn as a horizontal error bar


X_AXES = {
    "params": XAxis("param_count", "trainable parameters (log scale)", 1.0, "trainable parameters"),
    "flops": XAxis("flops", "forward GFLOPs per image (log scale)", 1e-9, "forward FLOPs per image"),
    "train_time": XAxis("train_seconds_mean", "training time (minutes, log scale)", 1 / 60, "training time",
                        std="train_seconds_std"),
}


@contextlib.contextmanager
def _style() -> Iterator[None]:
    with matplotlib.rc_context({**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.85)}):
        yield


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def family_palette(families: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """Fixed colours for the zoo's families (the same in every figure), extra ones after them."""
    fixed = dict(zip(FAMILY_ORDER, sns.color_palette("tab10", len(FAMILY_ORDER))))
    extra = sorted(set(families) - set(fixed))
    return {**fixed, **dict(zip(extra, sns.color_palette("husl", len(extra))))}


def _marker(dataset: str) -> str:
    return DATASET_MARKERS.get(dataset, "D")


def source_markers(sources: Iterable[str]) -> dict[str, str]:
    """A marker shape per reference source, the same in every figure (``REFERENCES``' order first)."""
    known = list(dict.fromkeys(r.source for r in REFERENCES))
    ordered = known + sorted(set(sources) - set(known))
    return {source: SOURCE_MARKERS[i % len(SOURCE_MARKERS)] for i, source in enumerate(ordered)}


def _linestyle(dataset: str) -> str:
    return DATASET_LINESTYLES.get(dataset, ":")


def _header(text: str) -> Line2D:
    return Line2D([], [], linestyle="", label=text)


def _legend(fig: Figure, handles: list[Line2D | Patch], headers: Iterable[str] = ()) -> None:
    legend = fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize="small")
    bold = set(headers)
    for text in legend.get_texts():
        if text.get_text() in bold:
            text.set_fontweight("bold")


def _caption(fig: Figure, text: str) -> None:
    """A wrapped caption under the axes (``save_figure``'s tight bounding box keeps it in)."""
    width = max(60, int(fig.get_figwidth() * 15))
    fig.text(0.01, -0.01, textwrap.fill(text, width), ha="left", va="top", fontsize="small", color="0.25")


class _PlainLogFormatter(LogFormatter):
    """Log-axis labels as plain numbers ("20", "1M") instead of "2 × 10¹"; LogFormatter still decides which
    minor ticks get a label (all of them on an axis spanning less than a decade)."""

    def __init__(self, text: Callable[[float], str]) -> None:
        super().__init__(labelOnlyBase=False)
        self._text = text

    def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
        return self._text(x)


def _plain_log_ticks(ax: Axes, params: bool) -> None:
    ax.set_xscale("log")
    text = EngFormatter(sep="").format_eng if params else (lambda v: f"{v:g}")
    ax.xaxis.set_major_formatter(_PlainLogFormatter(text))
    ax.xaxis.set_minor_formatter(_PlainLogFormatter(text))


def accuracy_figure(agg: pd.DataFrame, matched: pd.DataFrame, x: str = "params") -> Figure:
    """Final test accuracy (mean over seeds, ±1 std bars) against ``x`` ("params", "flops" or "train_time").

    ``agg`` is ``aggregate_runs``' frame, ``matched`` is ``match_references``' pairs. Colour = family,
    marker = dataset; published numbers are hollow markers, one shape per source, at our x of the same
    architecture (side by side when several sources match it), joined to our point by a dotted line; a
    step line per dataset traces the Pareto front. One panel per recipe.
    """
    axis = X_AXES[x]
    points = agg.assign(
        _x=agg[axis.column] * axis.scale,
        _y=agg["final_test_acc_mean"],
        _yerr=agg["final_test_acc_std"].fillna(0.0),
        _xerr=(agg[axis.std] * axis.scale).fillna(0.0) if axis.std else 0.0,
    ).dropna(subset=["_x", "_y"])
    if points.empty:
        raise EmptyFigureError(f"no model has both {axis.column} and final_test_acc: accuracy_vs_{x} not drawn")
    refs = matched[["model_id", "priority", "ref_test_acc", "ref_source"]].merge(
        points[["model_id", "_x", "_y", "family", "dataset", "recipe_label"]], on="model_id")
    palette = family_palette(points["family"])
    sources = list(dict.fromkeys(refs.sort_values("priority", kind="stable")["ref_source"]))
    markers = source_markers(sources)
    recipes = sorted(points["recipe_label"].unique())
    with _style():
        fig = _figure(6.2 * len(recipes) + 3.0, 5.4)
        axes = fig.subplots(1, len(recipes), sharey=True, squeeze=False)[0]
        for ax, recipe in zip(axes, recipes):
            _accuracy_panel(ax, points[points["recipe_label"] == recipe], refs[refs["recipe_label"] == recipe],
                            palette, markers, axis, x == "params")
            if len(recipes) > 1:
                ax.set_title(f"recipe {recipe}")
        axes[0].set_ylabel("test accuracy (%)")
        where = f"recipe {recipes[0]}" if len(recipes) == 1 else "one panel per recipe"
        fig.suptitle(f"Test accuracy vs {axis.title} — {where}")
        families = [f for f in palette if f in set(points["family"])]
        datasets = sorted(points["dataset"].unique())
        published = [Line2D([], [], marker=markers[s], linestyle="", color="0.4", markerfacecolor="none", label=s)
                     for s in sources]
        _legend(fig, [
            _header("family"),
            *[Line2D([], [], marker="o", linestyle="", color=palette[f], label=f) for f in families],
            _header("dataset"),
            *[Line2D([], [], marker=_marker(d), linestyle="", color="0.4", label=dataset_name(d)) for d in datasets],
            _header("marks"),
            Line2D([], [], marker="o", color="0.4", markeredgecolor="white", label="ours: mean ± 1 std over seeds"),
            *[Line2D([], [], linestyle=_linestyle(d), color="0.25", label=f"Pareto front, {dataset_name(d)}")
              for d in datasets],
            *([_header("published (hollow)"), *published,
               Line2D([], [], linestyle=":", color="0.4", label="gap to ours")] if sources else []),
        ], headers=("family", "dataset", "marks", "published (hollow)"))
        timing = " x is mean wall-clock training time (± 1 std)." if x == "train_time" else ""
        published_text = ("Hollow markers: published accuracy of the same architecture and dataset, one shape per "
                          "source, drawn at our x (side by side where several sources match one model)."
                          if sources else "No published number matches these runs.")
        _caption(fig, f"Only FINISHED runs. Points: our final test accuracy, mean over seeds (bars: ± 1 sample "
                      f"std). {published_text} Step lines: the most accurate model at or below each x.{timing}")
    return fig


def _accuracy_panel(ax: Axes, points: pd.DataFrame, refs: pd.DataFrame, palette: dict, markers: dict[str, str],
                    axis: XAxis, params: bool) -> None:
    for family, group in points.groupby("family"):
        bars = ax.errorbar(group["_x"], group["_y"], yerr=group["_yerr"],
                           xerr=group["_xerr"] if axis.std else None, fmt="none", ecolor=palette[family],
                           elinewidth=1.0, capsize=2.5, alpha=0.8, zorder=2)
        for collection in bars.lines[2]:
            collection.set_gid("errorbars")
    sns.scatterplot(data=points, x="_x", y="_y", hue="family", style="dataset", palette=palette,
                    markers={d: _marker(d) for d in points["dataset"].unique()}, s=70, edgecolor="white",
                    linewidth=0.6, legend=False, zorder=3, ax=ax)
    ax.collections[-1].set_gid("runs")
    if not refs.empty:
        ax.vlines(refs["_x"], refs["_y"], refs["ref_test_acc"], colors=[palette[f] for f in refs["family"]],
                  linestyles=":", linewidth=1.0, zorder=1, gid="reference-gaps")
        # A model's references in priority order, centred on its x and REFERENCE_DODGE points apart.
        rank = refs.groupby("model_id").cumcount()
        width = refs.groupby("model_id")["model_id"].transform("size")
        refs = refs.assign(_dodge=(rank - (width - 1) / 2) * REFERENCE_DODGE)
        for (source, dodge), group in refs.groupby(["ref_source", "_dodge"], sort=False):
            ax.scatter(group["_x"], group["ref_test_acc"], marker=markers[source], s=70, facecolors="none",
                       edgecolors=[palette[f] for f in group["family"]], linewidths=1.4, zorder=4, gid="references",
                       label=source, transform=offset_copy(ax.transData, ax.figure, x=dodge, units="points"))
    for dataset, group in points.groupby("dataset"):
        front = pareto_front(group, "_x", "_y")
        ax.step(front["_x"], front["_y"], where="post", color="0.25", linestyle=_linestyle(dataset),
                linewidth=1.3, alpha=0.85, zorder=1.5, gid=f"pareto-{dataset}")
    for _, point in points.iterrows():
        ax.annotate(point["model"], (point["_x"], point["_y"]), xytext=(4, 3), textcoords="offset points",
                    fontsize=6.5, color="0.3")
    _plain_log_ticks(ax, params)
    ax.set_xlabel(axis.label)
    ax.set_ylabel("test accuracy (%)")


def learning_curves_figure(curves: pd.DataFrame) -> Figure:
    """Validation and test accuracy per epoch, one panel per (recipe, dataset, model): the mean over seeds
    with a ±1 std band. ``curves`` is ``curves_frame``' output."""
    if curves.empty:
        raise EmptyFigureError("no per-epoch val_acc/test_acc history: learning_curves not drawn")
    panels = (curves[["recipe_label", "dataset", "family", "model", "panel"]].drop_duplicates()
              .sort_values(["recipe_label", "dataset", "family", "model"], ignore_index=True))
    recipes = sorted(curves["recipe_label"].unique())
    colours = dict(zip(CURVE_METRICS, sns.color_palette("deep", 2)))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with _style():
        fig = _figure(3.5 * ncols + 2.4, 2.7 * nrows + 1.0)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (_, panel) in zip(axes, panels.iterrows()):
            data = curves[(curves["recipe_label"] == panel["recipe_label"]) & (curves["panel"] == panel["panel"])]
            for metric, colour in colours.items():
                series = data[data["metric"] == metric]
                if series.empty:
                    continue
                sns.lineplot(data=series, x="epoch", y="value", color=colour, errorbar="sd", legend=False, ax=ax)
                ax.get_lines()[-1].set_gid(metric)
            title = panel["panel"] + (f"\n{panel['recipe_label']}" if len(recipes) > 1 else "")
            ax.set_title(title, fontsize="small")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("accuracy (%)")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        where = f"recipe {recipes[0]}" if len(recipes) == 1 else "recipe named in each panel"
        fig.suptitle(f"Learning curves: validation and test accuracy per epoch — {where}")
        _legend(fig, [*[Line2D([], [], color=c, label=CURVE_METRICS[m]) for m, c in colours.items()],
                      Patch(color="0.8", label="± 1 std over seeds")])
        _caption(fig, "Only FINISHED runs. Lines: mean over seeds at each epoch; bands: ± 1 sample std where a "
                      "model has several seeds. Validation accuracy is on the held-out part of the training set; "
                      "full-train runs (val_size 0) have test accuracy only.")
    return fig


def _is_default(trials: pd.DataFrame) -> pd.Series:
    """Trials at DenseNet-BC's defaults k = 12, θ = 0.5 (at the study's depth: a sweep enqueues this point
    first whenever its space holds it)."""
    hit = (trials[K] == DEFAULT_BC["growth_rate"]) & np.isclose(trials[THETA].astype(float), DEFAULT_BC["compression"])
    return hit.fillna(False).astype(bool)


def sweep_figure(trials: pd.DataFrame, study: str) -> Figure:
    """A sweep study: its k × θ map of best validation accuracy and its Pareto front (parameters against
    best validation accuracy), the default DenseNet-BC (k = 12, θ = 0.5) ringed in both.

    ``trials`` are the study's trial runs. Only FINISHED trials count; PRUNED ones appear on the map as
    small grey crosses at their (k, θ). One row of panels per recipe.
    """
    if K not in trials.columns or THETA not in trials.columns:
        raise EmptyFigureError(f"study {study!r} has no model.growth_rate / model.compression params: "
                               f"no k × θ map drawn")
    finished = trials[trials["status"] == FINISHED].dropna(subset=[K, THETA, "best_val_acc"])
    pruned = trials[(trials["status"] != FINISHED) & (trials["trial_state"] == "PRUNED")].dropna(subset=[K, THETA])
    if finished.empty:
        raise EmptyFigureError(f"study {study!r} has no FINISHED trial with k, θ and best_val_acc: not drawn")
    labels = pd.Series([recipe_label(r, h) for r, h in zip(trials["recipe"], trials["recipe_hash"])],
                       index=trials.index)
    recipes = sorted(labels[finished.index].unique())
    depths = sorted(finished[DEPTH].dropna().unique()) if DEPTH in finished.columns else []
    depth_markers = dict(zip(depths, "o^sDvP")) if len(depths) > 1 else {}
    cmap = sns.color_palette("viridis", as_cmap=True)
    norm = Normalize(finished["best_val_acc"].min(), finished["best_val_acc"].max())
    with _style():
        fig = _figure(13.0, 4.6 * len(recipes) + 0.8)
        for (ax_map, ax_front), recipe in zip(fig.subplots(len(recipes), 2, squeeze=False), recipes):
            done = finished[labels[finished.index] == recipe]
            _sweep_map(ax_map, done, pruned[labels[pruned.index] == recipe], depth_markers, cmap, norm)
            fig.colorbar(ScalarMappable(norm, cmap), ax=ax_map, label="best validation accuracy (%)")
            _sweep_front(ax_front, done, cmap, norm)
            suffix = f" — recipe {recipe}" if len(recipes) > 1 else ""
            ax_map.set_title(f"k × θ map{suffix}")
            ax_front.set_title(f"Pareto front{suffix}")
        where = f"recipe {recipes[0]}" if len(recipes) == 1 else "one row per recipe"
        fig.suptitle(f"Sweep {study}: DenseNet-BC growth rate k × compression θ — {where}")
        _legend(fig, [
            Line2D([], [], marker="o", linestyle="", color="0.5", label="FINISHED trial (colour: best val. acc.)"),
            Line2D([], [], marker="x", linestyle="", color="0.6", label="PRUNED trial"),
            Line2D([], [], marker="o", linestyle="", markersize=12, markerfacecolor="none", markeredgewidth=2,
                   color=HIGHLIGHT, label="default DenseNet-BC (k=12, θ=0.5)"),
            Line2D([], [], color="0.25", label="Pareto front"),
            *[Line2D([], [], marker=m, linestyle="", color="0.5", label=f"depth L={d}")
              for d, m in depth_markers.items()],
        ])
        _caption(fig, f"{len(finished)} FINISHED trials count (validation accuracy only: trials never see the "
                      f"test set); {len(pruned)} PRUNED trials are shown at their (k, θ) only; failed trials are "
                      f"left out. Front: the most accurate trial at or below each parameter count.")
    return fig


def _sweep_map(ax: Axes, done: pd.DataFrame, pruned: pd.DataFrame, depth_markers: dict, cmap, norm: Normalize) -> None:
    groups = [(done[done[DEPTH] == d], m) for d, m in depth_markers.items()] if depth_markers else [(done, "o")]
    for group, marker in groups:
        ax.scatter(group[K].astype(float), group[THETA], c=group["best_val_acc"], cmap=cmap, norm=norm, marker=marker,
                   s=90,
                   edgecolors="white", linewidths=0.6, zorder=3, gid="trials")
    ax.scatter(pruned[K].astype(float), pruned[THETA], marker="x", s=22, color="0.6", linewidths=1.0, zorder=2,
               gid="pruned")
    ax.scatter([DEFAULT_BC["growth_rate"]], [DEFAULT_BC["compression"]], s=320, facecolors="none",
               edgecolors=HIGHLIGHT, linewidths=2.0, zorder=4, gid="default")
    ax.set_xlabel("growth rate k (channels per layer)")
    ax.set_ylabel("compression θ (transition keeps θ·m channels)")


def _sweep_front(ax: Axes, done: pd.DataFrame, cmap, norm: Normalize) -> None:
    done = done.dropna(subset=["param_count"])
    ax.scatter(done["param_count"], done["best_val_acc"], c=done["best_val_acc"], cmap=cmap, norm=norm, s=45,
               edgecolors="white", linewidths=0.5, zorder=3, gid="study-trials")
    front = pareto_front(done, "param_count", "best_val_acc")
    ax.step(front["param_count"], front["best_val_acc"], where="post", color="0.25", linewidth=1.3, zorder=2,
            gid="pareto")
    for _, trial in front.iterrows():
        ax.annotate(f"k={trial[K]:g}, θ={trial[THETA]:.2f}", (trial["param_count"], trial["best_val_acc"]),
                    xytext=(4, -10), textcoords="offset points", fontsize=6.5, color="0.3")
    default = done[_is_default(done)]
    ax.scatter(default["param_count"], default["best_val_acc"], s=240, facecolors="none", edgecolors=HIGHLIGHT,
               linewidths=2.0, zorder=4, gid="default")
    _plain_log_ticks(ax, params=True)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("best validation accuracy (%)")


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` (150 dpi) and ``<stem>.svg`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths
