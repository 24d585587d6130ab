"""A trial is one experiments.fit() run of the suggested model, recorded as an MLflow child run of the
study's parent run: scored on validation accuracy (and, under pareto, its parameter count), reported to
Optuna's pruner every epoch, or rejected untrained when it has more than --max-params parameters. The best
trial(s) are retrained here too, on train+val, the only runs that see the test set."""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

import zoo
from experiments import names
from experiments.config import apply_overrides
from experiments.data import DatasetBundle
from experiments.fit import FitOptions, FitResult, fit
from experiments.tracking import MlflowTracker, Tracker
from sweeps.records import RUN_ATTR
from sweeps.settings import SweepSettings, hp_text

# Optuna user attrs of a trial (study.py adds cnn_zoo.worker / cnn_zoo.failure, records.py the run id).
PARAMS_ATTR = names.PARAM_COUNT  # parameter count of its model
REJECTED_ATTR = names.REJECTED  # why it was not trained (over --max-params); also its run's tag


class TrialTracker(MlflowTracker):
    """Puts the run id on the Optuna trial as soon as fit() starts the run, so that the run of a
    worker that dies mid-trial can be found and closed."""

    trial: optuna.Trial

    def start(self, **kwargs: Any) -> str:
        run_id = super().start(**kwargs)
        self.trial.set_user_attr(RUN_ATTR, run_id)
        return run_id


class TrialRunner:
    """One worker's suggest() and evaluate() for sweeps.study.run_trials."""

    def __init__(self, s: SweepSettings, data: DatasetBundle, parent_run_id: str | None):
        self.s = s
        self.data = data
        self.parent_run_id = parent_run_id
        self.tracker = TrialTracker(s.tracking_uri, s.experiment) if s.tracking_uri else None
        self.store = s.tracking_store()

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return self.s.space.suggest(trial)

    def evaluate(self, trial: optuna.Trial, hp: dict[str, Any]) -> float | tuple[float, float]:
        """Train the point (or reject it untrained); Optuna's objective value(s)."""
        n_params = zoo.variant_info(self.s.run.arch, self.data.num_classes, **hp)["params"]
        trial.set_user_attr(PARAMS_ATTR, n_params)
        tags = {names.KIND: names.KIND_TRIAL, names.STUDY_NAME: self.s.study_name,
                names.TRIAL_NUMBER: str(trial.number)}
        retry_of = _retried_trial(trial)
        if retry_of is not None:
            tags[names.RETRY_OF] = str(retry_of)
        if self.s.max_params is not None and self._reject_over_budget(trial, hp, n_params, tags):
            return self._values(0.0, n_params)  # infeasible: never best, never on the front
        print(f"[sweep] trial {trial.number} {hp_text(self.s.space, hp)}: {n_params:,} parameters", flush=True)
        result = self._train(trial, hp, tags)
        return self._values(result.summary[names.BEST_VAL_ACC], n_params)

    def _reject_over_budget(self, trial: optuna.Trial, hp: dict[str, Any], n_params: int,
                            tags: dict[str, str]) -> bool:
        """Give the trial its --max-params constraint; True (and a record of it) when the point exceeds it."""
        budget = self.s.max_params
        if "max_params" not in trial.constraints:  # a retried trial inherits its constraint
            trial.set_constraint("max_params", n_params - budget)
        if n_params <= budget:
            return False
        reason = f"{n_params:,} parameters > --max-params {budget:,}"
        trial.set_user_attr(REJECTED_ATTR, reason)
        print(f"[sweep] trial {trial.number} {hp_text(self.s.space, hp)}: rejected, {reason}", flush=True)
        if self.store is not None:
            self._record_rejected_run(trial, hp, n_params, tags | {REJECTED_ATTR: reason})
        return True

    def _record_rejected_run(self, trial: optuna.Trial, hp: dict[str, Any], n_params: int,
                             tags: dict[str, str]) -> None:
        """A child run for a point rejected before training: its hyperparameters and size, ended KILLED (never
        trained), so that MLflow holds one run per trial; the analysis counts only FINISHED or PRUNED trials."""
        params = {names.ARCH: self.s.run.arch, **{f"{names.MODEL_PARAM_PREFIX}{k}": v for k, v in hp.items()}}
        run_id = self.store.create_run(f"{self.s.study_name}-trial-{trial.number}",
                                       tags | {names.TRIAL_STATE: TrialState.COMPLETE.name}, params,
                                       metrics={names.PARAM_COUNT: n_params}, parent_run_id=self.parent_run_id)
        self.store.end_run(run_id, "KILLED")
        trial.set_user_attr(RUN_ATTR, run_id)

    def _train(self, trial: optuna.Trial, hp: dict[str, Any], tags: dict[str, str]) -> FitResult:
        """fit() the point as a child run whose optuna.state tag follows the trial; prune when told to."""
        options = FitOptions(evaluate_test=False, log_model=False, log_checkpoints=False, progress=False,
                             run_name=f"{self.s.study_name}-trial-{trial.number}", tags=tags,
                             parent_run_id=self.parent_run_id)
        tracker: Tracker = Tracker()
        if self.tracker is not None:
            # No run yet: a fit() that fails before starting one must not tag the previous trial's run.
            self.tracker.trial, self.tracker.run_id = trial, None
            tracker = self.tracker
        # Multi-objective trials cannot report intermediate values (nor be pruned).
        callbacks = [] if self.s.multi else [partial(_report_val_acc_or_prune, trial)]
        try:
            result = fit(dataclasses.replace(self.s.run, model=hp), tracker, callbacks, options, data=self.data)
        except BaseException:
            # Optuna's state. An interrupted (SIGTERM, Ctrl-C) trial's run still ends KILLED, fit()'s status
            # for an interruption: its trial is FAIL and its parameters are queued again (sweeps.study).
            self._tag_state(tracker, TrialState.FAIL)
            raise
        if result.stopped_early:
            self._tag_state(tracker, TrialState.PRUNED)
            raise optuna.TrialPruned(f"val acc {result.history[-1][names.VAL_ACC]:.2f}% at epoch {len(result.history)}")
        self._tag_state(tracker, TrialState.COMPLETE)
        return result

    def _values(self, val_acc: float, n_params: int) -> float | tuple[float, float]:
        return (val_acc, float(n_params)) if self.s.multi else val_acc

    def _tag_state(self, tracker: Tracker, state: TrialState) -> None:
        """The trial's state on its run, which fit() has ended by now."""
        if self.store is not None and tracker.run_id is not None:
            self.store.set_tags(tracker.run_id, {names.TRIAL_STATE: state.name})


