"""analysis/: synthetic runs logged into a temporary MLflow store, read back, aggregated, tabulated, plotted."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from scipy import stats

from analysis import plots, report
from analysis.aggregate import (TIMING_STEPS, TIMING_WITH_EVAL, aggregate_runs, complete_runs, curves_frame,
                                finished_runs, match_references, missing_metrics, missing_report, pareto_front,
                                results_table)
from analysis.errors import AnalysisError, MixedRecipesError
from analysis.figures import (HIGHLIGHT, TIME_LABELS, X_AXES, accuracy_figure, learning_curves_figure, log_ticks,
                              sweep_figure)
from analysis.mlflow_data import load_histories, load_runs
from analysis.recipes import filter_recipe, resolve_recipe, select_recipes
from analysis.references import CITATIONS, REFERENCES
from analysis.stats import compare_to_best
from tests.helpers import REPO

STANDARD = ("standard", "aaaaaaaaaaaa")
FULL = ("full", "bbbbbbbbbbbb")  # val_size 0: no validation metrics
FAST = ("fast", "cccccccccccc")  # the sweep's
# Experiment "twin-fast": two recipes named fast; the second overrides subset and lr (another hash, same name).
TWIN_FAST, TWIN_FAST_SUBSET = ("fast", "111111111111"), ("fast", "222222222222")
EPOCHS = 3
RESNET = {"shortcut": "A"}
DENSENET_BC = {"depth": 100, "growth_rate": 12, "compression": 0.5, "bn_size": 4, "drop_rate": 0.0,
               "memory_efficient": False}
# arch, family, dataset, recipe, seed, final test acc, params, flops, train seconds, hyperparameters
TRAIN_RUNS = [
    ("resnet20", "resnet", "cifar10", STANDARD, 0, 91.0, 272_474, 8.2e7, 600, RESNET),
    ("resnet20", "resnet", "cifar10", STANDARD, 1, 92.0, 272_474, 8.2e7, 660, RESNET),
    ("resnet20", "resnet", "cifar10", STANDARD, 2, 93.0, 272_474, 8.2e7, 720, RESNET),
    ("resnet56", "resnet", "cifar10", STANDARD, 0, 93.0, 855_770, 2.5e8, 1500, RESNET),
    ("resnet56", "resnet", "cifar10", STANDARD, 1, 93.5, 855_770, 2.5e8, 1560, RESNET),
    ("densenet_bc", "densenet", "cifar10", STANDARD, 0, 95.0, 769_162, 5.8e8, 4000, DENSENET_BC),
    ("densenet_bc", "densenet", "cifar10", STANDARD, 1, 95.4, 769_162, 5.8e8, 4100, DENSENET_BC),
    ("densenet_bc", "densenet", "cifar100", STANDARD, 0, 77.0, 800_032, 5.8e8, 4200, DENSENET_BC),
    ("vgg16_bn", "vgg", "cifar10", STANDARD, 0, 93.5, 14_728_266, 6.3e8, 1200, {"head": "linear"}),
    ("vgg16_bn", "vgg", "cifar10", STANDARD, 1, 93.9, 14_728_266, None, 1250, {"head": "linear"}),  # no flops
    ("resnet20", "resnet", "cifar10", FULL, 0, 91.5, 272_474, 8.2e7, 700, RESNET),
    ("resnet20", "resnet", "cifar10", FULL, 1, 92.5, 272_474, 8.2e7, 710, RESNET),
]
# growth rate, compression, best val acc, params
FINISHED_TRIALS = [(12, 0.5, 94.0, 769_162), (12, 0.3, 93.0, 500_000), (24, 0.5, 95.0, 2_900_000),
                   (24, 0.3, 94.5, 1_900_000), (16, 0.7, 93.5, 1_500_000), (8, 0.5, 92.0, 350_000)]
PRUNED_TRIALS = [(8, 0.3), (32, 0.7)]
STUDY = "dbc-k-theta"
DIVERGED_RUN = "vgg16_bn-cifar10-standard-s1"  # tagged cnn_zoo.diverged, as is the sweep's trial 1
DIVERGED_REASON = "training loss 9.8, above 3x its first value"
PROTOCOL = "3 epochs, batch 64, 45,000 train / 5,000 val images"  # every standard and fast run's
FULL_PROTOCOL = "3 epochs, batch 64, 50,000 train / 0 val images"


def _params(arch: str, family: str, dataset: str, recipe: tuple[str, str], seed: int, hparams: dict,
            val_size: int, **recipe_fields: object) -> list[Param]:
    values = {"arch": arch, "family": family, "dataset": dataset, "recipe": recipe[0], "recipe_hash": recipe[1],
              "seed": seed, "epochs": EPOCHS, "batch_size": 64, "data.digest": "d" * 16,
              "data.train_size": recipe_fields.get("subset") or 50_000 - val_size,
              "data.val_size": val_size, "data.test_size": 10_000,
              "data.num_classes": 100 if dataset == "cifar100" else 10,
              "device": "cpu", "recipe.epochs": EPOCHS, "recipe.batch_size": 64, "recipe.val_size": val_size,
              "recipe.subset": None, "recipe.optimizer.lr": 0.1,
              **{f"recipe.{k}": v for k, v in recipe_fields.items()}, **{f"model.{k}": v for k, v in hparams.items()}}
    return [Param(k, str(v)) for k, v in values.items()]


def _log(client: MlflowClient, experiment_id: str, name: str, kind: str, params: list[Param],
         metrics: dict[str, float | None], history: dict[str, list[float]], status: str | None = "FINISHED",
         tags: dict[str, str] | None = None) -> str:
    run = client.create_run(experiment_id, run_name=name, tags={"cnn_zoo.kind": kind, **(tags or {})})
    logged = [Metric(k, v, 0, 0) for k, v in metrics.items() if v is not None]
    logged += [Metric(k, v, epoch, epoch) for k, values in history.items() for epoch, v in enumerate(values, 1)]
    client.log_batch(run.info.run_id, metrics=logged, params=params,
                     tags=[RunTag("seed_group", f"{name}-group")])
    if status:
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A SQLite store with the synthetic experiment "cnn-zoo" and an empty one; logged through a client bound
    to its URI, so MLflow's global tracking URI is never set."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cnn-zoo")
    client.create_experiment("empty-exp")
    ids: dict[str, str] = {}
    for arch, family, dataset, recipe, seed, acc, params, flops, seconds, hparams in TRAIN_RUNS:
        val_size = 0 if recipe == FULL else 5000
        name = f"{arch}-{dataset}-{recipe[0]}-s{seed}"
        metrics = {"param_count": params, "flops": flops, "final_test_acc": acc, "train_seconds": seconds,
                   "final_val_acc": acc + 1 if val_size else None, "best_val_acc": acc + 1.5 if val_size else None,
                   "test_acc_at_best_val": acc - 0.2 if val_size else None}
        if recipe == FULL:  # recorded after the harness timed evaluation apart; the standard runs before
            metrics |= {"eval_seconds": 60.0, "wall_seconds": seconds + 105.0}
        history = {"test_acc": [acc - 20, acc - 5, acc]}
        if val_size:
            history["val_acc"] = [acc - 19, acc - 4, acc + 1]
        tags = {"cnn_zoo.diverged": DIVERGED_REASON} if name == DIVERGED_RUN else {}
        ids[name] = _log(client, exp, name, "train", _params(arch, family, dataset, recipe, seed, hparams, val_size),
                         metrics, history, tags=tags)
    # Runs that must not count: one failed, one still running.
    _log(client, exp, "resnet20-failed", "train", _params("resnet20", "resnet", "cifar10", STANDARD, 3, RESNET, 5000),
         {"final_test_acc": 10.0}, {}, status="FAILED")
    _log(client, exp, "resnet56-running", "train", _params("resnet56", "resnet", "cifar10", STANDARD, 2, RESNET, 5000),
         {}, {"test_acc": [50.0]}, status=None)
    parent = _log(client, exp, STUDY, "sweep", [], {}, {}, tags={"optuna.study_name": STUDY})
    trials = ([(k, t, acc, p, "FINISHED", "COMPLETE") for k, t, acc, p in FINISHED_TRIALS]
              + [(k, t, 80.0, None, "KILLED", "PRUNED") for k, t in PRUNED_TRIALS]
              + [(40, 1.0, None, None, "FAILED", "FAIL")])
    for number, (k, theta, acc, params, status, state) in enumerate(trials):
        hparams = {**DENSENET_BC, "growth_rate": k, "compression": theta}
        _log(client, exp, f"{STUDY}-trial-{number}", "trial",
             _params("densenet_bc", "densenet", "cifar10", FAST, 0, hparams, 5000),
             {"best_val_acc": acc, "param_count": params}, {"val_acc": [acc or 50.0]}, status=status,
             tags={"mlflow.parentRunId": parent, "optuna.study_name": STUDY, "optuna.trial_number": str(number),
                   "optuna.state": state, **({"cnn_zoo.diverged": DIVERGED_REASON} if number == 1 else {})})
    twins = client.create_experiment("twin-fast")
    for recipe, fields in ((TWIN_FAST, {}), (TWIN_FAST_SUBSET, {"subset": 10_000, "optimizer.lr": 0.05})):
        _log(client, twins, f"resnet20-{recipe[1]}", "train",
             _params("resnet20", "resnet", "cifar10", recipe, 0, RESNET, 5000, **fields),
             {"param_count": 272_474, "flops": 8.2e7, "final_test_acc": 60.0, "train_seconds": 60.0,
              "best_val_acc": 61.0, "test_acc_at_best_val": 60.0}, {"test_acc": [60.0], "val_acc": [61.0]})
    return {"uri": uri, "client": client, "ids": ids}


@pytest.fixture(scope="module")
def runs(store: dict) -> pd.DataFrame:
    return load_runs(store["client"], "cnn-zoo")


@pytest.fixture(scope="module")
def standard(runs: pd.DataFrame) -> pd.DataFrame:
    train = complete_runs(finished_runs(runs))
    return select_recipes(filter_recipe(train, "standard", train))


@pytest.fixture(scope="module")
def agg(standard: pd.DataFrame) -> pd.DataFrame:
    return aggregate_runs(standard)


def _row(frame: pd.DataFrame, **where: object) -> pd.Series:
    hit = frame
    for column, value in where.items():
        hit = hit[hit[column] == value]
    assert len(hit) == 1, f"{len(hit)} rows match {where}"
    return hit.iloc[0]


def _artists(fig, gid: str) -> list:
    return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]


def _offsets(fig, gid: str) -> int:
    return sum(len(c.get_offsets()) for c in _artists(fig, gid))


def test_runs_frame_has_every_run_with_params_cast(runs: pd.DataFrame) -> None:
    assert len(runs) == len(TRAIN_RUNS) + 2 + 1 + len(FINISHED_TRIALS) + len(PRUNED_TRIALS) + 1
    assert runs["kind"].value_counts().to_dict() == {"train": 14, "trial": 9, "sweep": 1}
    assert str(runs["seed"].dtype) == "Int64" and str(runs["val_size"].dtype) == "Int64"
    assert str(runs["model.depth"].dtype) == "Int64"
    assert runs["model.compression"].dtype == "float64"
    assert str(runs["model.memory_efficient"].dtype) == "boolean"
    assert runs["param_count"].dtype == "float64" and runs["final_test_acc"].dtype == "float64"
    run = _row(runs, run_name="densenet_bc-cifar10-standard-s1")
    assert (run["seed"], run["model.depth"], run["model.growth_rate"], run["model.compression"]) == (1, 100, 12, 0.5)
    assert not run["model.memory_efficient"]
    assert _row(runs, run_name="resnet20-cifar10-standard-s0")["model.shortcut"] == "A"
    assert pd.isna(_row(runs, run_name="resnet20-cifar10-standard-s0")["model.depth"])
    trial = _row(runs, run_name=f"{STUDY}-trial-6")
    assert (trial["status"], trial["trial_state"], trial["trial_number"]) == ("KILLED", "PRUNED", 6)
    assert trial["study"] == STUDY


def test_load_histories_is_per_epoch(store: dict, runs: pd.DataFrame) -> None:
    run_id = store["ids"]["resnet20-cifar10-standard-s0"]
    history = load_histories(store["client"], [run_id])
    assert history[history["metric"] == "test_acc"]["value"].tolist() == [71.0, 86.0, 91.0]
    assert history["epoch"].tolist() == [1, 2, 3, 1, 2, 3] and history["epoch"].dtype == "int64"


def test_aggregate_means_stds_and_counts(agg: pd.DataFrame) -> None:
    assert len(agg) == 5
    r20 = _row(agg, arch="resnet20", dataset="cifar10")
    assert (r20["n_runs"], r20["n_seeds"], r20["seeds"]) == (3, 3, "0,1,2")
    assert r20["final_test_acc_mean"] == pytest.approx(92.0) and r20["final_test_acc_std"] == pytest.approx(1.0)
    assert r20["train_seconds_mean"] == pytest.approx(660) and r20["param_count"] == 272_474
    dbc = _row(agg, arch="densenet_bc", dataset="cifar10")
    assert dbc["model"] == "densenet_bc (L=100, k=12)"
    assert dbc["final_test_acc_mean"] == pytest.approx(95.2)
    assert dbc["final_test_acc_std"] == pytest.approx(0.2828, abs=1e-4)
    assert dbc["test_acc_at_best_val_mean"] == pytest.approx(95.0)
    single = _row(agg, arch="densenet_bc", dataset="cifar100")
    assert single["n_runs"] == 1 and math.isnan(single["final_test_acc_std"])
    vgg = _row(agg, arch="vgg16_bn")  # one run lacks flops: the other's value stands, the accuracy keeps both
    assert vgg["flops"] == 6.3e8 and vgg["final_test_acc_n"] == 2


def test_pareto_front() -> None:
    points = pd.DataFrame({"x": [5, 1, 2, 2, 3, 4, None], "y": [99, 90, 92, 95, 94, 96, 100]})
    assert pareto_front(points, "x", "y").index.tolist() == [1, 3, 5, 0]


def test_pareto_front_of_the_runs(agg: pd.DataFrame) -> None:
    c10 = agg[agg["dataset"] == "cifar10"]
    assert pareto_front(c10, "param_count", "final_test_acc_mean")["arch"].tolist() == ["resnet20", "densenet_bc"]


def test_mixed_recipes_are_refused_unless_allowed(runs: pd.DataFrame) -> None:
    train = complete_runs(finished_runs(runs))
    with pytest.raises(MixedRecipesError) as e:
        select_recipes(train)
    message = str(e.value)
    assert "--allow-mixed-recipes" in message and "--recipe" in message
    assert "standard (aaaaaaaaaaaa): 10 runs" in message and "full (bbbbbbbbbbbb): 2 runs" in message
    assert set(select_recipes(filter_recipe(train, "bbbbbbbbbbbb", train))["recipe"]) == {"full"}  # by hash
    assert select_recipes(train, allow_mixed=True)["recipe_hash"].nunique() == 2


def test_mixed_recipes_refused_by_the_cli(store: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        plots.main(["--experiment", "cnn-zoo", "--tracking-uri", store["uri"], "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("plots.py: error: runs of 2 different recipes") and "--allow-mixed-recipes" in err
    assert not list(tmp_path.iterdir())


def test_references_are_cited_and_matched_by_hyperparameters(agg: pd.DataFrame) -> None:
    assert all(0 < r.test_acc < 100 and r.source in CITATIONS for r in REFERENCES)
    assert len({(r.arch, r.dataset, tuple(sorted(r.hparams.items())), r.source) for r in REFERENCES}) == len(REFERENCES)
    matched = match_references(agg)
    by_model = matched.groupby("model_id")["ref_source"].apply(list)
    dbc = _row(agg, arch="densenet_bc", dataset="cifar10")["model_id"]
    assert by_model[dbc] == ["Huang et al. 2017, Table 2", "bearpaw/pytorch-classification README.md"]
    assert matched[matched["model_id"] == dbc]["ref_test_acc"].tolist() == [95.49, 95.46]
    vgg = _row(agg, arch="vgg16_bn")["model_id"]  # head="linear": kuangliu's, not pytorch-cifar100's fc4096
    assert by_model[vgg] == ["kuangliu/pytorch-cifar README.md"]
    deeper = agg.assign(hparams=[{**h, "depth": 250, "growth_rate": 24} for h in agg["hparams"]])
    deep_refs = match_references(deeper[deeper["arch"] == "densenet_bc"])
    assert sorted(deep_refs["ref_params_m"]) == [15.3, 15.3]


def test_results_table_numbers(runs: pd.DataFrame) -> None:
    agg = aggregate_runs(select_recipes(complete_runs(finished_runs(runs)), allow_mixed=True))
    table = results_table(agg, match_references(agg))
    r20 = _row(table, model="resnet20", recipe="standard")
    assert (r20["seeds"], r20["params"], r20["gflops"]) == (3, 272_474, pytest.approx(0.082))
    assert r20["final_test_acc_mean"] == pytest.approx(92.0) and r20["final_test_acc_std"] == pytest.approx(1.0)
    assert r20["test_acc_at_best_val_mean"] == pytest.approx(91.8) and r20["train_minutes_mean"] == pytest.approx(11.0)
    assert (r20["reference_test_acc"], r20["reference_source"]) == (91.25, "He et al. 2016, Table 6")
    assert r20["diff_vs_reference"] == pytest.approx(0.75)
    dbc = _row(table, model="densenet_bc (L=100, k=12)", dataset="cifar10")
    assert dbc["reference_test_acc"] == 95.49 and dbc["diff_vs_reference"] == pytest.approx(-0.29)
    full = _row(table, recipe="full")  # no validation split: no test acc at best val
    assert full["final_test_acc_mean"] == pytest.approx(92.0) and math.isnan(full["test_acc_at_best_val_mean"])
    rows = {f"{row[0]}/{row[2]}/{row[12]}": row for row in report.markdown_rows(table)}
    columns = {name: i for i, name in enumerate(report.COLUMNS)}
    r20 = rows["resnet20/CIFAR-10/standard (aaaaaaaaaaaa)"]
    assert r20[columns["Final test acc (%)"]] == "92.00 ± 1.00"
    assert r20[columns["Δ vs ref (pp)"]] == "+0.75"
    assert r20[columns["95% CI"]] == "[89.52, 94.48]"  # 92 ± t(0.975, 2) · 1 / √3
    assert r20[columns["Δ vs best (pp) [95% CI]"]] == "-3.20 [-5.42, -0.98]"  # Welch, vs densenet_bc's 95.2
    assert r20[columns["Train time (min)"]] == "11.0 ± 1.0 †" and r20[columns["Wall time (min)"]] == "—"
    full = rows["resnet20/CIFAR-10/full (bbbbbbbbbbbb)"]
    assert full[columns["Test acc @ best val (%)"]] == "—"
    assert full[columns["Δ vs best (pp) [95% CI]"]] == "best"  # the only model of its recipe
    assert full[columns["Train time (min)"]] == "11.8 ± 0.1" and full[columns["Wall time (min)"]] == "13.5 ± 0.1"
    dbc10 = rows["densenet_bc (L=100, k=12)/CIFAR-10/standard (aaaaaaaaaaaa)"]
    assert dbc10[columns["Final test acc (%)"]] == "95.20 ± 0.28"
    assert dbc10[columns["Δ vs best (pp) [95% CI]"]] == "best"
    dbc100 = rows["densenet_bc (L=100, k=12)/CIFAR-100/standard (aaaaaaaaaaaa)"]
    assert dbc100[columns["Final test acc (%)"]] == "77.00" and dbc100[columns["95% CI"]] == "—"  # one seed
    assert rows["vgg16_bn ⚠/CIFAR-10/standard (aaaaaaaaaaaa)"][columns["Seeds"]] == "2"  # a diverged run


def test_report_cli_writes_markdown_and_csv(store: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report.main(["--experiment", "cnn-zoo", "--tracking-uri", store["uri"], "--out", str(tmp_path),
                        "--allow-mixed-recipes"]) == 0
    folder = tmp_path / "cnn-zoo" / "mixed"  # two recipes: one folder for both, named so
    assert sorted(p.name for p in folder.iterdir()) == ["results.csv", "results.md"]
    csv = pd.read_csv(folder / "results.csv")
    assert len(csv) == 6 and set(csv["recipe"]) == {"standard", "full"}
    assert _row(csv, model="resnet20", recipe="standard")["params"] == 272_474
    r20 = _row(csv, model="resnet20", recipe="standard")
    assert r20["final_test_acc_ci95"] == pytest.approx(2.4841, abs=1e-4)
    assert r20["best_model"] == "densenet_bc (L=100, k=12)"
    assert r20["train_time_measures"] == TIMING_WITH_EVAL
    assert _row(csv, model="resnet20", recipe="full")["train_time_measures"] == TIMING_STEPS
    md = (folder / "results.md").read_text()
    assert ("| resnet20 | resnet | CIFAR-10 | 0.27 | 0.082 | 3 | 92.00 ± 1.00 | [89.52, 94.48] | -3.20 [-5.42, -0.98] "
            "| 91.80 ± 1.00 | 11.0 ± 1.0 † | — | standard (aaaaaaaaaaaa) | 91.25 | He et al. 2016, Table 6 "
            "| +0.75 |") in md
    assert f"- Recipe **standard (aaaaaaaaaaaa): {PROTOCOL}**" in md
    assert f"- Recipe **full (bbbbbbbbbbbb): {FULL_PROTOCOL}**" in md
    assert "He et al. 2016, Table 6" in md and "Deep Residual Learning" in md
    vgg_id = store["ids"][DIVERGED_RUN]
    assert "| vgg16_bn ⚠ |" in md and "## Diverged runs ⚠" in md
    assert f"- vgg16_bn · CIFAR-10 · seed 1: run {vgg_id} ({DIVERGED_RUN}), {DIVERGED_REASON}" in md
    err = capsys.readouterr().err
    assert "ignored 2 of 14 train/retrain runs that did not finish (1 FAILED, 1 RUNNING)" in err


def test_missing_metric_is_reported_by_run(store: dict, runs: pd.DataFrame, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    finished = pd.concat([finished_runs(runs), finished_runs(runs, ("trial",))])
    missing = missing_metrics(finished)
    vgg_id = store["ids"]["vgg16_bn-cifar10-standard-s1"]
    assert missing[["run_id", "item"]].values.tolist() == [[vgg_id, "flops"]]  # full-train runs owe no val metrics
    assert missing_report(missing) == [f"warning: train run {vgg_id} (vgg16_bn-cifar10-standard-s1) is missing flops"]
    no_history = missing_metrics(finished, load_histories(store["client"], []))
    assert len(no_history[no_history["item"] == "test_acc (per epoch)"]) == len(TRAIN_RUNS)
    report.main(["--tracking-uri", store["uri"], "--out", str(tmp_path), "--recipe", "standard"])
    err = capsys.readouterr().err
    assert f"train run {vgg_id} (vgg16_bn-cifar10-standard-s1) is missing flops" in err
    assert "vgg16_bn-cifar10-standard-s1" in (tmp_path / "cnn-zoo" / "aaaaaaaaaaaa" / "results.md").read_text()


def test_accuracy_figures_plot_every_model_and_reference(agg: pd.DataFrame) -> None:
    matched = match_references(agg)
    # CIFAR-10 fronts: params resnet20 < densenet_bc; FLOPs resnet20 < resnet56 < densenet_bc;
    # training time resnet20 < vgg16_bn < densenet_bc.
    for x, front in (("params", 2), ("flops", 3), ("train_time", 3)):
        fig = accuracy_figure(agg, matched, x)
        assert _offsets(fig, "runs") == 5
        bars = sum(len(c.get_segments()) for c in _artists(fig, "errorbars"))
        assert bars == (10 if x == "train_time" else 5)  # train time has x error bars too
        assert _offsets(fig, "references") == 7  # He x2, Huang x2, bearpaw x2, kuangliu x1
        _assert_references_carry_their_source(fig)
        assert len(_artists(fig, "pareto-cifar10")[0].get_xydata()) == front
        assert len(_artists(fig, "pareto-cifar100")[0].get_xydata()) == 1
        assert "standard (aaaaaaaaaaaa)" in fig.get_suptitle()
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" and ax.get_ylabel() == "test accuracy (%)"
        assert fig.legends and not ax.get_legend()  # one figure legend, outside the axes
    assert accuracy_figure(agg, matched, "flops").axes[0].get_xlabel() == "forward GFLOPs per image (log scale)"


def _assert_references_carry_their_source(fig) -> None:
    """Each published marker is labelled with its source, one shape per source, named in the legend; the
    two sources of densenet_bc on CIFAR-10 (95.49 and 95.46) sit side by side, not on top of each other."""
    refs = _artists(fig, "references")
    counts: dict[str, int] = {}
    shapes: dict[str, bytes] = {}
    for c in refs:
        counts[c.get_label()] = counts.get(c.get_label(), 0) + len(c.get_offsets())
        shape = c.get_paths()[0].vertices.tobytes()
        assert shapes.setdefault(c.get_label(), shape) == shape
    assert counts == {"He et al. 2016, Table 6": 2, "Huang et al. 2017, Table 2": 2,
                      "bearpaw/pytorch-classification README.md": 2, "kuangliu/pytorch-cifar README.md": 1}
    assert len(set(shapes.values())) == len(shapes)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert set(counts) <= set(legend[legend.index("published (hollow)"):])
    dbc = {c.get_label(): xy for c in refs
           for xy, (_, acc) in zip(c.get_offset_transform().transform(c.get_offsets()), c.get_offsets())
           if acc in (95.49, 95.46)}
    huang, bearpaw = dbc["Huang et al. 2017, Table 2"], dbc["bearpaw/pytorch-classification README.md"]
    assert bearpaw[0] - huang[0] > 5  # display pixels apart: Huang (priority 0) left of bearpaw


def test_mixed_recipes_figure_has_one_panel_per_recipe(runs: pd.DataFrame) -> None:
    both = aggregate_runs(select_recipes(complete_runs(finished_runs(runs)), allow_mixed=True))
    fig = accuracy_figure(both, match_references(both), "params")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [f"recipe full (bbbbbbbbbbbb)\n{FULL_PROTOCOL}",
                                                 f"recipe standard (aaaaaaaaaaaa)\n{PROTOCOL}"]
    assert [len(ax.collections[[c.get_gid() for c in ax.collections].index("runs")].get_offsets())
            for ax in panels] == [1, 5]


def test_learning_curves_one_panel_per_model(store: dict, standard: pd.DataFrame) -> None:
    curves = curves_frame(standard, load_histories(store["client"], standard["run_id"]))
    fig = learning_curves_figure(curves)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 5
    for ax in visible:
        lines = {line.get_gid(): len(line.get_xydata()) for line in ax.get_lines()}
        assert lines == {"val_acc": EPOCHS, "test_acc": EPOCHS, "chance": 2}
    assert f"standard (aaaaaaaaaaaa): {PROTOCOL}" in fig.get_suptitle()


def test_sweep_figure_map_and_front(runs: pd.DataFrame) -> None:
    trials = plots.study_trials(runs)
    assert list(trials) == [STUDY]
    fig = sweep_figure(trials[STUDY], STUDY)
    assert _offsets(fig, "trials") == len(FINISHED_TRIALS)
    assert _offsets(fig, "pruned") == len(PRUNED_TRIALS)
    assert _offsets(fig, "study-trials") == len(FINISHED_TRIALS)
    assert len(_artists(fig, "pareto")[0].get_xydata()) == 5  # all but (16, 0.7), beaten by a smaller trial
    defaults = [c.get_offsets().tolist() for c in _artists(fig, "default")]
    assert defaults == [[[12.0, 0.5]], [[769_162.0, 94.0]]]  # ringed on the map and on the front
    assert f"fast (cccccccccccc): {PROTOCOL}" in fig.get_suptitle()


def test_plots_cli_writes_every_figure(store: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = mlflow.get_tracking_uri()
    assert plots.main(["--experiment", "cnn-zoo", "--tracking-uri", store["uri"], "--out", str(tmp_path),
                       "--recipe", "standard"]) == 0
    stems = ["accuracy_vs_params", "accuracy_vs_flops", "accuracy_vs_train_time", "learning_curves"]
    expected = {f"{s}.{ext}" for s in stems for ext in ("png", "svg")}
    folder = tmp_path / "cnn-zoo" / "aaaaaaaaaaaa"  # <out>/<experiment>/<recipe hash>
    assert {p.parent for p in tmp_path.rglob("*") if p.is_file()} == {folder}
    assert {p.name for p in folder.iterdir()} == expected  # the sweep ran another recipe: filtered out
    assert all((folder / name).stat().st_size > 1000 for name in expected)
    assert (folder / "accuracy_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr()
    assert "is missing flops" in out.err and str(folder / "learning_curves.svg") in out.out
    assert plots.main(["--tracking-uri", store["uri"], "--out", str(tmp_path), "--recipe", "fast"]) == 0
    sweep_dir = tmp_path / "cnn-zoo" / "cccccccccccc"  # beside the standard recipe's figures, not over them
    assert sorted(p.name for p in sweep_dir.iterdir()) == [f"sweep_{STUDY}.png", f"sweep_{STUDY}.svg"]
    assert {p.name for p in folder.iterdir()} == expected
    assert mlflow.get_tracking_uri() == before  # the CLI used its own client


def test_runs_carry_their_recipe_protocol(runs: pd.DataFrame) -> None:
    """What makes a recipe's numbers what they are (epochs, batch, images) travels with every run."""
    assert set(runs[runs["recipe"] == "standard"]["recipe_protocol"]) == {PROTOCOL}
    assert set(runs[runs["recipe"] == "full"]["recipe_protocol"]) == {FULL_PROTOCOL}
    assert _row(runs, run_name=DIVERGED_RUN)["diverged"] == DIVERGED_REASON
    assert str(runs["num_classes"].dtype) == "Int64" and set(runs["num_classes"].dropna()) == {10, 100}


