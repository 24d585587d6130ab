"""Optuna storage, a storage-wide lock, and the worker loop that stops a study at exactly N trials.

Storages: a journal file (Optuna's JournalStorage + JournalFileBackend; processes on one machine) or
a ``postgresql://`` URL (RDBStorage; workers on many machines).

The cap. A trial *counts* once it is COMPLETE, PRUNED or RUNNING, or FAILed with a verdict (an error
the objective caught and recorded, e.g. a diverged loss). A trial lost to a dead worker (SIGKILL, a
crash of the machine) or an interrupted one (SIGTERM, Ctrl-C, which end the worker) does not count: it
is failed and its parameters are queued again (WAITING, with Optuna's ``failed_trial`` system attr
naming it) for the next ask, so rerunning the command trains it. Any other error ends the worker
without re-queueing: its trial does not count, and the next ask samples a new point.
Every worker holds the study's lock (flock on ``<journal>.sweep-lock``, or a PostgreSQL session
advisory lock keyed by the study name, which the server drops with a dead worker's connection)
while it (1) fails the trials of dead workers, (2) counts, and (3) if fewer than N count, asks for a
trial and stamps it with its host and pid before letting go. Two workers can therefore never both
see N - 1 and both ask. A worker leaves only when N trials count and none is RUNNING, so a live
worker outlasts, and recovers, the trial of a dead one.

Dead workers. PostgreSQL: Optuna's heartbeat, ``RDBStorage(heartbeat_interval=, grace_period=,
heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=))`` (Optuna 5's name for
the older ``failed_trial_callback`` / ``RetryFailedTrialCallback``), applied by
``optuna.storages.fail_stale_trials``. The journal has no heartbeat: a RUNNING trial whose worker
process (host, pid, start time) no longer exists on this host is failed and re-queued by the same
callback. A journal shared over NFS by several hosts cannot tell whether a remote worker is alive;
use PostgreSQL there.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import operator
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import optuna
import psutil
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from experiments.errors import UserError

WORKER_ATTR = "cnn_zoo.worker"  # trial user attr: {"host", "pid", "started"} of the process running it
FAILURE_ATTR = "cnn_zoo.failure"  # trial user attr: the caught error that makes a FAIL count
WORKERS_STARTED_ATTR = "cnn_zoo.workers_started"  # study user attr: gives each worker its own sampler seed
MAX_RETRY = 2  # times a dead worker's parameters are queued again
POLL_SECONDS = 1.0  # how often a worker with nothing to run looks at the study again
POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg2")  # psycopg2 is the driver the project installs

StaleTrialHook = Callable[[optuna.Study, FrozenTrial], None]


class Lock(Protocol):
    def acquire(self) -> None: ...
    def release(self) -> None: ...


class FileLock:
    """flock on a file beside the journal; the kernel drops it when its process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._file: Any = None

    def acquire(self) -> None:
        file = open(self.path, "a")
        fcntl.flock(file, fcntl.LOCK_EX)
        self._file = file

    def release(self) -> None:
        """Idempotent: the objective releases the lock early, the loop's ``finally`` again."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock on its own connection; closing it releases the lock,
    and so does the server when a dead worker's connection goes away."""

    def __init__(self, url: str, name: str):
        from sqlalchemy.engine import make_url

        u = make_url(url)
        self._connect_kwargs = {"host": u.host, "port": u.port, "user": u.username, "password": u.password,
                                "dbname": u.database, **u.query}
        self._display = mask_url(url)
        self.key = int.from_bytes(hashlib.sha256(f"cnn_zoo.sweeps:{name}".encode()).digest()[:8], "big", signed=True)
        self._conn: Any = None

    def acquire(self) -> None:
        import psycopg2

        try:
            conn = psycopg2.connect(**{k: v for k, v in self._connect_kwargs.items() if v is not None})
        except psycopg2.OperationalError as e:
            raise UserError(f"cannot connect to PostgreSQL {self._display}: {str(e).strip().splitlines()[0]}") from None
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (self.key,))
        self._conn = conn

    def release(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@contextlib.contextmanager
def locked(lock: Lock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def mask_url(url: str) -> str:
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@dataclass
class SweepStorage:
    spec: str  # what --storage said
    optuna: optuna.storages.BaseStorage
    postgres: bool  # True: Optuna's heartbeat finds dead workers; False: the journal's pid check does
    stale_callback: StaleTrialHook

    def lock(self, study_name: str) -> Lock:
        if self.postgres:
            return AdvisoryLock(self.spec, study_name)
        return FileLock(Path(self.spec + ".sweep-lock"))

    @property
    def display(self) -> str:
        return mask_url(self.spec) if self.postgres else str(Path(self.spec).resolve())


def open_storage(spec: str, heartbeat_seconds: int, on_stale: StaleTrialHook | None = None) -> SweepStorage:
    """A journal file path or a ``postgresql://`` URL. ``on_stale`` runs for every trial failed because
    its worker died (after its parameters have been queued again)."""
    retry = _RetryStaleTrial(on_stale)
    if "://" not in spec:
        path = Path(spec)
        if not path.parent.is_dir():
            raise UserError(f"--storage {spec}: folder {path.parent} does not exist")
        return SweepStorage(spec, JournalStorage(JournalFileBackend(spec)), postgres=False, stale_callback=retry)
    scheme = spec.split("://", 1)[0]
    if scheme.startswith("postgresql+") and scheme not in POSTGRES_SCHEMES:
        raise UserError(f"--storage {mask_url(spec)}: the {scheme.split('+', 1)[1]} driver is not supported; "
                        f"use postgresql:// or postgresql+psycopg2://")
    if scheme not in POSTGRES_SCHEMES:
        raise UserError(f"--storage {mask_url(spec)}: use a journal file path (one machine) or a postgresql:// URL "
                        f"(many machines); {scheme}:// is not supported")
    import sqlalchemy.exc

    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project depends on psycopg2.
    url = spec.replace("postgresql://", "postgresql+psycopg2://", 1) if scheme == "postgresql" else spec
    # The first process creates the tables; concurrent first-time creation collides, so serialise it.
    with locked(AdvisoryLock(spec, "schema")), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval is "experimental"
        try:
            rdb = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                             heartbeat_interval=heartbeat_seconds, grace_period=3 * heartbeat_seconds,
                                             heartbeat_stale_trial_callback=retry)
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise UserError(f"cannot open Optuna storage {mask_url(spec)}: {str(e).strip().splitlines()[0]}") from None
    return SweepStorage(spec, rdb, postgres=True, stale_callback=retry)


def _queue_again(study: optuna.Study, trial: FrozenTrial, max_retry: int | None) -> None:
    """Optuna's RetryHeartbeatStaleTrialCallback: a WAITING copy of ``trial``'s parameters whose system
    attrs name it (``failed_trial``, ``retry_history``); nothing once ``max_retry`` retries are used up."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, trial)


class _RetryStaleTrial:
    """Queue a dead worker's parameters again, then run ``on_stale``."""

    def __init__(self, on_stale: StaleTrialHook | None):
        self._on_stale = on_stale

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        print(f"[sweep] trial {trial.number} lost its worker: marked FAIL, parameters queued again", flush=True)
        _queue_again(study, trial, MAX_RETRY)
        if self._on_stale is not None:
            self._on_stale(study, trial)


def create_study(storage: SweepStorage, study_name: str, directions: Sequence[str]) -> optuna.Study:
    """Create the study once (load it if it exists), under its lock."""
    with locked(storage.lock(study_name)):
        study = optuna.create_study(storage=storage.optuna, study_name=study_name, directions=list(directions),
                                    load_if_exists=True)
    expected = [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
                for d in directions]
    if study.directions != expected:
        got = ", ".join(d.name.lower() for d in study.directions)
        raise UserError(f"study {study_name!r} in {storage.display} optimises ({got}), not ({', '.join(directions)}); "
                        f"use the objective it was created with or another --study-name")
    return study


def register_worker(study: optuna.Study, storage: SweepStorage) -> int:
    """0 for the first worker of the study, 1 for the next, ... (restarts included)."""
    with locked(storage.lock(study.study_name)):
        index = int(study.user_attrs.get(WORKERS_STARTED_ATTR, 0))
        study.set_user_attr(WORKERS_STARTED_ATTR, index + 1)
    return index


def counts(trial: FrozenTrial) -> bool:
    """Whether ``trial`` uses up one of the study's N trials (see the module docstring)."""
    return (trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            or (trial.state == TrialState.FAIL and FAILURE_ATTR in trial.user_attrs))


def n_done(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count and are finished."""
    return sum(counts(t) and t.state != TrialState.RUNNING for t in trials)


def run_trials(study: optuna.Study, storage: SweepStorage, n_trials: int,
               suggest: Callable[[optuna.Trial], Any], evaluate: Callable[[optuna.Trial, Any], Any],
               catch: tuple[type[Exception], ...] = ()) -> int:
    """Run trials in this process until ``n_trials`` count and none is RUNNING; returns how many ran here.

    ``suggest(trial)`` samples the parameters (under the lock, so each sampler sees the others' choices),
    ``evaluate(trial, suggested)`` trains. A ``catch`` exception fails the trial with a verdict
    (it counts) and the worker goes on; any other exception ends the worker.
    """
    lock = storage.lock(study.study_name)
    ran = 0
    while True:
        lock.acquire()
        try:
            _fail_dead_trials(study, storage)
            trials = study.get_trials(deepcopy=False)
            full = sum(map(counts, trials)) >= n_trials
            if full and not any(t.state == TrialState.RUNNING for t in trials):
                return ran
            if not full:
                _run_one(study, lock, suggest, evaluate, catch)
                ran += 1
        finally:
            lock.release()
        if full:
            time.sleep(POLL_SECONDS)


def _run_one(study: optuna.Study, lock: Lock, suggest: Callable[[optuna.Trial], Any],
             evaluate: Callable[[optuna.Trial, Any], Any], catch: tuple[type[Exception], ...]) -> None:
    number: list[int] = []
    evaluating = False  # the lock is released and the parameters are complete

    def objective(trial: optuna.Trial) -> Any:
        nonlocal evaluating
        # Stamp the trial before anyone else may look at it: under the lock, a RUNNING trial without
        # a stamp can only belong to a worker that died right after asking.
        number.append(trial.number)
        trial.set_user_attr(WORKER_ATTR, _identity())
        suggested = suggest(trial)
        lock.release()
        evaluating = True
        try:
            return evaluate(trial, suggested)
        except catch as e:
            trial.set_user_attr(FAILURE_ATTR, f"{type(e).__name__}: {e}")
            raise

    try:
        # study.optimize rather than ask/tell: it runs Optuna's heartbeat thread during the trial.
        study.optimize(objective, n_trials=1, catch=catch)
    except BaseException as e:
        if number:
            if evaluating:  # fail and re-queue under the lock, so no worker counts in between
                lock.acquire()
            # Optuna fails the trial on an Exception or KeyboardInterrupt but not on other BaseExceptions
            # (the harness's SIGTERM Interrupted): fail it here rather than leave it RUNNING.
            failed = study.tell(number[0], state=TrialState.FAIL, skip_if_finished=True)
            # An interrupt (a BaseException that is no Exception) says nothing about the point: queue it
            # again, without a retry limit since the user, not the point, stopped it.
            if evaluating and not isinstance(e, Exception) and failed.state == TrialState.FAIL:
                _queue_again(study, failed, max_retry=None)
                print(f"[sweep] trial {failed.number} interrupted: marked FAIL, parameters queued again for the "
                      f"next run", flush=True)
        raise


def _identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _alive(worker: dict[str, Any]) -> bool:
    try:
        proc = psutil.Process(worker["pid"])
        # A killed worker not yet reaped by its parent is a zombie; a reused pid has another start time.
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - worker["started"]) < 1.0
    except psutil.NoSuchProcess:
        return False


def _fail_dead_trials(study: optuna.Study, storage: SweepStorage) -> None:
    """Fail (and queue again) RUNNING trials whose worker is gone. Called with the study's lock held.

    PostgreSQL: Optuna's heartbeat, for workers on any host. Journal: the trial's process is gone
    from this host. Both: the trial is unstamped (its worker died between asking and stamping, which
    happen under this lock, so possibly before a first heartbeat that would then never come).
    """
    if storage.postgres:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if worker is None or (not storage.postgres and worker["host"] == host and not _alive(worker)):
            failed = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            storage.stale_callback(study, failed)


def claim(study: optuna.Study, storage: SweepStorage, key: str, token: Any,
          covers: Callable[[Any, Any], bool] = operator.eq) -> bool:
    """Let one process act on ``token`` under ``key`` (e.g. log the report of a study of n trials): False
    while a claim whose token covers ours (``covers(held, token)``) is done, or held by another process
    that may be alive (one gone from this host has given up); True, and the claim is ours, otherwise."""
    me = _identity()
    with locked(storage.lock(study.study_name)):
        held = study.user_attrs.get(key)
        if held is not None and covers(held["token"], token) and (
                held["done"] or (held["worker"] != me and _maybe_alive(held["worker"]))):
            return False
        study.set_user_attr(key, {"token": token, "worker": me, "done": False})
        return True


def release_claim(study: optuna.Study, storage: SweepStorage, key: str, token: Any, done: bool) -> None:
    """``done``: the work is finished for good; otherwise the next caller of claim() gets it. A claim that
    another process took over meanwhile (with a token ours did not cover) is left to it."""
    with locked(storage.lock(study.study_name)):
        held = study.user_attrs.get(key)
        if held is not None and held["worker"] == _identity() and held["token"] == token:
            study.set_user_attr(key, {**held, "done": True} if done else None)


def _maybe_alive(worker: dict[str, Any]) -> bool:
    return worker["host"] != socket.gethostname() or _alive(worker)
