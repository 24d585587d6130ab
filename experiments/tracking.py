"""MLflow tracking behind a small interface, with a no-op twin for --no-tracking and benchmarks."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from experiments.errors import UserError
from experiments.names import DEFAULT_TRACKING_URI, IMPORTED_FROM_RUN_ID, PARENT_RUN_ID

MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
SYSTEM_METRICS_PREFIX = "system/"  # MLflow's system-metrics monitor: not exported
# mlflow.* tags naming what does not travel with an exported run: its logged model, its parent run.
UNPORTABLE_TAGS = ("mlflow.log-model.history", "mlflow.loggedArtifacts", "mlflow.loggedImages", PARENT_RUN_ID)
SEARCH_PAGE = 1000  # runs per MLflow search request


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` in consecutive slices of at most ``size``: MLflow's per-call limits."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def default_tracking_uri() -> str:
    return normalize_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def normalize_uri(uri: str) -> str:
    """Relative SQLite paths become absolute: MLflow caches stores by URI string, and resume needs a stable one."""
    db = _sqlite_path(uri)
    return f"sqlite:///{db.resolve()}" if db is not None and not db.is_absolute() else uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first-time schema creation of a SQLite store: concurrent migrations crash."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before training when an HTTP tracking server does not answer its health endpoint."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status != 200:
                raise UserError(f"tracking server {uri} answered HTTP {resp.status} on /health")
    except urllib.error.HTTPError as e:  # it answers, but not as an MLflow server would
        raise UserError(f"tracking server {uri} answered HTTP {e.code} on /health; check --tracking-uri and the "
                        f"server's log") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"tracking server {uri} is unreachable ({reason}); start it, fix --tracking-uri, "
                        f"or train with --no-tracking") from None


def mlflow_logging(verbose: bool) -> None:
    """MLflow logs at INFO what says nothing about training: the SQLite schema's creation and the system-metrics
    monitor's start and stop, four to six lines a run. Show them only when ``verbose`` (or when
    $MLFLOW_LOGGING_LEVEL asks for a level)."""
    import mlflow  # noqa: F401  (importing it sets its logger's level from $MLFLOW_LOGGING_LEVEL; set it after)

    logging.getLogger("mlflow").setLevel(os.environ.get("MLFLOW_LOGGING_LEVEL") or ("INFO" if verbose else "WARNING"))


def init_store(uri: str, experiment: str) -> str:
    """Create the store's schema and the experiment once, safely across processes; returns its id.

    A new experiment in a SQLite store keeps its artifacts beside the database file (``mlruns/``), not
    in whatever directory the process happens to run in.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    check_reachable(uri)
    with _store_lock(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)
        try:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                db = _sqlite_path(uri)
                location = (db.parent / "mlruns" / _safe_name(experiment)).as_uri() if db is not None else None
                return client.create_experiment(experiment, artifact_location=location)
        except MlflowException as e:  # a server that answers /health but refuses the API
            raise UserError(_refusal(uri, e)) from None
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"experiment {experiment!r} is deleted in {uri}; restore it or choose another --experiment")
        return exp.experiment_id


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def _refusal(uri: str, error: Exception) -> str:
    """One line for an MLflow API error, with the fix for the common case of a Host not in --allowed-hosts."""
    status = getattr(error, "get_http_status_code", lambda: None)()
    if status == 403 and "Host header" in str(error):
        host = urllib.parse.urlsplit(uri).netloc
        return (f"tracking server {uri} refuses the Host header {host!r} (HTTP 403); add {host} to the server's "
                f"--allowed-hosts, or use a --tracking-uri whose host it allows")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"tracking store {uri} refused the request ({first}); check the server's log and --tracking-uri"


def git_info() -> dict[str, str]:
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {"git_commit": commit or "unknown", "git_dirty": str(bool(git("status", "--porcelain"))) if commit else "unknown"}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo ("cpu" where there is none)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (_cpu_name() or "cpu")