def test_recipe_name_resolves_when_one_hash_carries_it(store: dict, runs: pd.DataFrame, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    finished = finished_runs(runs, ("train", "trial"))
    assert resolve_recipe(finished, "standard") == STANDARD[1] and resolve_recipe(finished, FULL[1]) == FULL[1]
    twins = load_runs(store["client"], "twin-fast")
    with pytest.raises(AnalysisError) as e:
        resolve_recipe(twins, "fast")
    assert str(e.value) == (
        "recipe name 'fast' names 2 recipes (an override changes the hash, not the name); pass one hash with "
        f"--recipe: fast ({TWIN_FAST[1]}): 1 runs (3 epochs, batch 64, 45,000 train / 5,000 val images, "
        f"optimizer.lr=0.1); fast ({TWIN_FAST_SUBSET[1]}): 1 runs (3 epochs, batch 64, 10,000 train (subset) / "
        "5,000 val images, optimizer.lr=0.05)")
    with pytest.raises(AnalysisError, match="no FINISHED runs with recipe name or hash 'slow'; recipes present: fast"):
        resolve_recipe(twins, "slow")
    for cli in (plots, report):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["--experiment", "twin-fast", "--tracking-uri", store["uri"], "--out", str(tmp_path),
                      "--recipe", "fast"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and TWIN_FAST_SUBSET[1] in err[0] and "optimizer.lr=0.05" in err[0]
    assert report.main(["--experiment", "twin-fast", "--tracking-uri", store["uri"], "--out", str(tmp_path),
                        "--recipe", TWIN_FAST_SUBSET[1]]) == 0
    md = (tmp_path / "twin-fast" / TWIN_FAST_SUBSET[1] / "results.md").read_text()
    assert (f"- Recipe **fast ({TWIN_FAST_SUBSET[1]}): 3 epochs, batch 64, 10,000 train (subset) / 5,000 val images, "
            "optimizer.lr=0.05**") in md


def test_confidence_intervals_match_scipy(agg: pd.DataFrame) -> None:
    """Student t CI of each mean over seeds, Welch CI of each difference to the best model of its dataset."""
    r20 = _row(agg, arch="resnet20", dataset="cifar10")
    low, high = stats.t.interval(0.95, 2, loc=92.0, scale=stats.sem([91.0, 92.0, 93.0]))
    assert r20["final_test_acc_ci"] == pytest.approx((high - low) / 2)
    assert r20["best_model"] == "densenet_bc (L=100, k=12)" and not r20["is_best"]
    welch = stats.ttest_ind([91.0, 92.0, 93.0], [95.0, 95.4], equal_var=False).confidence_interval(0.95)
    assert r20["diff_vs_best"] == pytest.approx(-3.2)
    assert r20["diff_vs_best_ci"] == pytest.approx((welch.high - welch.low) / 2)
    assert r20["diff_vs_best_significant"]
    assert _row(agg, arch="densenet_bc", dataset="cifar10")["is_best"]
    single = _row(agg, arch="densenet_bc", dataset="cifar100")  # one seed: no interval, yet the best of its dataset
    assert math.isnan(single["final_test_acc_ci"]) and single["is_best"]
    assert pd.isna(single["diff_vs_best_significant"])
    close = pd.DataFrame({"model": ["a", "b", "c", "d"], "recipe_hash": "h", "dataset": "cifar10",
                          "acc_mean": [90.0, 89.5, 80.0, 91.0], "acc_std": [1.0, 1.0, 0.1, math.nan],
                          "acc_n": [3, 3, 3, 1]})
    compared = compare_to_best(close.iloc[:3], "acc", ["recipe_hash", "dataset"])
    assert compared["is_best"].tolist() == [True, False, False]
    assert compared["diff_vs_best_significant"].tolist()[1:] == [False, True]  # b: within noise; c: clearly worse
    one_seed_best = compare_to_best(close, "acc", ["recipe_hash", "dataset"])  # d is best, with one seed: no CI
    assert one_seed_best["best_model"].tolist() == ["d"] * 4 and one_seed_best["diff_vs_best_significant"].isna().all()


def test_log_ticks_bracket_the_data(agg: pd.DataFrame) -> None:
    assert log_ticks(272_474, 14_728_266) == [2e5, 5e5, 1e6, 2e6, 5e6, 1e7, 2e7]
    assert log_ticks(0.7, 1.9) == [0.5, 1.0, 2.0]
    assert log_ticks(0.3, 2100) == [0.2, 1.0, 10.0, 100.0, 1000.0, 5000.0]  # past 8 ticks: decades and ends
    for x in X_AXES:  # every point has a labelled tick at or below it and one at or above it
        ax = accuracy_figure(agg, match_references(agg), x).axes[0]
        points = next(c for c in ax.collections if c.get_gid() == "runs").get_offsets()[:, 0]
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert min(ticks) <= points.min() and max(ticks) >= points.max()
        assert all(label.get_text() for label in ax.get_xticklabels())


def test_diverged_runs_are_marked(store: dict, runs: pd.DataFrame, standard: pd.DataFrame, agg: pd.DataFrame) -> None:
    vgg = _row(agg, arch="vgg16_bn")
    assert (vgg["n_diverged"], vgg["diverged"]) == (1, DIVERGED_REASON)
    fig = accuracy_figure(agg, match_references(agg), "params")
    assert [c.get_offsets().tolist() for c in _artists(fig, "diverged")] == [[[14_728_266.0, 93.7]]]
    assert "× diverged run(s) included" in [t.get_text() for t in fig.legends[0].get_texts()]
    curves = learning_curves_figure(curves_frame(standard, load_histories(store["client"], standard["run_id"])))
    flagged = [ax for ax in curves.axes if "diverged" in ax.get_title()]
    assert [ax.get_title() for ax in flagged] == ["vgg16_bn · CIFAR-10\ndiverged: 1 of 2 runs"]
    assert flagged[0].title.get_color() == HIGHLIGHT
    sweep = sweep_figure(plots.study_trials(runs)[STUDY], STUDY)
    assert _offsets(sweep, "diverged") == 2  # trial 1 (k=12, θ=0.3) on the map and on the front


def test_train_time_axis_says_what_it_measures(runs: pd.DataFrame, agg: pd.DataFrame) -> None:
    """Runs that log eval_seconds timed training steps alone; older ones included evaluation: the axis says
    which, and a figure that mixes them marks the older models with †."""
    assert set(agg["timing"]) == {TIMING_WITH_EVAL}
    assert accuracy_figure(agg, match_references(agg), "train_time").axes[0].get_xlabel() == TIME_LABELS[
        TIMING_WITH_EVAL]
    full = aggregate_runs(filter_recipe(complete_runs(finished_runs(runs)), "full", runs))
    assert accuracy_figure(full, match_references(full), "train_time").axes[0].get_xlabel() == TIME_LABELS[
        TIMING_STEPS] == "training time, steps only (minutes, log scale)"
    both = aggregate_runs(select_recipes(complete_runs(finished_runs(runs)), allow_mixed=True))
    fig = accuracy_figure(both, match_references(both), "train_time")
    assert {ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()} == {X_AXES["train_time"].label}
    labels = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert "resnet20 · n=3 †" in labels and "resnet20 · n=2 · best" in labels  # standard († ) and full


def test_learning_curves_share_y_and_show_chance(store: dict, runs: pd.DataFrame) -> None:
    """A flat curve at chance must not look like learning: one y range for all panels, chance drawn."""
    train = complete_runs(finished_runs(runs))
    curves = curves_frame(train, load_histories(store["client"], train["run_id"]))
    fig = learning_curves_figure(curves)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len({ax.get_ylim() for ax in visible}) == 1 and visible[0].get_ylim()[0] == 0
    chance = {ax.get_title().split("\n")[0]: line.get_ydata()[0] for ax in visible for line in ax.get_lines()
              if line.get_gid() == "chance"}
    assert chance["densenet_bc (L=100, k=12) · CIFAR-100"] == 1.0 and chance["resnet20 · CIFAR-10"] == 10.0
    assert len(chance) == 5 and "chance: 100 / classes" in [t.get_text() for t in fig.legends[0].get_texts()]


@pytest.mark.parametrize("cli", [plots, report])
def test_unknown_or_empty_experiment_is_one_line_exit_2(cli, store: dict, capsys: pytest.CaptureFixture) -> None:
    for name, problem in (("nope", "'nope' does not exist"), ("empty-exp", "'empty-exp' in")):
        with pytest.raises(SystemExit) as e:
            cli.main(["--experiment", name, "--tracking-uri", store["uri"]])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and problem in err
        assert "existing experiments: Default, cnn-zoo, empty-exp, twin-fast" in err


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9", "sqlite:///{tmp}/absent/mlflow.db"])
def test_unreachable_store_is_one_line(uri: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = uri.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        report.main(["--tracking-uri", uri, "--out", str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and uri in err
    assert not (tmp_path / "absent").exists()  # MLflow would have created the folder and an empty store


# The harness's torch-free modules, the only ones of it that analysis may import (record names, CLI base, errors).
TORCH_FREE = ["experiments", "experiments.cli", "experiments.errors", "experiments.names"]


def test_analysis_reads_mlflow_only() -> None:
    """analysis never trains: importing its CLIs pulls in neither torch nor the zoo or sweeps, and of the
    harness exactly its torch-free modules."""
    code = ("import sys, analysis.plots, analysis.report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'zoo', 'experiments', 'sweeps'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=REPO)
    assert result.stdout.strip() == str(TORCH_FREE)
