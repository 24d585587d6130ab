"""sweeps/campaign.py: campaign files checked before training, versions that may not mix, and a 4-cell campaign
on tiny data with 2 workers, one SIGKILLed mid-cell (journal file and PostgreSQL): every cell FINISHED exactly
once, the killed cell resumed to the metrics of an uninterrupted run, a rerun trains nothing, and the status
table and the report."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from experiments import names
from experiments.errors import UserError
from sweeps.campaign import main
from sweeps.campaign_runs import DONE, PENDING, RUNNING, CellState, Row, throughput, time_left_line
from sweeps.campaign_spec import Cell
from sweeps.campaign_spec import Settings, load_campaign
from sweeps.campaign_study import open_campaign_study
from sweeps.records import RUN_ATTR
from sweeps.study import WORKER_ATTR, open_storage
from sweeps.workers import run_worker_processes
from tests.helpers import REPO, service_missing

SCRIPT = REPO / "sweeps" / "campaign.py"
PG_URL = os.environ.get("CNN_ZOO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
PG_OPTUNA = PG_URL.replace("postgresql://", "postgresql+psycopg2://", 1)
ARCHS = ["resnet20", "densenet_bc:depth=10,growth_rate=4"]
CELLS = {"resnet20/cifar10/seed0", "resnet20/cifar10/seed1", "densenet_bc-depth=10-growth_rate=4/cifar10/seed0",
         "densenet_bc-depth=10-growth_rate=4/cifar10/seed1"}
# 5 epochs of 10 steps: long enough to kill a worker between a cell's first checkpoint and its end.
OVERRIDES = {"epochs": 5, "subset": 160}


@pytest.fixture
def campaign(tmp_path: Path, tiny_image_folder_archive: Path, tmp_path_factory: pytest.TempPathFactory,
             monkeypatch: pytest.MonkeyPatch) -> dict:
    """Writes campaign files on tiny data (``write(**changes)``) and gives the paths, the environment and runs."""
    cache = tmp_path_factory.getbasetemp() / "campaign_cache"
    monkeypatch.setenv("CNN_ZOO_CACHE", str(cache))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = f"campaign-{uuid.uuid4().hex[:8]}"
    spec = {"name": "tiny", "experiment": experiment, "architectures": ARCHS, "datasets": ["cifar10"],
            "seeds": [0, 1], "recipe": "smoke", "recipe_overrides": OVERRIDES,
            "data_dir": str(tiny_image_folder_archive.parent), "tracking_uri": uri,
            "output_dir": str(tmp_path / "outputs"), "report_dir": str(tmp_path / "report"), "device": "cpu",
            "log_model": False}

    def write(name: str = "campaign.yaml", **changes) -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec | changes))
        return str(path)

    return {"write": write, "spec": spec, "uri": uri, "experiment": experiment, "tmp": tmp_path,
            "journal": str(tmp_path / "optuna.journal"),
            "env": {**os.environ, "PYTHONPATH": str(REPO), "CNN_ZOO_CACHE": str(cache), "OMP_NUM_THREADS": "1"}}


def runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"sedes": [0]}, "unknown key 'sedes'"),
    ({"architectures": ["resnet21"]}, "resnet21"),
    ({"architectures": ["densenet_bc:depth=41"]}, "depth"),
    ({"architectures": ["resnet20:widht=2"]}, "widht"),
    ({"recipe": "no-such-recipe"}, "unknown recipe 'no-such-recipe'"),
    ({"recipe_overrides": {"epochs": 0}}, "epochs must be >= 1"),
    ({"recipe_overrides": {"optimizer.momentun": 0.9}}, "unknown recipe key 'optimizer.momentun'"),
    ({"datasets": ["imagenet"]}, "unknown dataset 'imagenet'"),
    ({"seeds": [-1]}, "seed must be an integer"),
    ({"architectures": ["resnet20", "resnet20"]}, "listed twice"),
    ({"device": "tpu"}, "device must be one of"),
])
def test_bad_campaign_fails_before_training_with_one_line(campaign: dict, capsys: pytest.CaptureFixture,
                                                          changes: dict, message: str) -> None:
    path = campaign["write"](**changes)
    assert main([path, "--storage", campaign["journal"]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not Path(campaign["journal"]).exists() and not (campaign["tmp"] / "mlflow.db").exists()


def test_bad_flags_and_files_fail_with_one_line(campaign: dict, capsys: pytest.CaptureFixture) -> None:
    path = campaign["write"]()
    missing = str(campaign["tmp"] / "missing.yaml")
    for argv, message in [([missing], "does not exist"), ([path, "--gpus", "0,0"], "distinct GPU indices"),
                          ([path, "--gpus", "0,1", "--workers", "3"], "one worker per GPU"),
                          (["status", missing], "does not exist")]:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_changed_campaign_refuses_to_mix_with_an_unfinished_version(campaign: dict) -> None:
    """An earlier version with another recipe or other cells that is not done: one line naming the change;
    a new experiment name is a new campaign."""
    digests = {"cifar10": "a" * 64}
    settings = lambda path: Settings(load_campaign(path), campaign["journal"], 30, 1, ())
    open_campaign_study(settings(campaign["write"]()), digests)
    open_campaign_study(settings(campaign["write"]()), digests)  # the same version: resumed
    for changes, said in [({"recipe_overrides": {**OVERRIDES, "epochs": 9}}, "recipe was smoke ("),
                          ({"seeds": [0, 1, 2]}, "cells changed (2 added, e.g. resnet20/cifar10/seed2)")]:
        with pytest.raises(UserError, match="holds an unfinished earlier version") as info:
            open_campaign_study(settings(campaign["write"](**changes)), digests)
        assert said in str(info.value) and "new experiment name" in str(info.value)
    with pytest.raises(UserError, match=r"cifar10 data changed \(sha256 aaaaaaaaaaaa, now bbbbbbbbbbbb\)"):
        open_campaign_study(settings(campaign["write"]()), {"cifar10": "b" * 64})
    open_campaign_study(settings(campaign["write"](seeds=[0, 1, 2], experiment="another")), digests)


# ----------------------------------------------------------------------------------------------
# status and MLflow's own messages
# ----------------------------------------------------------------------------------------------

def test_a_cell_without_its_own_speed_is_timed_at_the_measured_flop_rate() -> None:
    def cell(label: str, seed: int = 0) -> Cell:
        return Cell(arch=label, model={}, hparams={}, label=label, dataset="cifar10", seed=seed)

    per_label = {"resnet20": 4e7, "resnet56": 1.2e8, "resnet32": 7e7}
    flops = {cell(label, seed).key: n for label, n in per_label.items() for seed in range(3)}
    rows = [Row(cell("resnet20"), CellState(DONE), img_s=300.0),
            Row(cell("resnet20", 1), CellState(RUNNING), img_s=200.0),
            Row(cell("resnet56"), CellState(PENDING)), Row(cell("resnet32"), CellState(PENDING))]
    assert throughput(rows, cell("resnet20", 2), flops) == pytest.approx(250.0)  # its own architecture's mean
    assert throughput(rows, cell("resnet56"), flops) == pytest.approx(250.0 / 3)  # 3x the FLOPs: a third
    rows[3] = Row(cell("resnet32"), CellState(RUNNING), img_s=140.0)  # a second architecture measured too
    assert throughput(rows, cell("resnet56"), flops) == pytest.approx((300 * 4e7 + 200 * 4e7 + 140 * 7e7) / 3 / 1.2e8)
    assert throughput(rows[2:3], cell("resnet56"), flops) is None  # nothing measured yet


def test_time_left_says_unknown_until_a_cell_has_a_measured_speed() -> None:
    assert time_left_line([], running=0) == "time left: none, every cell is done"
    assert time_left_line([None] * 15, running=0) == "time left: unknown until a cell has trained (15 cells pending)"
    assert time_left_line([None], running=1) == "time left: unknown until a cell has trained (1 cell pending)"
    assert time_left_line([600.0, None], running=1) == ("time left: 10m of training at the measured speeds on one "
                                                        "worker (plus 1 cell with no measured throughput yet)")
    assert time_left_line([3600.0, 3600.0], running=2) == (
        "time left: 2h00m of training at the measured speeds on one worker, about 1h00m with the 2 cells running "
        "now in parallel")


MLFLOW_CHATTER = "Creating initial MLflow database tables"


def test_status_of_a_fresh_campaign_is_quiet_and_says_time_left_unknown(campaign: dict, capfd: pytest.CaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    monkeypatch.setattr(logging.getLogger("mlflow"), "level", logging.INFO)  # as a fresh interpreter has it
    assert main(["status", campaign["write"]()]) == 0
    out, err = capfd.readouterr()
    assert "time left: unknown until a cell has trained (4 cells pending)" in out, out
    assert "4 pending" in out and MLFLOW_CHATTER not in out + err
    verbose_store = campaign["write"]("verbose.yaml", tracking_uri=f"sqlite:///{campaign['tmp'] / 'verbose.db'}")
    assert main(["status", verbose_store, "--verbose"]) == 0
    assert MLFLOW_CHATTER in capfd.readouterr().err


def _write_mlflow_level(path: str) -> None:
    Path(path).write_text(logging.getLevelName(logging.getLogger("mlflow").getEffectiveLevel()))


@pytest.mark.slow  # starts processes
def test_worker_processes_show_mlflow_messages_only_when_verbose(tmp_path: Path) -> None:
    for verbose, level in ((False, "WARNING"), (True, "INFO")):
        out = tmp_path / f"level-{verbose}"
        assert run_worker_processes(1, _write_mlflow_level, str(out), verbose=verbose) == [0]
        assert out.read_text() == level


# ----------------------------------------------------------------------------------------------
# a campaign with a worker killed mid-cell
# ----------------------------------------------------------------------------------------------

def _study(storage, experiment: str) -> optuna.Study:
    (name,) = [n for n in optuna.get_all_study_names(storage) if n.startswith(f"campaign-{experiment}-")]
    return optuna.load_study(study_name=name, storage=storage)


def _kill_a_worker_mid_cell(load, output_dir: Path, timeout: float = 120.0) -> optuna.trial.FrozenTrial:
    """SIGKILL the worker of a cell whose run has written its first checkpoint; returns that cell's trial."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for t in load().get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                run_id = t.user_attrs.get(RUN_ATTR)
                if run_id and (output_dir / "checkpoints" / run_id / "last.pt").is_file():
                    os.kill(t.user_attrs[WORKER_ATTR]["pid"], signal.SIGKILL)
                    return t
        except (KeyError, ValueError):  # no study yet
            pass
        time.sleep(0.05)
    raise AssertionError("no cell wrote a checkpoint in time")


