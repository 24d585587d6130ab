"""sweeps/ (densenet_bc.py and the modules behind it): space validation, pruning, Pareto, --max-params, MLflow
linkage, and the exact trial cap across workers (journal file and PostgreSQL), including a worker killed
mid-trial."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from experiments import names
from experiments.errors import Interrupted, UserError
from experiments.tracking import RunState, TrackingStore
from sweeps import trials as sweep_trials
from sweeps.densenet_bc import main, param_count
from sweeps.records import RUN_ATTR
from sweeps.space import DEFAULT_SPACE, SearchSpace, load_space
from sweeps.study import WORKER_ATTR, open_storage
from sweeps.trials import PARAMS_ATTR, REJECTED_ATTR
from sweeps.workers import worker_failures
from tests.helpers import REPO, service_missing

SCRIPT = REPO / "sweeps" / "densenet_bc.py"
PG_URL = os.environ.get("CNN_ZOO_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
# What Optuna itself needs: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, not the installed psycopg2.
PG_OPTUNA = PG_URL.replace("postgresql://", "postgresql+psycopg2://", 1)
SPACE = "growth_rate: {low: 8, high: 16, step: 4}\ncompression: {low: 0.5, high: 1.0}\ndepths: [10]\n"
DISTRIBUTIONS = {"growth_rate": IntDistribution(8, 16, step=4), "compression": FloatDistribution(0.5, 1.0)}


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cnn_zoo_cache")  # decoded once for the whole file


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the file (creating its schema takes seconds); each test has its own experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()  # creates the schema
    return uri


@pytest.fixture
def sweep(tmp_path: Path, tiny_image_folder_archive: Path, cache_dir: Path, mlflow_uri: str,
          monkeypatch: pytest.MonkeyPatch) -> dict:
    """Paths and the common command line of a tiny sweep: depth 10, 64 training / 20 validation images."""
    monkeypatch.setenv("CNN_ZOO_CACHE", str(cache_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    experiment = f"sweeps-{uuid.uuid4().hex[:8]}"
    argv = ["--recipe", "smoke", "--epochs", "1", "--subset", "64", "--set", "val_size=20", "--device", "cpu",
            "--data-dir", str(tiny_image_folder_archive.parent), "--space", str(space),
            "--output-dir", str(tmp_path / "outputs"), "--tracking-uri", mlflow_uri, "--experiment", experiment]
    return {"argv": argv, "runs": lambda: runs(mlflow_uri, experiment), "uri": mlflow_uri,
            "journal": str(tmp_path / "optuna.journal"), "tmp": tmp_path,
            "env": {**os.environ, "PYTHONPATH": str(REPO), "CNN_ZOO_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}}


@pytest.fixture
def pg_study() -> Iterator[str]:
    """A fresh study name on the test PostgreSQL; the study is deleted afterwards."""
    try:
        open_storage(PG_URL, heartbeat_seconds=5)  # creates the tables once, under the lock the commands take
    except UserError as e:
        service_missing(str(e))
    name = f"test-sweeps-{uuid.uuid4().hex[:10]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=PG_OPTUNA)
    except KeyError:
        pass


def journal(path: str) -> JournalStorage:
    return JournalStorage(JournalFileBackend(path))


def runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def kind(rs: list, value: str) -> list:
    return [r for r in rs if r.data.tags.get("cnn_zoo.kind") == value]


def results_txt(uri: str, run_id: str, tmp: Path) -> str:
    return Path(mlflow.MlflowClient(uri).download_artifacts(run_id, "results.txt", str(tmp))).read_text()


# ----------------------------------------------------------------------------------------------
# search space and command line
# ----------------------------------------------------------------------------------------------

def test_default_space_matches_the_issue() -> None:
    space = load_space(DEFAULT_SPACE)
    assert space == SearchSpace(growth_rate=(8, 48, 4), compression=(0.2, 1.0), depths=(100,))


@pytest.mark.parametrize("text, message", [
    ("growth_rate: {low: 8, high: 48, step: 4}\nwidth: 3\n", "unknown key 'width'"),
    ("growth_rate: {low: 8, high: 48, stride: 4}\n", "unknown key 'stride' in growth_rate"),
    ("growth_rate: {low: 48, high: 8}\n", "1 <= low <= high"),
    ("growth_rate: {low: 8, high: 46, step: 4}\n", "multiple of step"),
    ("growth_rate: {low: 8.5, high: 48}\n", "must be integers"),
    ("compression: {low: 0.2, high: 1.5}\n", "0 < low <= high <= 1"),
    ("compression: {low: 0.0, high: 1.0}\n", "0 < low <= high <= 1"),
    ("compression: {high: 1.0}\n", "needs 'low'"),
    ("depths: [100, 41]\n", "depth 41 is not a DenseNet-BC depth"),
    ("depths: []\n", "non-empty list"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("growth_rate: [8\n", "not valid YAML"),
])
def test_bad_space_is_one_line_user_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as info:
        load_space(path)
    assert "\n" not in str(info.value)


def test_space_reads_from_a_pipe(tmp_path: Path) -> None:
    """`--space <(...)` hands the command a /dev/fd path to a pipe, not a regular file (issue 13)."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, SPACE.encode())
    os.close(write_fd)
    try:
        space = load_space(f"/dev/fd/{read_fd}")
    finally:
        os.close(read_fd)
    assert space == SearchSpace(growth_rate=(8, 16, 4), compression=(0.5, 1.0), depths=(10,))
    with pytest.raises(UserError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_space_suggests_depth_only_when_several() -> None:
    study = optuna.create_study()
    fixed = SearchSpace(depths=(40,)).suggest(study.ask())
    searched_trial = study.ask()
    searched = SearchSpace(depths=(40, 100)).suggest(searched_trial)
    assert fixed["depth"] == 40 and searched["depth"] in (40, 100) and "depth" in searched_trial.params


@pytest.mark.parametrize("extra, message", [
    (["--objective", "pareto", "--pruner", "median"], "cannot prune multi-objective"),
    (["--max-params", "1000"], "rejects the whole search space"),
    (["--set", "val_size=0"], "val_size is 0"),
    (["--storage", "mysql://u@h/db"], "postgresql:// URL"),
    (["--storage", "postgresql+psycopg://u@127.0.0.1/db"], "use postgresql:// or postgresql+psycopg2://"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32)"),
])
def test_bad_input_fails_with_one_line(sweep: dict, capsys: pytest.CaptureFixture, extra: list[str], message: str) -> None:
    assert main([*sweep["argv"], "--storage", sweep["journal"], *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("extra, message", [(["--max-params", "1.5"], "whole number"),
                                            (["--trials", "0"], "positive integer")])
def test_bad_flag_values_fail_with_one_line(capsys: pytest.CaptureFixture, extra: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(extra)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and err.count("\n") == 1


def test_tracking_store_closes_only_a_run_left_running(mlflow_uri: str) -> None:
    """What closes a dead worker's trial run: a RUNNING run is tagged and ended; an ended or unknown one is left."""
    store = TrackingStore(mlflow_uri, f"store-{uuid.uuid4().hex[:8]}")
    running = store.create_run("left-running", {names.KIND: names.KIND_TRIAL}, {names.ARCH: "densenet_bc"},
                               metrics={names.PARAM_COUNT: 5})
    finished = store.create_run("finished", {}, {})
    store.end_run(finished, "FINISHED")
    assert store.end_if_running(running, "FAILED", {names.FAILURE: "worker died"})
    assert not store.end_if_running(finished, "FAILED", {names.FAILURE: "worker died"})
    assert store.run_state("0" * 32) is None and not store.end_if_running("0" * 32, "FAILED", {})
    assert store.run_state(running) == RunState("FAILED", deleted=False)
    assert store.run_state(finished) == RunState("FINISHED", deleted=False)
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(running)
    assert run.data.tags[names.FAILURE] == "worker died" and run.data.metrics == {names.PARAM_COUNT: 5.0}
    assert run.data.params == {names.ARCH: "densenet_bc"} and names.FAILURE not in client.get_run(finished).data.tags


# ----------------------------------------------------------------------------------------------
# in-process studies (journal file, one worker)
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow  # trains a model
def test_val_acc_study_prunes_and_links_mlflow_runs(sweep: dict) -> None:
    """Five earlier trials at 100% val acc (the median pruner's start-up count) make every real trial
    prunable at epoch 1 of 2; the pruned trials must stop early and say so in MLflow."""
    name = "prune"
    seed = optuna.create_study(storage=journal(sweep["journal"]), study_name=name, direction="maximize")
    for k in (8, 12, 16, 8, 12):
        seed.add_trial(optuna.trial.create_trial(params={"growth_rate": k, "compression": 0.5},
                                                 distributions=DISTRIBUTIONS, value=100.0,
                                                 intermediate_values={1: 100.0, 2: 100.0}))
    rc = main([*sweep["argv"], "--epochs", "2", "--storage", sweep["journal"], "--study-name", name,
               "--trials", "7", "--pruner", "median"])
    assert rc == 0
    study = optuna.load_study(study_name=name, storage=journal(sweep["journal"]))
    real = study.trials[5:]
    assert len(study.trials) == 7 and any(t.state == TrialState.PRUNED for t in real)
    assert all(t.state in (TrialState.PRUNED, TrialState.COMPLETE) for t in real)

    rs = sweep["runs"]()
    (parent,) = kind(rs, "sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["optuna.study_name"] == name
    assert {"study_name", "storage", "sampler", "pruner", "space.growth_rate", "space.compression",
            "space.depths"} <= set(parent.data.params)
    artifacts = {a.path for a in mlflow.MlflowClient(sweep["uri"]).list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in artifacts and "plots/contour_k_theta.png" in artifacts
    children = {int(r.data.tags["optuna.trial_number"]): r for r in kind(rs, "trial")}
    assert set(children) == {t.number for t in real}
    for t in real:
        child = children[t.number]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["optuna.study_name"] == name
        assert child.data.tags["optuna.state"] == t.state.name
        assert child.info.status == ("KILLED" if t.state == TrialState.PRUNED else "FINISHED")
        assert int(child.data.params["model.growth_rate"]) == t.params["growth_rate"]
        assert float(child.data.params["model.compression"]) == pytest.approx(t.params["compression"])
        assert child.data.metrics["param_count"] == t.user_attrs[PARAMS_ATTR]
        assert "test_acc" not in child.data.metrics  # trials never see the test set
        assert t.user_attrs[RUN_ATTR] == child.info.run_id
        if t.state == TrialState.PRUNED:
            assert list(t.intermediate_values) == [1]  # stopped after epoch 1 of 2
    assert parent.data.metrics["n_trials"] == 7
    assert "test acc" not in results_txt(sweep["uri"], parent.info.run_id, sweep["tmp"] / "first")


@pytest.mark.slow  # trains a model
def test_retrain_best_later_reopens_the_parent_and_reports_test_acc(sweep: dict, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A study reported without --retrain-best, rerun with it: the retrain runs under a RUNNING parent,
    which then ends FINISHED with the test accuracy in results.txt; a third plain run changes nothing."""
    argv = [*sweep["argv"], "--storage", sweep["journal"], "--study-name", "later", "--trials", "2", "--pruner", "none"]
    assert main(argv) == 0
    parent_status: list[str] = []
    real_fit = sweep_trials.fit

    def watching_fit(cfg, tracker, callbacks=(), options=None, data=None):
        parent_status.append(mlflow.MlflowClient(sweep["uri"]).get_run(options.parent_run_id).info.status)
        return real_fit(cfg, tracker, callbacks, options, data=data)

    monkeypatch.setattr(sweep_trials, "fit", watching_fit)
    capsys.readouterr()
    assert main([*argv, "--retrain-best"]) == 0
    assert parent_status == ["RUNNING"]  # only the retrain trained
    (parent,) = kind(sweep["runs"](), "sweep")
    (retrained,) = kind(sweep["runs"](), "retrain")
    text = results_txt(sweep["uri"], parent.info.run_id, sweep["tmp"] / "second")
    acc = f"{retrained.data.metrics['final_test_acc']:.2f}%"
    assert parent.info.status == "FINISHED" and "test acc" in text and acc in text
    assert acc in capsys.readouterr().out
    assert main(argv) == 0 and parent_status == ["RUNNING"]  # already reported, with the retrain
    assert results_txt(sweep["uri"], parent.info.run_id, sweep["tmp"] / "third") == text


@pytest.mark.slow  # trains a model
def test_max_params_rejects_points_without_training_them(sweep: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 30_000  # depth 10: k 8 and 12 fit, k 16 does not
    assert param_count({"depth": 10, "growth_rate": 12, "compression": 1.0}, 10) < budget
    assert param_count({"depth": 10, "growth_rate": 16, "compression": 0.5}, 10) > budget
    trained: list[dict] = []
    real_fit = sweep_trials.fit

    parent_status: list[str] = []

    def counting_fit(cfg, tracker, callbacks=(), options=None, data=None):
        trained.append(dict(cfg.model))
        parent_status.append(mlflow.MlflowClient(sweep["uri"]).get_run(options.parent_run_id).info.status)
        return real_fit(cfg, tracker, callbacks, options, data=data)

    monkeypatch.setattr(sweep_trials, "fit", counting_fit)
    name = "budget"
    study = optuna.create_study(storage=journal(sweep["journal"]), study_name=name, direction="maximize")
    study.enqueue_trial({"growth_rate": 16, "compression": 1.0})  # over the budget
    study.enqueue_trial({"growth_rate": 8, "compression": 0.5})
    rc = main([*sweep["argv"], "--storage", sweep["journal"], "--study-name", name, "--trials", "3",
               "--pruner", "none", "--max-params", "3e4", "--retrain-best"])
    assert rc == 0
    trials = optuna.load_study(study_name=name, storage=journal(sweep["journal"])).trials
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    rejected = [t for t in trials if REJECTED_ATTR in t.user_attrs]
    assert trials[0] in rejected and trials[1] not in rejected
    for t in trials:
        assert (t.constraints["max_params"] > 0) == (t in rejected)
        assert (t.user_attrs[PARAMS_ATTR] > budget) == (t in rejected)
    assert all(param_count(hp, 10) <= budget for hp in trained)
    assert trials[2].params == {"growth_rate": 12, "compression": 0.5}  # the default, enqueued at creation
    rs = sweep["runs"]()
    children = {int(r.data.tags["optuna.trial_number"]): r for r in kind(rs, "trial")}
    assert sorted(children) == [t.number for t in trials]  # one child run per trial, rejected ones too
    for t in trials:
        child = children[t.number]
        assert t.user_attrs[RUN_ATTR] == child.info.run_id
        assert child.data.metrics["param_count"] == t.user_attrs[PARAMS_ATTR]
        assert int(child.data.params["model.growth_rate"]) == t.params["growth_rate"]
        if t in rejected:  # recorded, never trained
            assert child.info.status == "KILLED" and child.data.tags[REJECTED_ATTR] == t.user_attrs[REJECTED_ATTR]
            assert child.data.tags["optuna.state"] == "COMPLETE" and "best_val_acc" not in child.data.metrics
        else:
            assert child.info.status == "FINISHED" and REJECTED_ATTR not in child.data.tags
    # --retrain-best: the best feasible trial, retrained on train+val, is the only run that sees the test set.
    best = optuna.load_study(study_name=name, storage=journal(sweep["journal"])).best_trial
    assert best not in rejected
    (parent,) = kind(rs, "sweep")
    (retrained,) = kind(rs, "retrain")
    assert retrained.data.tags["optuna.trial_number"] == str(best.number)
    assert retrained.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert retrained.data.params["recipe.val_size"] == "0" and "test_acc" in retrained.data.metrics
    # Retrained before the report: under a RUNNING parent, whose results.txt has the test accuracy.
    assert parent_status == ["RUNNING"] * len(trained) and parent.info.status == "FINISHED"
    text = results_txt(sweep["uri"], parent.info.run_id, sweep["tmp"])
    row = next(line.split() for line in text.splitlines() if line.split()[:1] == [str(best.number)])
    assert row[-1] == f"{retrained.data.metrics['final_test_acc']:.2f}%" and parent.data.metrics["n_trials"] == 3
    assert all("test_acc" not in r.data.metrics for r in kind(rs, "trial"))
    assert len(trained) == 3 - len(rejected) + 1  # the trials within budget, and the retrain


@pytest.mark.slow  # trains a model
def test_diverged_trial_counts_as_failed_and_its_run_fails(sweep: dict) -> None:
    rc = main([*sweep["argv"], "--storage", sweep["journal"], "--study-name", "diverge", "--trials", "1",
               "--set", "optimizer.lr=1.0e+12"])
    assert rc == 1  # the sweep ran its one trial, but nothing trained
    (trial,) = optuna.load_study(study_name="diverge", storage=journal(sweep["journal"])).trials
    assert trial.state == TrialState.FAIL and "NonFiniteLoss" in trial.user_attrs["cnn_zoo.failure"]
    (child,) = kind(sweep["runs"](), "trial")
    assert child.info.status == "FAILED" and child.data.tags["optuna.state"] == "FAIL"


@pytest.mark.slow  # trains a model
def test_pareto_study_returns_a_non_dominated_front(sweep: dict, capsys: pytest.CaptureFixture) -> None:
    name = "pareto"
    rc = main([*sweep["argv"], "--storage", sweep["journal"], "--study-name", name, "--trials", "4",
               "--objective", "pareto", "--max-params", "4e4"])
    assert rc == 0
    study = optuna.load_study(study_name=name, storage=journal(sweep["journal"]))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    front = study.best_trials
    feasible = [t for t in done if REJECTED_ATTR not in t.user_attrs]
    on_front = {t.number for t in front}
    assert len(done) == 4 and front and on_front <= {t.number for t in feasible}

    def dominates(a, b) -> bool:  # maximise accuracy, minimise parameters
        return a.values[0] >= b.values[0] and a.values[1] <= b.values[1] and a.values != b.values

    assert not any(dominates(a, b) for a in front for b in front)
    assert all(any(dominates(f, t) for f in front) for t in feasible if t.number not in on_front)
    table = capsys.readouterr().out.split("Pareto front")[-1]
    assert {int(line.split()[0]) for line in table.splitlines()[2:] if line.strip()} == on_front
    (parent,) = kind(sweep["runs"](), "sweep")
    artifacts = {a.path for a in mlflow.MlflowClient(sweep["uri"]).list_artifacts(parent.info.run_id, "plots")}
    assert "plots/pareto_front.png" in artifacts


# ----------------------------------------------------------------------------------------------
# the exact cap across processes
# ----------------------------------------------------------------------------------------------

RACE_WORKER = textwrap.dedent("""
    import sys, time, optuna
    from sweeps.study import create_study, open_storage, run_trials
    spec, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec, heartbeat_seconds=5)
    study = create_study(storage, name, ["maximize"])
    def evaluate(trial, x):
        time.sleep(0.05)
        return x
    print(run_trials(study, storage, n, lambda t: t.suggest_float("x", 0, 1), evaluate))
""")


def _race(spec: str, name: str, n_trials: int, n_workers: int, env: dict) -> list[int]:
    procs = [subprocess.Popen([sys.executable, "-c", RACE_WORKER, spec, name, str(n_trials)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n_workers)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [int(out.split()[-1]) for out, _ in outs]


def _assert_exact(trials: list, n: int) -> None:
    assert len(trials) == n and [t.number for t in trials] == list(range(n))
    assert all(t.state == TrialState.COMPLETE for t in trials)


@pytest.mark.slow
def test_racing_journal_workers_stop_at_exactly_n_trials(sweep: dict) -> None:
    ran = _race(sweep["journal"], "race", 12, 4, sweep["env"])
    assert sum(ran) == 12
    _assert_exact(optuna.load_study(study_name="race", storage=journal(sweep["journal"])).trials, 12)


@pytest.mark.slow
@pytest.mark.postgres
def test_racing_postgres_workers_stop_at_exactly_n_trials(sweep: dict, pg_study: str) -> None:
    ran = _race(PG_URL, pg_study, 12, 4, sweep["env"])
    assert sum(ran) == 12
    _assert_exact(optuna.load_study(study_name=pg_study, storage=PG_OPTUNA).trials, 12)


def _wait_for_running_trial(load, timeout: float = 120.0) -> optuna.trial.FrozenTrial:
    """A trial whose fit() has started its MLflow run (so killing its worker is mid-trial)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for t in load().get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if RUN_ATTR in t.user_attrs and WORKER_ATTR in t.user_attrs:
                    return t
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError("no trial started training in time")


def _assert_recovered(trials: list, killed: list, n: int, rs: list, run_status: str = "FAILED") -> None:
    """Exactly n trials COMPLETE, each killed one FAILed with its parameters retried, MLflow consistent;
    ``run_status``: how a killed trial's run ended (FAILED when its worker died, KILLED when interrupted)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n and len(trials) == n + len(killed)
    assert [t.number for t in trials] == list(range(len(trials)))
    (parent,) = kind(rs, "sweep")
    children = kind(rs, "trial")
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_trials"] == n  # the retries do not count
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    finished = sorted(int(r.data.tags["optuna.trial_number"]) for r in children if r.info.status == "FINISHED")
    assert finished == [t.number for t in complete]  # one run per trial: none lost, none twice
    for dead in killed:
        assert trials[dead.number].state == TrialState.FAIL
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
        assert retry.state == TrialState.COMPLETE and retry.params == dead.params
        (run,) = [r for r in children if r.info.run_id == dead.user_attrs[RUN_ATTR]]
        assert run.info.status == run_status and run.data.tags["optuna.state"] == "FAIL"
        (retry_run,) = [r for r in children if r.info.run_id == retry.user_attrs[RUN_ATTR]]
        assert retry_run.info.run_id != run.info.run_id and retry_run.data.tags["optuna.retry_of"] == str(dead.number)


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize("interrupt, rc", [(Interrupted(signal.SIGTERM), 128 + signal.SIGTERM),
                                           (KeyboardInterrupt(), 130)])
def test_interrupted_trial_is_queued_again_and_trained_on_rerun(sweep: dict, monkeypatch: pytest.MonkeyPatch,
                                                                interrupt: BaseException, rc: int) -> None:
    """SIGTERM or Ctrl-C during the second trial (fit() raises them at a step or epoch boundary): the
    command stops, the trial is failed and its parameters queued again, and rerunning the command
    trains them and ends with exactly --trials trials."""
    real_fit = sweep_trials.fit
    calls: list[int] = []

    def interrupted_fit(cfg, tracker, callbacks=(), options=None, data=None):
        calls.append(1)

        def stop(epoch: int, metrics: dict) -> bool:
            raise interrupt

        return real_fit(cfg, tracker, [*callbacks, stop] if len(calls) == 2 else callbacks, options, data=data)

    monkeypatch.setattr(sweep_trials, "fit", interrupted_fit)
    argv = [*sweep["argv"], "--storage", sweep["journal"], "--study-name", "interrupt", "--trials", "3",
            "--pruner", "none"]
    load = lambda: optuna.load_study(study_name="interrupt", storage=journal(sweep["journal"]))  # noqa: E731
    assert main(argv) == rc
    assert [t.state for t in load().trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    victim, queued = load().trials[1:]
    assert queued.params == victim.params and queued.system_attrs["failed_trial"] == victim.number
    assert main(argv) == 0
    _assert_recovered(load().trials, [victim], 3, sweep["runs"](), run_status="KILLED")


@pytest.mark.slow
def test_killed_sweep_resumes_with_two_journal_workers(sweep: dict) -> None:
    """A sweep killed mid-trial and restarted with two workers ends with exactly --trials trials."""
    cmd = [sys.executable, str(SCRIPT), *sweep["argv"], "--epochs", "2", "--storage", sweep["journal"],
           "--study-name", "kill", "--trials", "4", "--pruner", "none"]
    load = lambda: optuna.load_study(study_name="kill", storage=journal(sweep["journal"]))  # noqa: E731
    proc = subprocess.Popen(cmd, env=sweep["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=sweep["tmp"])
    try:
        victim = _wait_for_running_trial(load)
    finally:
        proc.kill()  # SIGKILL: no chance to end its trial or its MLflow run
        proc.wait()
    assert victim.user_attrs[WORKER_ATTR]["pid"] == proc.pid
    again = subprocess.run([*cmd, "--workers", "2"], env=sweep["env"], capture_output=True, text=True,
                           cwd=sweep["tmp"], timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    trials = load().trials
    _assert_recovered(trials, [victim], 4, sweep["runs"]())


@pytest.mark.slow
def test_worker_killed_like_the_oom_killer_is_a_warning_when_the_others_complete_the_study(sweep: dict) -> None:
    """--workers 2, one worker SIGKILLed mid-trial (what the out-of-memory killer does): the other fails
    and retrains its trial, the study ends with exactly --trials, and the command exits 0 with a warning."""
    cmd = [sys.executable, str(SCRIPT), *sweep["argv"], "--epochs", "2", "--storage", sweep["journal"],
           "--study-name", "oom", "--trials", "4", "--pruner", "none", "--workers", "2"]
    load = lambda: optuna.load_study(study_name="oom", storage=journal(sweep["journal"]))  # noqa: E731
    proc = subprocess.Popen(cmd, env=sweep["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=sweep["tmp"])
    try:
        victim = _wait_for_running_trial(load)
        os.kill(victim.user_attrs[WORKER_ATTR]["pid"], signal.SIGKILL)  # a worker process, not the command
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "warning: worker" in err and "was killed by SIGKILL" in err, err[-3000:]
    assert "the other workers completed the study" in err
    _assert_recovered(load().trials, [victim], 4, sweep["runs"]())


@pytest.mark.parametrize(("codes", "complete", "line"), [
    ([0, 0], True, None),
    ([0, -9], True, "warning: worker 1 was killed by SIGKILL (as the kernel's out-of-memory killer does: see dmesg; "
                    "fewer --workers need less memory); the other workers completed the study"),
    ([143, 0], False, "error: worker 0 exited with code 143; rerun the same command to resume the study"),
    ([-15, 1], False, "error: worker 0 was killed by SIGTERM; worker 1 exited with code 1; rerun the same command to "
                      "resume the study"),
])
def test_worker_failures_line(codes: list[int], complete: bool, line: str | None) -> None:
    assert worker_failures(codes, complete) == line


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_commands_share_a_study_and_retry_a_killed_worker(sweep: dict, pg_study: str) -> None:
    """Two commands against one PostgreSQL study (as on two machines); one is killed mid-trial, the
    heartbeat fails its trial and the other command retries it, ending with exactly --trials trials."""
    cmd = [sys.executable, str(SCRIPT), *sweep["argv"], "--epochs", "2", "--storage", PG_URL, "--study-name",
           pg_study, "--trials", "4", "--pruner", "none", "--heartbeat", "1"]
    procs = [subprocess.Popen(cmd, env=sweep["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=sweep["tmp"]) for _ in range(2)]
    try:
        victim = _wait_for_running_trial(lambda: optuna.load_study(study_name=pg_study, storage=PG_OPTUNA))
        (killed,) = [p for p in procs if p.pid == victim.user_attrs[WORKER_ATTR]["pid"]]
        killed.kill()
        (survivor,) = [p for p in procs if p is not killed]
        out, _ = survivor.communicate(timeout=300)
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()
    assert survivor.returncode == 0, out[-3000:]
    trials = optuna.load_study(study_name=pg_study, storage=PG_OPTUNA).trials
    _assert_recovered(trials, [victim], 4, sweep["runs"]())
