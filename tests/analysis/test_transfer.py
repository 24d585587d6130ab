"""The few-shot transfer table and figure (analysis/transfer.py) from a runs frame as mlflow_data reads it."""
from __future__ import annotations

import pandas as pd
import pytest

from analysis.errors import EmptyFigureError
from analysis.transfer import FULL, shots_figure, shots_table
from experiments.names import FINAL_TEST_ACC, PRETRAINED


def _runs() -> pd.DataFrame:
    rows = []
    for shots, accs in ((5, (80.0, 82.0, 84.0)), (1, (50.0, 60.0)), (None, (97.0,))):
        for seed, acc in enumerate(accs):
            rows.append({"status": "FINISHED", "dataset": "cifar10", PRETRAINED: "BiT-M-R50x1.npz", "arch": "bit_r50x1",
                         "recipe": "bit-hyperrule", "shots": pd.NA if shots is None else shots, "seed": seed,
                         "train_size": 45_000 if shots is None else 10 * shots, FINAL_TEST_ACC: acc})
    rows.append({**rows[0], PRETRAINED: None, FINAL_TEST_ACC: 10.0})  # from scratch: never in the figure
    return pd.DataFrame(rows).astype({"shots": "Int64"})


def test_shots_table_means_cis_and_order():
    table = shots_table(_runs())
    assert table["shots"].tolist() == [1, 5, FULL]
    five = table[table["shots"] == 5].iloc[0]
    assert (five["test_acc_mean"], five["n"]) == (82.0, 3)
    assert five["test_acc_ci"] == pytest.approx(4.303 * 2 / 3 ** 0.5, rel=1e-3)  # t(2) * sd / sqrt(n)
    assert pd.isna(table[table["shots"] == FULL].iloc[0]["test_acc_ci"])  # one seed: no interval


def test_shots_figure_says_what_was_fine_tuned_from():
    fig = shots_figure(shots_table(_runs()))
    (ax,) = fig.axes
    assert ax.get_title() == "CIFAR-10: fine-tuned from BiT-M-R50x1.npz"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "5", FULL]


def test_no_fine_tuning_runs_is_an_empty_figure_error():
    runs = _runs()
    with pytest.raises(EmptyFigureError):
        shots_table(runs[runs[PRETRAINED].isna()])


def test_plots_cli_writes_the_shots_figure_across_recipe_hashes(tmp_path) -> None:
    """Each shot count resolves its own HyperRule recipe hash: plots.py still draws them in one figure."""
    import mlflow
    from mlflow import MlflowClient

    from analysis import plots
    from experiments import names

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("transfer")
    for shots, recipe_hash, accs in ((1, "aaaaaaaaaaaa", (50.0, 60.0)), (5, "bbbbbbbbbbbb", (80.0, 84.0))):
        for seed, acc in enumerate(accs):
            run = client.create_run(experiment_id, tags={names.KIND: names.KIND_TRAIN})
            params = {names.ARCH: "bit_r50x1", names.FAMILY: "bit", names.DATASET: "cifar10",
                      names.RECIPE: "bit-hyperrule", names.RECIPE_HASH: recipe_hash, names.SEED: seed,
                      names.PRETRAINED: "BiT-M-R50x1.npz", names.SHOTS: shots, names.TRAIN_SIZE: 10 * shots}
            for key, value in params.items():
                client.log_param(run.info.run_id, key, value)
            for key, value in ((names.FINAL_TEST_ACC, acc), (names.PARAM_COUNT, 23_500_000), (names.FLOPS, 1e9)):
                client.log_metric(run.info.run_id, key, value, step=0)
            client.set_terminated(run.info.run_id, "FINISHED")
    mlflow.set_tracking_uri(None)
    assert plots.main(["--experiment", "transfer", "--tracking-uri", uri, "--out", str(tmp_path / "figs"),
                       "--allow-mixed-recipes"]) == 0
    (png,) = (tmp_path / "figs").rglob("transfer_shots.png")
    assert png.stat().st_size > 0
