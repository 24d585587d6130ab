"""Pure plotting functions: DataFrames in, matplotlib Figures out; only ``save_figure`` touches the disk.

Figures are built on the Agg canvas without pyplot (nothing global to close or leak), in seaborn's
whitegrid style. Every figure's title names its recipe(s) with their protocol (epochs, batch, images);
legends sit outside the axes; captions say what the marks and bars are. Artists that carry data have a
``gid`` ("runs", "errorbars", "references", "pareto-<dataset>", "trials", "diverged", "chance", ...), so
tests and SVG readers can find and count them; each "references" artist's label is its source.
"""
from __future__ import annotations

import contextlib
import math
import textwrap
from collections.abc import Iterable, Iterator
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
from matplotlib.ticker import EngFormatter, FixedLocator, FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from analysis.aggregate import FINISHED, TIMING_STEPS, TIMING_WITH_EVAL, dataset_name, pareto_front  # noqa: E402
from analysis.errors import EmptyFigureError  # noqa: E402
from analysis.recipes import recipe_label, recipe_title  # noqa: E402
from analysis.references import REFERENCES  # noqa: E402
from analysis.stats import LEVEL  # noqa: E402
from experiments.names import (BEST_VAL_ACC, FINAL_TEST_ACC, FLOPS, MODEL_PARAM_PREFIX, PARAM_COUNT,  # noqa: E402
                               TEST_ACC, TRAIN_SECONDS, VAL_ACC)

FAMILY_ORDER = ("alexnet", "vgg", "googlenet", "inception", "resnet", "densenet", "bit", "timm")
DATASET_MARKERS = {"cifar10": "o", "cifar100": "s"}
DATASET_LINESTYLES = {"cifar10": "-", "cifar100": "--"}
# Hollow shapes of published numbers, one per source; none is a dataset marker, so ours never look published.
SOURCE_MARKERS = ("^", "v", "p", "h", "X", "<", ">", "*")
DEPTH_MARKERS = "o^sDvP"  # sweep trials, one shape per depth L when a study has several
REFERENCE_DODGE = 8.0  # points between the markers of several sources of one model, side by side at its x
DEPTH_DODGE = 7.0  # points between the trials of several depths at one (k, θ)
CURVE_METRICS = {VAL_ACC: "validation accuracy", TEST_ACC: "test accuracy"}
K, THETA, DEPTH = (f"{MODEL_PARAM_PREFIX}{hp}" for hp in ("growth_rate", "compression", "depth"))
DEFAULT_BC = {"growth_rate": 12, "compression": 0.5}  # DenseNet-BC of Huang et al. 2017
HIGHLIGHT = "crimson"
CI = f"{LEVEL:.0%} CI"
WITH_EVAL_MARK = "†"
# Drawn over the mark of a model or trial with runs tagged diverged (cnn_zoo.diverged).
DIVERGED_STYLE = {"marker": "x", "color": "black", "linewidths": 1.8, "zorder": 6}
DIVERGED_LABEL = "× diverged run(s) included"


@dataclass(frozen=True)
class XAxis:
    column: str  # in the aggregate frame
    label: str
    scale: float  # multiplies the column into the axis unit
    title: str
    ci: str | None = None  # the column's 95% CI half-width, drawn as a horizontal error bar
    engineering: bool = False  # tick labels as 200k, 1M


# How train_seconds was measured (aggregate.TIMING_*) -> the train-time axis label and caption.
TIME_LABELS = {TIMING_STEPS: "training time, steps only (minutes, log scale)",
               TIMING_WITH_EVAL: "training + evaluation time (minutes, log scale)"}
TIME_NOTES = {TIMING_STEPS: "mean time of the training steps alone (evaluation excluded)",
              TIMING_WITH_EVAL: "mean train_seconds of runs recorded before the harness timed evaluation apart, "
                                "so it includes evaluation"}
TIME_NOTE_MIXED = (f"mean training time; {WITH_EVAL_MARK} marks models whose runs were recorded before the harness "
                   "timed evaluation apart (their time includes evaluation)")