def environment_tags(device: torch.device) -> dict[str, str]:
    name = device_name(device)
    return {
        **git_info(),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "device_name": name,
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


class Tracker:
    """No-op tracker: what --no-tracking and the benchmarks use. ``run_id`` keys the checkpoint folder."""

    run_id: str | None = None

    def start(self, *, run_id: str | None = None, run_name: str | None = None,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
        self.run_id = run_id or uuid.uuid4().hex
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_model(self, model: torch.nn.Module, input_shape: tuple[int, ...]) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, images: np.ndarray, labels: np.ndarray, context: str) -> None: ...

    def logged_steps(self, key: str) -> set[int]:
        return set()

    def end(self, status: str) -> None: ...


class MlflowTracker(Tracker):
    """Fluent-API MLflow run (needed for system metrics, log_model and log_input)."""

    def __init__(self, tracking_uri: str, experiment: str, system_metrics: bool = True):
        self.uri = normalize_uri(tracking_uri)
        self.experiment = experiment
        self.system_metrics = system_metrics
        self.experiment_id = init_store(self.uri, experiment)

    def start(self, *, run_id: str | None = None, run_name: str | None = None,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        if run_id is not None:
            try:
                status = mlflow.MlflowClient().get_run(run_id).info.status
            except Exception:
                raise UserError(f"run {run_id} is not in tracking store {self.uri}; resume with the "
                                f"--tracking-uri the run was recorded in") from None
            if status == "FINISHED":  # resuming would only record its results a second time
                raise UserError(f"run {run_id} has FINISHED; nothing to resume (resume a KILLED or FAILED run, "
                                f"or start a new one)")
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else self.experiment_id,
                               run_name=None if run_id else run_name, tags=tags, parent_run_id=parent_run_id,
                               log_system_metrics=self.system_metrics)
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        for chunk in chunks([(k, str(v)) for k, v in params.items()], MAX_PARAMS_PER_CALL):
            mlflow.log_params(dict(chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(tags)

    def log_text(self, text: str, artifact_file: str) -> None:
        import mlflow

        mlflow.log_text(text, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path)

    def log_model(self, model: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
        import mlflow.pytorch

        # Two images: with one, torch.export (run by MLflow on the example) warns that it specialised the
        # batch dimension to 1.
        example = np.zeros((2, *input_shape), dtype=np.float32)
        # Explicit requirements: MLflow's inference of them imports the model in a subprocess (slow).
        mlflow.pytorch.log_model(model, name="model", input_example=example,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

    def log_dataset(self, name: str, digest: str, source: str, images: np.ndarray, labels: np.ndarray, context: str) -> None:
        import mlflow

        with warnings.catch_warnings():  # a local path matches two equivalent registered source types
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
            ds = mlflow.data.from_numpy(images, targets=labels, source=source, name=name, digest=digest[:36])
        try:
            mlflow.log_input(ds, context=context)
        except mlflow.exceptions.MlflowException as e:
            # Two processes (campaign or sweep workers) logging the same dataset to one SQLite store race on its
            # unique row; the loser finds the row the winner inserted when it links its run again.
            if "UNIQUE constraint failed: datasets" not in str(e):
                raise
            mlflow.log_input(ds, context=context)

    def logged_steps(self, key: str) -> set[int]:
        import mlflow

        return {m.step for m in mlflow.MlflowClient().get_metric_history(self.run_id, key)}

    def end(self, status: str) -> None:
        import mlflow

        mlflow.end_run(status=status)


@dataclass(frozen=True)
class RunState:
    status: str  # RUNNING, FINISHED, FAILED or KILLED
    deleted: bool


class TrackingStore:
    """Runs of one MLflow store addressed by id, for what is recorded beside fit()'s own (active) run: a
    sweep's parent run, the state tag of a trial run that has ended, a run for a trial that was never
    trained, and the run of a worker that died. None of them becomes the process's active run, so fit()
    can start its own in between."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.uri = normalize_uri(tracking_uri)
        self.experiment = experiment

    @functools.cached_property
    def _client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(self.uri)

    @functools.cached_property
    def experiment_id(self) -> str:
        return init_store(self.uri, self.experiment)

    def run_state(self, run_id: str) -> RunState | None:
        """None when the store holds no run ``run_id``."""
        from mlflow.exceptions import MlflowException

        try:
            info = self._client.get_run(run_id).info
        except MlflowException:
            return None
        return RunState(info.status, info.lifecycle_stage == "deleted")

    def search_runs(self, filter_string: str, order_by: list[str] | None = None) -> list[Any]:
        """Every run of the experiment that ``filter_string`` (MLflow's search syntax) selects, all pages."""
        runs: list[Any] = []
        token = None
        while True:
            page = self._client.search_runs([self.experiment_id], filter_string, max_results=SEARCH_PAGE,
                                            order_by=order_by, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def metric_history(self, run_id: str, key: str) -> list[Any]:
        return self._client.get_metric_history(run_id, key)

    def create_run(self, run_name: str, tags: dict[str, str], params: dict[str, Any],
                   metrics: dict[str, float] | None = None, parent_run_id: str | None = None) -> str:
        """A RUNNING run with its tags, params and step-0 metrics; returns its id."""
        from mlflow.entities import Metric, Param

        tags = tags | ({PARENT_RUN_ID: parent_run_id} if parent_run_id is not None else {})
        run_id = self._client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        now = int(time.time() * 1000)
        self._client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                               metrics=[Metric(k, v, now, 0) for k, v in (metrics or {}).items()])
        return run_id

    def reopen(self, run_id: str) -> None:
        """RUNNING again, e.g. a sweep's parent run while more trials or a retrain are added to it."""
        self._client.update_run(run_id, status="RUNNING")

    def end_run(self, run_id: str, status: str) -> None:
        self._client.set_terminated(run_id, status)

    def end_if_running(self, run_id: str, status: str, tags: dict[str, str]) -> bool:
        """Tag and end a run that its process left RUNNING (the process died); False if it had ended."""
        state = self.run_state(run_id)
        if state is None or state.status != "RUNNING":
            return False
        self.set_tags(run_id, tags)
        self.end_run(run_id, status)
        return True

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(run_id, key, value)

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """At step 0: values that sum up the run."""
        for key, value in metrics.items():
            self._client.log_metric(run_id, key, value)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._client.log_text(run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure, saved tight (no clipped labels)."""
        self._client.log_figure(run_id, figure, artifact_file, save_kwargs={"bbox_inches": "tight"})

    def delete_run(self, run_id: str) -> None:
        self._client.delete_run(run_id)

    def export_run(self, run_id: str) -> dict[str, Any]:
        """The run as plain, JSON-ready data in a stable order: its id, name, experiment, status, start and end
        time (ms), params, tags (less UNPORTABLE_TAGS) and every metric's history (less system metrics) as
        {"step", "timestamp", "value"} points sorted by step and time. Artifacts, the logged model and the
        dataset inputs are left out."""
        run = self._client.get_run(run_id)
        info = run.info
        metrics = {}
        for key in sorted(k for k in run.data.metrics if not k.startswith(SYSTEM_METRICS_PREFIX)):
            points = self._client.get_metric_history(run_id, key)
            # repr(value): a tie-break that orders NaN too
            points = sorted(points, key=lambda m: (m.step, m.timestamp, repr(m.value)))
            metrics[key] = [{"step": m.step, "timestamp": m.timestamp, "value": m.value} for m in points]
        return {"run_id": info.run_id, "run_name": info.run_name, "status": info.status,
                "experiment": self._client.get_experiment(info.experiment_id).name,
                "start_time": info.start_time, "end_time": info.end_time,
                "params": dict(sorted(run.data.params.items())),
                "tags": {k: v for k, v in sorted(run.data.tags.items()) if k not in UNPORTABLE_TAGS},
                "metrics": metrics}

    def import_run(self, record: dict[str, Any]) -> str:
        """A new run in this experiment from export_run's ``record``: its params, tags, metric histories (original
        steps and timestamps), start and end time and status, tagged IMPORTED_FROM_RUN_ID with the original's id;
        returns the new run's id. If logging fails, the partial run is deleted."""
        from mlflow.entities import Metric, Param

        tags = {k: v for k, v in record["tags"].items() if k not in UNPORTABLE_TAGS}
        run_id = self._client.create_run(self.experiment_id, start_time=record["start_time"],
                                         tags=tags | {IMPORTED_FROM_RUN_ID: record["run_id"]},
                                         run_name=record["run_name"]).info.run_id
        try:
            metrics = [Metric(key, point["value"], point["timestamp"], point["step"])
                       for key, points in record["metrics"].items() for point in points]
            for chunk in chunks(metrics, MAX_METRICS_PER_CALL):
                self._client.log_batch(run_id, metrics=chunk)
            # Params last: searches for a cell's runs select on params, so the run stays unseen until it is whole.
            for chunk in chunks([Param(k, v) for k, v in record["params"].items()], MAX_PARAMS_PER_CALL):
                self._client.log_batch(run_id, params=chunk)
            self._client.set_terminated(run_id, record["status"], end_time=record["end_time"])
        except BaseException:
            with contextlib.suppress(Exception):  # the error that matters is the one above; a leftover is harmless
                self.delete_run(run_id)
            raise
        return run_id
