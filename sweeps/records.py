"""What a study records about itself: the settings its trials must share (a study user attr, checked by
every later process) and its one MLflow parent run, under which every trial and retrain run is a child;
and the MLflow run that a dead worker left RUNNING, closed when its trial is failed and retried."""
from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from experiments import names
from experiments.data import DatasetBundle
from experiments.errors import UserError
from experiments.tracking import TrackingStore
from sweeps.settings import SweepSettings, make_pruner, make_sampler
from sweeps.study import SweepStorage, create_study, locked, n_done, open_storage

CONFIG_ATTR = "cnn_zoo.config"  # study: what its trials must share (objective, space, recipe, data, ...)
MLFLOW_ATTR = "cnn_zoo.mlflow"  # study: the parent run shared by all workers
RUN_ATTR = "cnn_zoo.mlflow_run_id"  # trial: its MLflow child run


def open_study(s: SweepSettings) -> tuple[SweepStorage, optuna.Study]:
    """The study's storage (whose dead-worker hook closes the dead worker's MLflow run) and the study."""
    storage = open_storage(s.storage, s.heartbeat, on_stale=partial(close_dead_worker_run, s.tracking_store()))
    return storage, create_study(storage, s.study_name, s.directions)


def study_config(s: SweepSettings, data: DatasetBundle) -> dict[str, Any]:
    """What every trial of the study must share, so that their accuracies compare."""
    recipe = s.run.recipe
    return {"objective": s.objective, "space": s.space.to_dict(), "max_params": s.max_params,
            "recipe": f"{recipe.name} ({recipe.hash()})", "dataset": s.run.dataset, "data_digest": data.digest,
            "seed": s.run.seed}


def prepare_study(s: SweepSettings, storage: SweepStorage, study: optuna.Study, data: DatasetBundle) -> str | None:
    """Record (or check) the study's config and create (or reuse) its MLflow parent run; returns the run id."""
    config = study_config(s, data)
    with locked(storage.lock(s.study_name)):
        saved = study.user_attrs.get(CONFIG_ATTR)
        if saved is None:
            _record_new_study(s, study, config)
        else:
            for key, value in config.items():
                if saved.get(key) != value:
                    raise UserError(f"study {s.study_name!r} in {storage.display} was run with {key} {saved.get(key)!r}, "
                                    f"not {value!r}; resume it with its settings or choose another --study-name")
        store = s.tracking_store()
        return open_parent_run(s, store, storage, study, config) if store is not None else None


def _record_new_study(s: SweepSettings, study: optuna.Study, config: dict[str, Any]) -> None:
    study.set_user_attr(CONFIG_ATTR, config)
    default = s.space.default_params()
    if default is not None:  # e.g. the paper's DenseNet-BC, trained first as every study's reference point
        study.enqueue_trial(default)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        metrics = [names.VAL_ACC, names.PARAM_COUNT] if s.multi else [names.VAL_ACC]
        study.set_metric_names(metrics)  # for the dashboard


def parent_run_id(study: optuna.Study) -> str | None:
    return study.user_attrs.get(MLFLOW_ATTR, {}).get("run_id")


def open_parent_run(s: SweepSettings, store: TrackingStore, storage: SweepStorage, study: optuna.Study,
                    config: dict[str, Any]) -> str:
    """The study's one MLflow parent run: created by the first process, reused by every later one (and
    RUNNING again when a finished study is extended with more trials)."""
    saved = study.user_attrs.get(MLFLOW_ATTR)
    if saved is None:
        return _create_parent_run(s, store, storage, study, config)
    state = store.run_state(saved["run_id"])
    if state is None:
        raise UserError(f"study {s.study_name!r} logs to MLflow run {saved['run_id']} in {saved['tracking_uri']}, "
                        f"which {s.tracking_uri} does not hold; pass --tracking-uri {saved['tracking_uri']}")
    if state.deleted:
        raise UserError(f"the MLflow parent run {saved['run_id']} of study {s.study_name!r} is deleted; restore it "
                        f"or choose another --study-name")
    if saved["experiment"] != s.experiment:  # its child runs would land in another experiment
        raise UserError(f"study {s.study_name!r} logs to MLflow experiment {saved['experiment']!r}; "
                        f"pass --experiment {saved['experiment']}")
    if state.status != "RUNNING" and n_done(study.get_trials(deepcopy=False)) < s.trials:
        store.reopen(saved["run_id"])
    return saved["run_id"]


def _create_parent_run(s: SweepSettings, store: TrackingStore, storage: SweepStorage, study: optuna.Study,
                       config: dict[str, Any]) -> str:
    params = {"study_name": s.study_name, "storage": storage.display, "objective": s.objective,
              "sampler": type(make_sampler(s, s.run.seed)).__name__, "pruner": type(make_pruner(s)).__name__,
              **{f"space.{k}": v for k, v in s.space.to_dict().items()},
              **{k: v for k, v in config.items() if k not in ("objective", "space")}}
    tags = {names.KIND: names.KIND_SWEEP, names.STUDY_NAME: s.study_name, names.ARCH: s.run.arch}
    run_id = store.create_run(s.study_name, tags, params)
    study.set_user_attr(MLFLOW_ATTR, {"run_id": run_id, "tracking_uri": s.tracking_uri, "experiment": s.experiment})
    return run_id


def close_dead_worker_run(store: TrackingStore | None, study: optuna.Study, trial: FrozenTrial) -> None:
    """End the MLflow run of a trial whose worker died (it would stay RUNNING forever)."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    if store is not None and run_id is not None:
        store.end_if_running(run_id, "FAILED", {names.TRIAL_STATE: TrialState.FAIL.name,
                                                names.FAILURE: "worker died; the trial was retried"})