X_AXES = {
    "params": XAxis(PARAM_COUNT, "trainable parameters (log scale)", 1.0, "trainable parameters", engineering=True),
    "flops": XAxis(FLOPS, "forward GFLOPs per image (log scale)", 1e-9, "forward FLOPs per image"),
    "train_time": XAxis(f"{TRAIN_SECONDS}_mean", f"training time (minutes, log scale; {WITH_EVAL_MARK} includes "
                        "evaluation)", 1 / 60, "training time", ci=f"{TRAIN_SECONDS}_ci"),
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


def _source_notes(refs: pd.DataFrame) -> dict[str, list[str]]:
    """Each source's distinct notes on the numbers drawn: how they differ from what ours measure."""
    noted = refs[refs["ref_note"] != ""]
    return {source: list(dict.fromkeys(group["ref_note"])) for source, group in noted.groupby("ref_source")}


def _source_legend(source: str, marker: str, notes: list[str]) -> list[Line2D]:
    """A published source's hollow marker, then each of its notes as text under it."""
    return [Line2D([], [], marker=marker, linestyle="", color="0.4", markerfacecolor="none", label=source),
            *(_header(textwrap.fill(note, 48, initial_indent="– ", subsequent_indent="  ", break_on_hyphens=False))
              for note in notes)]


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


def _recipes(frame: pd.DataFrame) -> dict[str, object]:
    """Each recipe label of ``frame`` (sorted) -> its protocol (``analysis.recipes.recipe_protocols``)."""
    firsts = frame.drop_duplicates("recipe_label").sort_values("recipe_label")
    return dict(zip(firsts["recipe_label"], firsts["recipe_protocol"]))


def _suptitle(fig: Figure, what: str, recipes: dict[str, object], several: str) -> None:
    """``what``, then the one recipe with its protocol on a second line (or ``several``)."""
    where = f"recipe {recipe_title(*next(iter(recipes.items())))}" if len(recipes) == 1 else several
    fig.suptitle(f"{what}\n{where}")


def _recipes_note(recipes: dict[str, object]) -> str:
    """The caption's list of recipes and protocols, where a figure has several (one has it in the title)."""
    return " Recipes: " + "; ".join(recipe_title(*r) for r in recipes.items()) + "." if len(recipes) > 1 else ""


def log_ticks(low: float, high: float, max_ticks: int = 8) -> list[float]:
    """1-2-5 ticks from the largest at or below ``low`` to the smallest at or above ``high``, so that every
    point lies between two labelled ticks; beyond ``max_ticks`` only powers of ten and the two ends stay."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    candidates = [(m * 10.0 ** e, m == 1) for e in range(first, last + 1) for m in (1, 2, 5)]
    below = max(v for v, _ in candidates if v <= low * (1 + 1e-9))
    above = min(v for v, _ in candidates if v >= high * (1 - 1e-9))
    ticks = [(v, decade) for v, decade in candidates if below <= v <= above]
    if len(ticks) > max_ticks:
        ticks = [(v, decade) for v, decade in ticks if decade or v in (below, above)]
    return [v for v, _ in ticks]


def _log_x(ax: Axes, values: Iterable[float], engineering: bool) -> None:
    """A log x axis labelled with ``log_ticks`` across ``values`` (the data and its error-bar ends), as plain
    numbers ("200k", "0.5") rather than powers of ten; its limits sit just outside the outer ticks."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    ax.set_xscale("log")
    if not positive:
        return
    ticks = log_ticks(min(positive), max(positive))
    text = EngFormatter(sep="").format_eng if engineering else (lambda v: f"{v:g}")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: text(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(ticks[0] / 1.15, ticks[-1] * 1.15)


def accuracy_figure(agg: pd.DataFrame, matched: pd.DataFrame, x: str = "params") -> Figure:
    """Final test accuracy (mean over seeds, bars: 95% CI, Student t) against ``x`` ("params", "flops" or
    "train_time").

    ``agg`` is ``aggregate_runs``' frame, ``matched`` is ``match_references``' pairs. Colour = family,
    marker = dataset; each point's label gives its seed count, "best" for the most accurate model of its
    dataset and "≈ best" where the difference to it is not significant (Welch 95% CI holds 0); × marks a
    model with runs tagged diverged. Published numbers are hollow markers, one shape per source, at our x of
    the same architecture (side by side when several sources match it), joined to our point by a dotted
    line; a step line per dataset traces the Pareto front. One panel per recipe.
    """
    axis = X_AXES[x]
    points = _accuracy_points(agg, axis, x == "train_time")
    if points.empty:
        raise EmptyFigureError(f"no model has both {axis.column} and final_test_acc: accuracy_vs_{x} not drawn")
    refs = matched[["model_id", "priority", "ref_test_acc", "ref_source", "ref_note"]].merge(
        points[["model_id", "_x", "_y", "family", "dataset", "recipe_label"]], on="model_id")
    palette = family_palette(points["family"])
    sources = list(dict.fromkeys(refs.sort_values("priority", kind="stable")["ref_source"]))
    markers = source_markers(sources)
    recipes = _recipes(points)
    timings = set(points["timing"])
    with _style():
        fig = _figure(6.2 * len(recipes) + 3.0, 5.6)
        axes = fig.subplots(1, len(recipes), sharey=True, squeeze=False)[0]
        for ax, (label, protocol) in zip(axes, recipes.items()):
            _accuracy_panel(ax, points[points["recipe_label"] == label], refs[refs["recipe_label"] == label],
                            palette, markers, axis)
            if x == "train_time" and len(timings) == 1:
                ax.set_xlabel(TIME_LABELS.get(next(iter(timings)), axis.label))
            if len(recipes) > 1:
                ax.set_title(f"recipe {label}" + (f"\n{protocol}" if isinstance(protocol, str) else ""),
                             fontsize="small")
        axes[0].set_ylabel("test accuracy (%)")
        _suptitle(fig, f"Test accuracy vs {axis.title}", recipes, "one panel per recipe")
        _legend(fig, _accuracy_legend(points, palette, sources, markers, _source_notes(refs)),
                headers=("family", "dataset", "marks", "published (hollow)"))
        _caption(fig, _accuracy_caption(points, x, bool(sources)) + _recipes_note(recipes))
    return fig


def _accuracy_points(agg: pd.DataFrame, axis: XAxis, time_axis: bool) -> pd.DataFrame:
    """``agg`` with the plotted ``_x``, ``_y``, their CI half-widths and each point's ``_label``."""
    points = agg.assign(
        _x=agg[axis.column] * axis.scale,
        _y=agg[f"{FINAL_TEST_ACC}_mean"],
        _yerr=agg[f"{FINAL_TEST_ACC}_ci"].fillna(0.0),
        _xerr=(agg[axis.ci] * axis.scale).fillna(0.0) if axis.ci else 0.0,
    ).dropna(subset=["_x", "_y"])
    # † only where timings mix: otherwise the axis label says what every point's time measured.
    dagger = time_axis and points["timing"].nunique() > 1
    # Seed counts in the labels only where they differ (the caption gives a common one).
    seeds = points[f"{FINAL_TEST_ACC}_n"]
    counted = seeds.nunique() > 1
    near_best = points["diff_vs_best_significant"].eq(False).fillna(False)
    points["_label"] = [
        r["model"] + (f" · n={n}" if counted else "") + (" · best" if r["is_best"] else " · ≈ best" if near else "")
        + (f" {WITH_EVAL_MARK}" if dagger and r["timing"] != TIMING_STEPS else "")
        for (_, r), n, near in zip(points.iterrows(), seeds, near_best)]
    return points


def _accuracy_legend(points: pd.DataFrame, palette: dict, sources: list[str],
                     markers: dict[str, str], notes: dict[str, list[str]]) -> list[Line2D]:
    families = [f for f in palette if f in set(points["family"])]
    datasets = sorted(points["dataset"].unique())
    published = [entry for s in sources for entry in _source_legend(s, markers[s], notes.get(s, []))]
    return [
        _header("family"),
        *[Line2D([], [], marker="o", linestyle="", color=palette[f], label=f) for f in families],
        _header("dataset"),
        *[Line2D([], [], marker=_marker(d), linestyle="", color="0.4", label=dataset_name(d)) for d in datasets],
        _header("marks"),
        Line2D([], [], marker="o", color="0.4", markeredgecolor="white", label=f"ours: mean over seeds ± {CI}"),
        *[Line2D([], [], linestyle=_linestyle(d), color="0.25", label=f"Pareto front, {dataset_name(d)}")
          for d in datasets],
        *([Line2D([], [], linestyle="", markersize=8, markeredgewidth=1.8, **_diverged_line())]
          if points["n_diverged"].any() else []),
        *([_header("published (hollow)"), *published, Line2D([], [], linestyle=":", color="0.4", label="gap to ours")]
          if sources else []),
    ]


def _diverged_line() -> dict[str, object]:
    return {"marker": DIVERGED_STYLE["marker"], "color": DIVERGED_STYLE["color"], "label": DIVERGED_LABEL}


def _accuracy_caption(points: pd.DataFrame, x: str, published: bool) -> str:
    counts = points[f"{FINAL_TEST_ACC}_n"].unique()
    seeds = f"n = {counts[0]} seeds" if len(counts) == 1 else "the n seeds in each label"
    sentences = [
        (f"Only FINISHED runs. Points: our final test accuracy, mean over {seeds}; bars: {CI} of that mean "
         "(Student t, n − 1 degrees of freedom; none for a single seed). best: the most accurate model of its "
         f"dataset; ≈ best: its difference to the best is not significant at these seeds (Welch {CI} holds 0)."),
        ("Hollow markers: published accuracy of the same architecture and dataset, one shape per source, drawn at "
         "our x (side by side where several sources match one model).") if published else
        "No published number matches these runs.",
        "Step lines: the most accurate model at or below each x.",
    ]
    if x == "train_time":
        timings = set(points["timing"])
        sentences.append(f"x: {TIME_NOTES[timings.pop()] if len(timings) == 1 else TIME_NOTE_MIXED}, with its {CI} "
                         "as horizontal bars.")
    diverged = int(points["n_diverged"].sum())
    if diverged:
        sentences.append(f"×: {diverged} of these runs were flagged as diverged by the harness (they stay in the "
                         "means; see results.md).")
    return " ".join(sentences)


def _accuracy_panel(ax: Axes, points: pd.DataFrame, refs: pd.DataFrame, palette: dict, markers: dict[str, str],
                    axis: XAxis) -> None:
    for family, group in points.groupby("family"):
        bars = ax.errorbar(group["_x"], group["_y"], yerr=group["_yerr"],
                           xerr=group["_xerr"] if axis.ci else None, fmt="none", ecolor=palette[family],
                           elinewidth=1.0, capsize=2.5, alpha=0.8, zorder=2)
        for collection in bars.lines[2]:
            collection.set_gid("errorbars")
    sns.scatterplot(data=points, x="_x", y="_y", hue="family", style="dataset", palette=palette,
                    markers={d: _marker(d) for d in points["dataset"].unique()}, s=70, edgecolor="white",
                    linewidth=0.6, legend=False, zorder=3, ax=ax)
    ax.collections[-1].set_gid("runs")
    flagged = points[points["n_diverged"] > 0]
    _mark_diverged(ax, flagged["_x"], flagged["_y"], 60)
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
    # Neighbours along x label above and below their points in turn: close labels would overlap otherwise.
    for rank, (_, point) in enumerate(points.sort_values("_x").iterrows()):
        ax.annotate(point["_label"], (point["_x"], point["_y"]), xytext=(4, 3 if rank % 2 == 0 else -10),
                    textcoords="offset points", fontsize=6.5, color="0.3")
    _log_x(ax, pd.concat([points["_x"], points["_x"] - points["_xerr"], points["_x"] + points["_xerr"]]),
           axis.engineering)
    ax.set_xlabel(axis.label)
    ax.set_ylabel("test accuracy (%)")


def _mark_diverged(ax: Axes, x: pd.Series, y: pd.Series, size: float, transform=None) -> None:
    """× over the marks of models or trials with runs tagged diverged."""
    if len(x):
        ax.scatter(x, y, s=size, gid="diverged", transform=transform or ax.transData, **DIVERGED_STYLE)


def learning_curves_figure(curves: pd.DataFrame) -> Figure:
    """Validation and test accuracy per epoch, one panel per (recipe, dataset, model): the mean over seeds
    with a ±1 std band. All panels share one y range (0 to the highest accuracy) and show the chance level
    (100 / number of classes) as a dotted line, so a flat curve at chance cannot look like learning; panels
    with runs tagged diverged say so in red. ``curves`` is ``curves_frame``' output."""
    if curves.empty:
        raise EmptyFigureError("no per-epoch val_acc/test_acc history: learning_curves not drawn")
    panels = (curves[["recipe_label", "dataset", "family", "model", "panel"]].drop_duplicates()
              .sort_values(["recipe_label", "dataset", "family", "model"], ignore_index=True))
    recipes = _recipes(curves)
    colours = dict(zip(CURVE_METRICS, sns.color_palette("deep", 2)))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with _style():
        fig = _figure(3.5 * ncols + 2.4, 2.7 * nrows + 1.2)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
        for i, (ax, (_, panel)) in enumerate(zip(axes, panels.iterrows())):
            data = curves[(curves["recipe_label"] == panel["recipe_label"]) & (curves["panel"] == panel["panel"])]
            title = panel["panel"] + (f"\n{panel['recipe_label']}" if len(recipes) > 1 else "")
            _curve_panel(ax, data, colours, title)
            ax.set_ylabel("accuracy (%)" if i % ncols == 0 else "")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        axes[0].set_ylim(0, min(100.0, curves["value"].max() + 5))  # shared by every panel
        _suptitle(fig, "Learning curves: validation and test accuracy per epoch", recipes,
                  "recipe named in each panel")
        _legend(fig, [*[Line2D([], [], color=c, label=CURVE_METRICS[m]) for m, c in colours.items()],
                      Patch(color="0.8", label="± 1 std over seeds"),
                      Line2D([], [], color="0.35", linestyle=":", label="chance: 100 / classes")])
        _caption(fig, "Only FINISHED runs. Lines: mean over seeds at each epoch; bands: ± 1 sample std where a "
                      "model has several seeds. Every panel has the same y range; dotted: chance level "
                      "(100 / number of classes). Red titles: panels with runs the harness flagged as diverged. "
                      "Validation accuracy is on the held-out part of the training set; full-train runs "
                      "(val_size 0) have test accuracy only." + _recipes_note(recipes))
    return fig


def _curve_panel(ax: Axes, data: pd.DataFrame, colours: dict, title: str) -> None:
    for metric, colour in colours.items():
        series = data[data["metric"] == metric]
        if series.empty:
            continue
        sns.lineplot(data=series, x="epoch", y="value", color=colour, errorbar="sd", legend=False, ax=ax)
        ax.get_lines()[-1].set_gid(metric)
    classes = data["num_classes"].dropna().unique()
    if len(classes) == 1:
        ax.axhline(100 / classes[0], color="0.35", linestyle=":", linewidth=1.2, zorder=1, gid="chance")
    runs = data.drop_duplicates("run_id")
    diverged = int(runs["diverged"].notna().sum())
    if diverged:
        title += f"\ndiverged: {diverged} of {len(runs)} runs"
    ax.set_title(title, fontsize="small", color=HIGHLIGHT if diverged else "black")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _is_default(trials: pd.DataFrame) -> pd.Series:
    """Trials at DenseNet-BC's defaults k = 12, θ = 0.5 (at the study's depth: a sweep enqueues this point
    first whenever its space holds it)."""
    hit = (trials[K] == DEFAULT_BC["growth_rate"]) & np.isclose(trials[THETA].astype(float), DEFAULT_BC["compression"])
    return hit.fillna(False).astype(bool)


def sweep_figure(trials: pd.DataFrame, study: str) -> Figure:
    """A sweep study: its k × θ map of best validation accuracy and its Pareto front (parameters against
    best validation accuracy), the default DenseNet-BC (k = 12, θ = 0.5) ringed in both.

    ``trials`` are the study's trial runs. Only FINISHED trials count; PRUNED ones appear on the map as
    small grey crosses at their (k, θ). A study over several depths L draws one shape per depth in both
    panels (side by side on the map). × marks trials tagged diverged. One row of panels per recipe.
    """
    if K not in trials.columns or THETA not in trials.columns:
        raise EmptyFigureError(f"study {study!r} has no model.growth_rate / model.compression params: "
                               f"no k × θ map drawn")
    trials = trials.assign(recipe_label=[recipe_label(r, h) for r, h in zip(trials["recipe"], trials["recipe_hash"])])
    finished = trials[trials["status"] == FINISHED].dropna(subset=[K, THETA, BEST_VAL_ACC])
    pruned = trials[(trials["status"] != FINISHED) & (trials["trial_state"] == "PRUNED")].dropna(subset=[K, THETA])
    if finished.empty:
        raise EmptyFigureError(f"study {study!r} has no FINISHED trial with k, θ and best_val_acc: not drawn")
    recipes = _recipes(finished)
    depths = sorted(finished[DEPTH].dropna().unique()) if DEPTH in finished.columns else []
    depth_markers = dict(zip(depths, DEPTH_MARKERS)) if len(depths) > 1 else {}
    cmap = sns.color_palette("viridis", as_cmap=True)
    norm = Normalize(finished[BEST_VAL_ACC].min(), finished[BEST_VAL_ACC].max())
    with _style():
        fig = _figure(13.0, 4.6 * len(recipes) + 1.0)
        for (ax_map, ax_front), label in zip(fig.subplots(len(recipes), 2, squeeze=False), recipes):
            done = finished[finished["recipe_label"] == label]
            _sweep_map(ax_map, done, pruned[pruned["recipe_label"] == label], depth_markers, cmap, norm)
            _sweep_front(ax_front, done, depth_markers, cmap, norm)
            # One bar right of both panels (it colours both): clear of the front's axis label.
            fig.colorbar(ScalarMappable(norm, cmap), ax=[ax_map, ax_front], label="best validation accuracy (%)")
            suffix = f" — recipe {label}" if len(recipes) > 1 else ""
            ax_map.set_title(f"k × θ map{suffix}")
            ax_front.set_title(f"Pareto front{suffix}")
        _suptitle(fig, f"Sweep {study}: DenseNet-BC growth rate k × compression θ", recipes, "one row per recipe")
        _legend(fig, _sweep_legend(depth_markers, finished["diverged"].notna().any()))
        diverged = int(finished["diverged"].notna().sum())
        notes = (f" ×: {diverged} trials flagged as diverged by the harness." if diverged else "") + _recipes_note(
            recipes)
        _caption(fig, f"{len(finished)} FINISHED trials count (validation accuracy only: trials never see the "
                      f"test set); {len(pruned)} PRUNED trials are shown at their (k, θ) only; failed trials are "
                      f"left out. Front: the most accurate trial at or below each parameter count." + notes)
    return fig


def _sweep_legend(depth_markers: dict, diverged: bool) -> list[Line2D]:
    colour = "(colour: best val. acc.)"
    trials = ([Line2D([], [], marker=m, linestyle="", color="0.5", label=f"FINISHED trial, depth L={d} {colour}")
               for d, m in depth_markers.items()]
              or [Line2D([], [], marker="o", linestyle="", color="0.5", label=f"FINISHED trial {colour}")])
    return [
        *trials,
        Line2D([], [], marker="x", linestyle="", color="0.6", label="PRUNED trial"),
        Line2D([], [], marker="o", linestyle="", markersize=12, markerfacecolor="none", markeredgewidth=2,
               color=HIGHLIGHT, label="default DenseNet-BC (k=12, θ=0.5)"),
        Line2D([], [], color="0.25", label="Pareto front"),
        *([Line2D([], [], linestyle="", markersize=8, markeredgewidth=1.8, **_diverged_line())] if diverged else []),
    ]


def _by_depth(done: pd.DataFrame, depth_markers: dict) -> list[tuple[pd.DataFrame, str]]:
    """The trials per depth with its marker; all of them as circles when the study has one depth."""
    return [(done[done[DEPTH] == d], m) for d, m in depth_markers.items()] if depth_markers else [(done, "o")]


def _sweep_map(ax: Axes, done: pd.DataFrame, pruned: pd.DataFrame, depth_markers: dict, cmap, norm: Normalize) -> None:
    groups = _by_depth(done, depth_markers)
    for i, (group, marker) in enumerate(groups):
        # Several depths at one (k, θ) side by side, DEPTH_DODGE points apart, not on top of each other.
        shift = offset_copy(ax.transData, ax.figure, x=(i - (len(groups) - 1) / 2) * DEPTH_DODGE, units="points")
        ax.scatter(group[K].astype(float), group[THETA], c=group[BEST_VAL_ACC], cmap=cmap, norm=norm, marker=marker,
                   s=90, edgecolors="white", linewidths=0.6, zorder=3, gid="trials", transform=shift)
        ax.update_datalim(group[[K, THETA]].astype(float).to_numpy())  # shifted points do not autoscale
        flagged = group[group["diverged"].notna()]
        _mark_diverged(ax, flagged[K].astype(float), flagged[THETA], 50, transform=shift)
    ax.scatter(pruned[K].astype(float), pruned[THETA], marker="x", s=22, color="0.6", linewidths=1.0, zorder=2,
               gid="pruned")
    ax.scatter([DEFAULT_BC["growth_rate"]], [DEFAULT_BC["compression"]], s=320, facecolors="none",
               edgecolors=HIGHLIGHT, linewidths=2.0, zorder=4, gid="default")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("growth rate k (channels per layer)")
    ax.set_ylabel("compression θ (transition keeps θ·m channels)")


def _sweep_front(ax: Axes, done: pd.DataFrame, depth_markers: dict, cmap, norm: Normalize) -> None:
    done = done.dropna(subset=[PARAM_COUNT])
    for group, marker in _by_depth(done, depth_markers):
        ax.scatter(group[PARAM_COUNT], group[BEST_VAL_ACC], c=group[BEST_VAL_ACC], cmap=cmap, norm=norm,
                   marker=marker, s=45, edgecolors="white", linewidths=0.5, zorder=3, gid="study-trials")
    flagged = done[done["diverged"].notna()]
    _mark_diverged(ax, flagged[PARAM_COUNT], flagged[BEST_VAL_ACC], 40)
    front = pareto_front(done, PARAM_COUNT, BEST_VAL_ACC)
    ax.step(front[PARAM_COUNT], front[BEST_VAL_ACC], where="post", color="0.25", linewidth=1.3, zorder=2,
            gid="pareto")
    for _, trial in front.iterrows():
        depth = f"L={trial[DEPTH]}, " if depth_markers else ""
        # Slanted up-left of its point, where a front has no trials: neighbours' labels run side by side.
        ax.annotate(f"{depth}k={trial[K]:g}, θ={trial[THETA]:.2f}", (trial[PARAM_COUNT], trial[BEST_VAL_ACC]),
                    xytext=(-3, 3), textcoords="offset points", fontsize=6.5, color="0.3", rotation=-35,
                    rotation_mode="anchor", ha="right", va="bottom")
    default = done[_is_default(done)]
    ax.scatter(default[PARAM_COUNT], default[BEST_VAL_ACC], s=240, facecolors="none", edgecolors=HIGHLIGHT,
               linewidths=2.0, zorder=4, gid="default")
    _log_x(ax, done[PARAM_COUNT], engineering=True)
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.15 * (high - low))  # room for the slanted labels of the top of the front
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("best validation accuracy (%)")


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` (150 dpi) and ``<stem>.svg`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths
