"""Read a cnn-zoo experiment out of MLflow into pandas: the only module of ``analysis`` that talks to MLflow.

It reads the records of the training harness alone (params, tags, metrics); it never imports the harness,
the zoo or torch. MLflow returns every param as a string, so ``runs_frame`` casts them.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Experiment, LifecycleStage, Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.tracking import SEARCH_MAX_RESULTS_DEFAULT
from requests import RequestException
from sqlalchemy.exc import SQLAlchemyError

from analysis.aggregate import HISTORY_METRICS
from analysis.errors import AnalysisError
from analysis.recipes import recipe_protocols
from experiments import names
from experiments.names import DEFAULT_TRACKING_URI, MODEL_PARAM_PREFIX, RECIPE_PARAM_PREFIX

TEXT_PARAMS = (names.ARCH, names.FAMILY, names.DATASET, names.RECIPE, names.RECIPE_HASH, names.DEVICE,
               names.DATA_DIGEST, names.PRETRAINED, names.PRETRAINED_SHA256)  # pretrained: fine-tuning runs only
INT_PARAMS = {names.SEED: "seed", names.EPOCHS: "epochs", names.BATCH_SIZE: "batch_size",
              names.TRAIN_SIZE: "train_size", names.VAL_SIZE: "val_size", names.TEST_SIZE: "test_size",
              names.NUM_CLASSES: "num_classes", names.SHOTS: "shots"}
TAGS = {names.KIND: "kind", names.PARENT_RUN_ID: "parent_run_id", names.SEED_GROUP: "seed_group",
        names.STUDY_NAME: "study", names.TRIAL_NUMBER: "trial_number", names.TRIAL_STATE: "trial_state",
        names.DIVERGED: "diverged", names.GIT_COMMIT: "git_commit", names.DEVICE_NAME: "device_name"}
# Logged once at step 0 at the end of a run, so the run's latest value is the value.
SUMMARY_METRICS = tuple(dict.fromkeys((*names.SUMMARY_METRICS, names.EVAL_SECONDS, names.WALL_SECONDS)))
# Cast one column at a time: each holds one hyperparameter or recipe field, whatever its type.
PREFIXED_PARAMS = (MODEL_PARAM_PREFIX, RECIPE_PARAM_PREFIX)
BASE_COLUMNS = ("run_id", "run_name", "status", "start_time")
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
_INT = re.compile(r"[+-]?\d+")


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when the store cannot answer.

    MLflow itself would retry a dead server or database for minutes, and would create an empty SQLite
    file (and its folders) at a mistyped path, so both are checked here before any client call.
    """
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0]
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if path and not Path(path).is_file():
            raise AnalysisError(f"tracking store {uri} does not exist (no file {path}); pass the --tracking-uri "
                                f"the runs were logged to", exit_code=1)
    elif scheme in ("", "file"):
        path = parsed.path if scheme == "file" else uri
        if not Path(path).is_dir():
            raise AnalysisError(f"tracking store {uri} does not exist (no folder {path})", exit_code=1)
    elif scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status != 200:
                    raise AnalysisError(f"tracking server {uri} answered HTTP {response.status} on /health",
                                        exit_code=1)
        except (urllib.error.URLError, OSError) as e:
            raise AnalysisError(f"tracking server {uri} is unreachable ({getattr(e, 'reason', e)})",
                                exit_code=1) from None
    elif scheme in _DEFAULT_PORTS:
        try:
            port = parsed.port or _DEFAULT_PORTS[scheme]
            socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout).close()
        except (OSError, ValueError) as e:
            raise AnalysisError(f"tracking database {parsed.hostname}:{parsed.port or _DEFAULT_PORTS[scheme]} "
                                f"is unreachable ({e})", exit_code=1) from None


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """Turn a failing store (server error, broken database) into a one-line ``AnalysisError``."""
    try:
        yield
    except (MlflowException, SQLAlchemyError, RequestException, OSError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AnalysisError(f"cannot read tracking store {uri}: {first_line}", exit_code=1) from None


def open_store(uri: str) -> MlflowClient:
    """A client bound to ``uri`` (global MLflow state is left alone), after ``check_reachable``."""
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_names(client: MlflowClient) -> list[str]:
    names, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=token)
        names += [e.name for e in page]
        token = page.token
        if not token:
            return sorted(names)


def find_experiment(client: MlflowClient, name: str) -> Experiment:
    """The active experiment called ``name``; otherwise an error that lists the experiments there are."""
    experiment = client.get_experiment_by_name(name)  # also returns deleted experiments
    if experiment is None or experiment.lifecycle_stage == LifecycleStage.DELETED:
        state = "is deleted" if experiment is not None else "does not exist"
        raise AnalysisError(f"experiment {name!r} {state} in {client.tracking_uri}; existing experiments: "
                            f"{', '.join(experiment_names(client)) or '(none)'}")
    return experiment


def fetch_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    """Every active run of the experiment, whatever its status (``search_runs`` pages at 1000)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=SEARCH_MAX_RESULTS_DEFAULT, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def cast_param_column(values: pd.Series) -> pd.Series:
    """Cast a column of string params: all "True"/"False" -> boolean, all integers -> Int64,
    all numbers -> float64, anything else stays text. "None" (a hyperparameter left unset) is missing."""
    values = values.astype(object).where(values.notna() & (values != "None"), None)
    present = values.dropna().astype(str)
    if present.empty:
        return values
    if present.isin(["True", "False"]).all():
        return values.map({"True": True, "False": False}).astype("boolean")
    if present.str.fullmatch(_INT).all():
        return pd.to_numeric(values).astype("Int64")
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers[present.index].notna().all():
        return numbers.astype("float64")
    return values


def runs_frame(runs: Iterable[Run]) -> pd.DataFrame:
    """One row per run: ids, status, the harness's tags, its params cast to numbers where they are, every
    ``model.*`` hyperparameter and ``recipe.*`` field (cast per column) and the summary metrics (float, NaN
    when absent).

    Renamed columns: ``data.{train,val,test}_size`` -> ``{train,val,test}_size``, ``data.num_classes`` ->
    ``num_classes``, ``cnn_zoo.kind`` -> ``kind``, ``cnn_zoo.diverged`` -> ``diverged`` (the reason, or
    missing), ``mlflow.parentRunId`` -> ``parent_run_id``, ``optuna.study_name/trial_number/state`` ->
    ``study/trial_number/trial_state``; ``recipe_protocol`` describes the run's recipe
    (``analysis.recipes.recipe_protocols``).
    """
    records = []
    for run in runs:
        params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
        info = run.info
        record: dict[str, object] = dict(zip(BASE_COLUMNS, (info.run_id, info.run_name, info.status, info.start_time)))
        record.update({column: tags.get(tag) for tag, column in TAGS.items()})
        record.update({name: params.get(name) for name in TEXT_PARAMS})
        record.update({column: params.get(name) for name, column in INT_PARAMS.items()})
        record.update({k: v for k, v in params.items() if k.startswith(PREFIXED_PARAMS)})
        record.update({name: metrics.get(name) for name in SUMMARY_METRICS})
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    prefixed = sorted(c for c in frame.columns if c.startswith(PREFIXED_PARAMS))
    frame = frame.reindex(columns=[*BASE_COLUMNS, *TAGS.values(), *TEXT_PARAMS, *INT_PARAMS.values(), *prefixed,
                                   *SUMMARY_METRICS])
    for column in (*INT_PARAMS.values(), "trial_number"):
        frame[column] = pd.to_numeric(frame[column].astype(object), errors="coerce").astype("Int64")
    for column in prefixed:
        frame[column] = cast_param_column(frame[column])
    for column in SUMMARY_METRICS:
        frame[column] = frame[column].astype("float64")
    frame["start_time"] = pd.to_datetime(frame["start_time"], unit="ms", utc=True)
    frame["recipe_protocol"] = recipe_protocols(frame)
    return frame.sort_values(["start_time", "run_id"], ignore_index=True)


def load_experiment(uri: str, experiment: str) -> tuple[MlflowClient, pd.DataFrame]:
    """Open the store at ``uri`` and read the experiment's runs; every failure is an ``AnalysisError``."""
    with store_errors(uri):
        client = open_store(uri)
        return client, load_runs(client, experiment)


def load_runs(client: MlflowClient, experiment: str) -> pd.DataFrame:
    """``runs_frame`` of the experiment; an unknown or empty experiment is an ``AnalysisError``."""
    found = find_experiment(client, experiment)
    runs = fetch_runs(client, found.experiment_id)
    if not runs:
        raise AnalysisError(f"experiment {experiment!r} in {client.tracking_uri} has no runs; existing experiments: "
                            f"{', '.join(experiment_names(client))}")
    return runs_frame(runs)


def load_histories(client: MlflowClient, run_ids: Iterable[str],
                   metrics: Iterable[str] = HISTORY_METRICS) -> pd.DataFrame:
    """Per-epoch values as a long frame ``run_id, metric, epoch, value`` (step = epoch, from 1).

    A step logged twice (a resumed run re-logging an epoch) keeps its latest value.
    """
    rows = [(run_id, m.key, m.step, m.value, m.timestamp)
            for run_id in run_ids for key in metrics
            for m in client.get_metric_history(run_id, key) if m.step >= 1]
    history = pd.DataFrame(rows, columns=["run_id", "metric", "epoch", "value", "timestamp"])
    history = (history.sort_values("timestamp", kind="stable")
               .drop_duplicates(["run_id", "metric", "epoch"], keep="last"))
    return history.drop(columns="timestamp").astype({"epoch": "int64", "value": "float64"}).sort_values(
        ["run_id", "metric", "epoch"], ignore_index=True)
