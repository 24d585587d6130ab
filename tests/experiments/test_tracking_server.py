"""The team setup: a real `mlflow server` on PostgreSQL with proxied artifacts, trained against over HTTP.

docs/SCALEOUT.md documents the same command. Each test starts its own server on a free port of
127.0.0.1 in its own process group and stops the whole group at the end (no leftover workers).
"""
from __future__ import annotations

import contextlib
import getpass
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest
import torch

from tests.servers import mlflow_server
from tests.helpers import REPO, service_missing

TINY = ["--recipe", "smoke", "--arch", "resnet20", "--no-progress", "--epochs", "1"]
PG_HOST, PG_PORT, PG_DB = "127.0.0.1", 5432, "test"
TRAIN_S = 300


# ----------------------------------------------------------------------------------------------
# Helpers: training through run.py (servers: tests/servers.py)
# ----------------------------------------------------------------------------------------------

def train(tmp: Path, data_dir: Path, tracking_uri: str, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"CNN_ZOO_CACHE": str(tmp / "cache"), "PYTHONPATH": str(REPO), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), *TINY, "--data-dir", str(data_dir),
           "--output-dir", str(tmp / "outputs"), "--tracking-uri", tracking_uri, *extra]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=TRAIN_S)


def get_status(url: str, host: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


# ----------------------------------------------------------------------------------------------
# PostgreSQL: a fresh database per test, dropped afterwards
# ----------------------------------------------------------------------------------------------

def _pg_connect(dbname: str, user: str):
    import psycopg2

    return psycopg2.connect(host=PG_HOST, port=PG_PORT, dbname=dbname, user=user, connect_timeout=5)


@pytest.fixture
def pg_database() -> Iterator[tuple[str, str]]:
    """(user, database): a uniquely named database on the local server, or ``test`` itself when the
    user may not create databases (tests then only look at their own, uniquely named experiment)."""
    import psycopg2
    from psycopg2 import sql

    with socket.socket() as s:
        s.settimeout(3)
        if s.connect_ex((PG_HOST, PG_PORT)) != 0:
            service_missing(f"no PostgreSQL server listens on {PG_HOST}:{PG_PORT}")
    errors = []
    for user in dict.fromkeys(filter(None, (os.environ.get("PGUSER"), "postgres", "root", getpass.getuser()))):
        try:
            conn = _pg_connect(PG_DB, user)
            break
        except psycopg2.OperationalError as e:
            errors.append(f"{user}: {str(e).strip()}")
    else:
        pytest.fail(f"PostgreSQL on {PG_HOST}:{PG_PORT} accepts none of the users tried: {errors}")
    conn.autocommit = True
    name = f"mlflow_test_{uuid.uuid4().hex[:12]}"
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created = True
    except psycopg2.errors.InsufficientPrivilege:
        name, created = PG_DB, False
    try:
        yield user, name
    finally:
        if created:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.close()


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.slow
def test_train_against_mlflow_server_on_postgres(tmp_path, tiny_image_folder_archive, pg_database):
    user, dbname = pg_database
    artifacts = tmp_path / "artifacts"
    experiment = f"server-{uuid.uuid4().hex[:8]}"
    backend = f"postgresql+psycopg2://{user}@{PG_HOST}:{PG_PORT}/{dbname}"
    args = ["--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
            "--allowed-hosts", "127.0.0.1:*,localhost:*"]
    with mlflow_server(args, tmp_path, tmp_path / "server.log") as url:
        # --allowed-hosts guards every API call; /health (what run.py probes first) is exempt.
        assert get_status(url + "/api/2.0/mlflow/experiments/search?max_results=1", host="evil.example") == 403
        assert get_status(url + "/api/2.0/mlflow/experiments/search?max_results=1") == 200

        proc = train(tmp_path, tiny_image_folder_archive.parent, url, "--experiment", experiment, "--run-name", "pg-tiny")
        assert proc.returncode == 0, proc.stderr[-3000:]

        client = mlflow.MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name(experiment)
        assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied through the server
        (run,) = client.search_runs([exp.experiment_id])
        run_id = run.info.run_id
        assert run.info.status == "FINISHED" and run.info.run_name == "pg-tiny"
        assert run.data.params["arch"] == "resnet20" and run.data.params["recipe"] == "smoke"
        assert run.data.params["data.train_size"] == "180"
        assert 0 <= run.data.metrics["test_acc"] <= 100 and "final_test_acc" in run.data.metrics
        assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1]

        top = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "model_summary.txt", "checkpoints"} <= top
        assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best.pt", "checkpoints/last.pt"}
        down = tmp_path / "download"
        down.mkdir()
        config = Path(client.download_artifacts(run_id, "config.yaml", str(down)))
        assert "arch: resnet20" in config.read_text()
        last = Path(client.download_artifacts(run_id, "checkpoints/last.pt", str(down)))
        local = tmp_path / "outputs" / "checkpoints" / run_id / "last.pt"
        assert last.read_bytes() == local.read_bytes()
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        assert ckpt["run_id"] == run_id and ckpt["epoch"] == 1 and ckpt["tracking_uri"] == url

    # The server is gone; what it recorded stays: the rows in PostgreSQL, the files in --artifacts-destination.
    assert list(artifacts.rglob(f"{run_id}/artifacts/checkpoints/last.pt")), sorted(map(str, artifacts.rglob("*")))[:20]
    conn = _pg_connect(dbname, user)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (run_id,))
            assert cur.fetchall() == [("pg-tiny", "FINISHED")]
    finally:
        conn.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_sweep_on_postgres_storage_logs_to_mlflow_server(tmp_path, tiny_image_folder_archive, pg_database):
    """Issue 6: ``--storage postgresql://...`` and ``--tracking-uri http://...`` together. The Optuna study
    lives in database ``test`` (as in tests/test_sweeps.py), the MLflow server's store in the fresh database:
    both keep their schema version in a table named alembic_version, so they cannot share one."""
    from optuna.trial import TrialState

    from sweeps.records import RUN_ATTR

    user, dbname = pg_database
    if dbname == PG_DB:
        service_missing(f"PostgreSQL user {user!r} may not create a database for MLflow beside Optuna's tables in {PG_DB}")
    storage = f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{PG_DB}"
    optuna_url = storage.replace("postgresql://", "postgresql+psycopg2://", 1)  # SQLAlchemy 2.1: bare = psycopg 3
    study_name, experiment = f"test-server-sweep-{uuid.uuid4().hex[:10]}", f"server-sweep-{uuid.uuid4().hex[:8]}"
    space = tmp_path / "space.yaml"
    space.write_text("growth_rate: {low: 8, high: 16, step: 4}\ncompression: {low: 0.5, high: 1.0}\ndepths: [10]\n")
    args = ["--backend-store-uri", f"postgresql+psycopg2://{user}@{PG_HOST}:{PG_PORT}/{dbname}",
            "--artifacts-destination", str(tmp_path / "artifacts"), "--allowed-hosts", "127.0.0.1:*,localhost:*"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"CNN_ZOO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        with mlflow_server(args, tmp_path, tmp_path / "server.log") as url:
            cmd = [sys.executable, str(REPO / "sweeps" / "densenet_bc.py"), "--recipe", "smoke", "--epochs", "1",
                   "--subset", "64", "--set", "val_size=20", "--device", "cpu",
                   "--data-dir", str(tiny_image_folder_archive.parent), "--space", str(space),
                   "--output-dir", str(tmp_path / "outputs"), "--trials", "2", "--pruner", "none",
                   "--storage", storage, "--study-name", study_name, "--tracking-uri", url, "--experiment", experiment]
            proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2 * TRAIN_S)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

            client = mlflow.MlflowClient(tracking_uri=url)
            runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
            (parent,) = [r for r in runs if r.data.tags.get("cnn_zoo.kind") == "sweep"]
            children = [r for r in runs if r.data.tags.get("cnn_zoo.kind") == "trial"]
            assert parent.info.status == "FINISHED" and parent.data.tags["optuna.study_name"] == study_name
            assert parent.data.params["storage"].startswith("postgresql://"), parent.data.params["storage"]
            assert len(children) == 2 and len(runs) == 3, [(r.info.run_name, r.data.tags.get("cnn_zoo.kind")) for r in runs]
            assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
            assert all(r.info.status == "FINISHED" and "val_acc" in r.data.metrics for r in children)

        trials = optuna.load_study(study_name=study_name, storage=optuna_url).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
        assert {t.user_attrs[RUN_ATTR] for t in trials} == {r.info.run_id for r in children}
    finally:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=study_name, storage=optuna_url)


@pytest.mark.slow
def test_server_refusing_our_host_header_is_one_line(tmp_path, tiny_image_folder_archive):
    """/health is exempt from --allowed-hosts, so check_reachable passes; the first API call answers 403."""
    args = ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art"),
            "--allowed-hosts", "mlflow.example.org"]
    with mlflow_server(args, tmp_path, tmp_path / "server.log") as url:
        proc = train(tmp_path, tiny_image_folder_archive.parent, url)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "--allowed-hosts" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()  # refused before any data loading or training


def test_other_api_refusals_are_one_line() -> None:
    """Anything but the Host-header 403 (basic auth, a 5xx) still becomes one line naming the store."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, UNAUTHENTICATED

    from experiments.tracking import _refusal

    for code in (UNAUTHENTICATED, INTERNAL_ERROR):
        line = _refusal("http://mlflow.lab:5000", MlflowException("API request failed\nTraceback ...", error_code=code))
        assert line == ("tracking store http://mlflow.lab:5000 refused the request (API request failed); "
                        "check the server's log and --tracking-uri")