def _run_killing_one_worker(campaign: dict, storage: str, load, extra: list[str] = ()) -> optuna.trial.FrozenTrial:
    cmd = [sys.executable, str(SCRIPT), campaign["write"](), "--workers", "2", "--storage", storage, *extra]
    proc = subprocess.Popen(cmd, env=campaign["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=campaign["tmp"])
    try:
        victim = _kill_a_worker_mid_cell(load, campaign["tmp"] / "outputs")
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "was killed by SIGKILL" in err and "the other workers completed the campaign" in err, err[-3000:]
    return victim


def _assert_each_cell_finished_once(campaign: dict, victim: optuna.trial.FrozenTrial) -> mlflow.entities.Run:
    """Every cell has one run, FINISHED; the killed cell's run is the one its first worker started (resumed)."""
    rs = runs(campaign["uri"], campaign["experiment"])
    assert sorted(r.data.tags[names.CELL] for r in rs) == sorted(CELLS)
    assert all(r.info.status == "FINISHED" and r.data.tags[names.CAMPAIGN] == "tiny" for r in rs)
    (killed,) = [r for r in rs if r.info.run_id == victim.user_attrs[RUN_ATTR]]
    assert killed.data.tags[names.CELL] == victim.params["cell"]
    return killed


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_killed_worker_cell_is_resumed_exactly_and_a_rerun_trains_nothing(campaign: dict,
                                                                        capsys: pytest.CaptureFixture) -> None:
    load = lambda: _study(JournalStorage(JournalFileBackend(campaign["journal"])), campaign["experiment"])
    victim = _run_killing_one_worker(campaign, campaign["journal"], load)
    killed = _assert_each_cell_finished_once(campaign, victim)
    trials = load().trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4 and len(trials) == 5
    report = campaign["tmp"] / "report" / campaign["experiment"]
    assert len(list(report.glob("*/results.md"))) == 1 and list(report.glob("*/accuracy_vs_params.png"))

    # The same cell, uninterrupted: alone in another experiment, here, with a --workers 2 worker's share of the cores.
    arch = ARCHS[0] if victim.params["cell"].startswith("resnet20") else ARCHS[1]
    seed = int(victim.params["cell"].rsplit("seed", 1)[1])
    path = campaign["write"]("alone.yaml", experiment=campaign["experiment"] + "-alone", architectures=[arch],
                             seeds=[seed])
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        assert main([path, "--storage", campaign["journal"]]) == 0
    finally:
        torch.set_num_threads(threads)
    (reference,) = runs(campaign["uri"], campaign["experiment"] + "-alone")
    for key in (names.FINAL_TEST_ACC, names.FINAL_VAL_ACC, names.BEST_VAL_ACC):
        assert killed.data.metrics[key] == reference.data.metrics[key]
    for key in (names.TRAIN_LOSS, names.VAL_LOSS):
        assert _history(campaign["uri"], killed.info.run_id, key) == _history(campaign["uri"], reference.info.run_id,
                                                                              key)

    capsys.readouterr()
    assert main([campaign["write"](), "--storage", campaign["journal"]]) == 0  # the rerun
    out = capsys.readouterr().out
    assert "[campaign] 4 skipped, 0 resumed, 0 to start" in out and "starting" not in out and "resuming" not in out
    assert len(runs(campaign["uri"], campaign["experiment"])) == 4
    assert main(["status", campaign["write"]()]) == 0
    status = capsys.readouterr().out
    assert "4 done, 0 running, 0 resume, 0 failed, 0 pending" in status and "time left: none" in status
    assert all(f"{key}" in status for key in CELLS) and status.count("test acc ") == 4


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_campaign_hands_a_killed_workers_cell_to_another(campaign: dict) -> None:
    try:
        open_storage(PG_URL, heartbeat_seconds=1)
    except UserError as e:
        service_missing(str(e))
    try:
        victim = _run_killing_one_worker(campaign, PG_URL, lambda: _study(PG_OPTUNA, campaign["experiment"]),
                                         ["--heartbeat", "1"])
        _assert_each_cell_finished_once(campaign, victim)
    finally:
        for name in optuna.get_all_study_names(PG_OPTUNA):
            if name.startswith(f"campaign-{campaign['experiment']}-"):
                optuna.delete_study(study_name=name, storage=PG_OPTUNA)