def _report_val_acc_or_prune(trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> bool:
    """fit()'s epoch callback: report val acc to Optuna; True (stop) when the pruner says so."""
    if names.VAL_ACC not in metrics:  # an epoch without evaluation (recipe eval_every > 1)
        return False
    trial.report(metrics[names.VAL_ACC], epoch)
    return trial.should_prune()


def _retried_trial(trial: optuna.Trial) -> int | None:
    """The number of the failed trial whose parameters this one trains again (the ``failed_trial`` system
    attr of RetryHeartbeatStaleTrialCallback), or None."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return frozen.system_attrs.get("failed_trial")


def retrain(s: SweepSettings, trials: list[FrozenTrial], data: DatasetBundle,
            parent_run_id: str | None) -> dict[int, float]:
    """Retrain ``trials`` on train+val (val_size 0) and evaluate on the test set; {trial number: test acc}."""
    recipe = apply_overrides(s.run.recipe, {"val_size": 0})
    store = s.tracking_store()
    if parent_run_id is not None and store is not None:
        state = store.run_state(parent_run_id)
        if state is None or state.status != "RUNNING":  # reported before without --retrain-best
            store.reopen(parent_run_id)
    results = {}
    for t in trials:
        hp = s.space.model_kwargs(t.params)
        tags = {names.KIND: names.KIND_RETRAIN, names.STUDY_NAME: s.study_name, names.TRIAL_NUMBER: str(t.number)}
        tracker = MlflowTracker(s.tracking_uri, s.experiment) if s.tracking_uri else Tracker()
        print(f"[sweep] retraining trial {t.number} {hp_text(s.space, hp)} on the full training set", flush=True)
        options = FitOptions(evaluate_test=True, progress=False, tags=tags, parent_run_id=parent_run_id,
                             run_name=f"{s.study_name}-retrain-trial-{t.number}")
        result = fit(dataclasses.replace(s.run, recipe=recipe, model=hp), tracker, options=options, data=data)
        results[t.number] = result.summary[names.FINAL_TEST_ACC]
    return results
