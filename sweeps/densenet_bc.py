"""Tune DenseNet-BC's growth rate k and compression θ with Optuna; each trial is one experiments.fit() run.

    python sweeps/densenet_bc.py --trials 40                     # max val acc: TPE + median pruner
    python sweeps/densenet_bc.py --objective pareto --max-params 1e6 --workers 2
    python sweeps/densenet_bc.py --storage postgresql://USER@HOST:5432/DB --study-name dbc   # on every machine

--trials is the study's total across all workers, machines and restarts: rerunning the same command
resumes the study (a trial cut short by a dead or interrupted worker is retried). Trials see validation
accuracy only; --retrain-best retrains the winner(s) on train+val and reports test accuracy. Watch a
study live with `optuna-dashboard optuna.journal` (or with the postgresql:// URL).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python sweeps/densenet_bc.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna
import torch
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

import zoo
from experiments.config import MAX_SEED, Recipe, RunConfig, apply_overrides, list_recipes, load_recipe, parse_key_value
from experiments.data import NUM_CLASSES, DatasetBundle, load_dataset
from experiments.errors import UserError
from experiments.tracking import DEFAULT_EXPERIMENT, MlflowTracker, Tracker, default_tracking_uri, init_store
from experiments.train import FitOptions, Interrupted, NonFiniteLoss, fit
from sweeps.space import DEFAULT_SPACE, SearchSpace, load_space
from sweeps.study import (SweepStorage, claim, create_study, locked, n_done, open_storage, register_worker,
                          release_claim, run_trials)

ARCH = "densenet_bc"
# Optuna user attrs written here (study.py adds cnn_zoo.worker / cnn_zoo.failure to trials).
PARAMS_ATTR = "param_count"  # trial: parameter count of its model
REJECTED_ATTR = "cnn_zoo.rejected"  # trial: why it was not trained (over --max-params)
RUN_ATTR = "cnn_zoo.mlflow_run_id"  # trial: its MLflow child run
CONFIG_ATTR = "cnn_zoo.config"  # study: what its trials must share (objective, space, recipe, data, ...)
MLFLOW_ATTR = "cnn_zoo.mlflow"  # study: the parent run shared by all workers
REPORT_CLAIM = "cnn_zoo.report"  # study: who retrains (--retrain-best), logs the results and ends the parent run
TOP_TRIALS = 5  # rows of the val_acc table


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    """A positive whole number, also written 1e6 or 1_000_000."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of parameters such as 1e6, got {text!r}") from None
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number of parameters, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="densenet_bc.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=_positive_int, default=20,
                   help="trials in the study, across all workers and restarts (default 20)")
    g.add_argument("--objective", choices=["val_acc", "pareto"], default="val_acc",
                   help="val_acc: maximise validation accuracy, pruning poor trials; pareto: maximise validation "
                        "accuracy and minimise parameters, every trial trained to the end (default val_acc)")
    g.add_argument("--pruner", choices=["median", "hyperband", "none"],
                   help="val_acc only (default median): stop trials whose per-epoch val acc lags earlier trials'. "
                        "Not with --objective pareto: Optuna cannot prune multi-objective studies")
    g.add_argument("--sampler", choices=["tpe", "nsga2", "random"], default="tpe",
                   help="tpe (multi-objective TPE under pareto), nsga2 or random (default tpe)")
    g.add_argument("--max-params", type=_count, metavar="N",
                   help="reject points with more than N parameters before training them (an Optuna constraint; "
                        "they count as trials), e.g. 1e6")
    g.add_argument("--space", default=str(DEFAULT_SPACE), metavar="PATH.yaml",
                   help="search space (default sweeps/spaces/densenet_bc.yaml)")
    g.add_argument("--retrain-best", action="store_true",
                   help="after the search retrain the best trial (pareto: each Pareto-optimal trial) on the full "
                        "training set (val_size 0) and report its test accuracy")
    g = p.add_argument_group("recipe and data")
    g.add_argument("--recipe", default="fast", help=f"preset ({', '.join(list_recipes())}) or a .yaml path (default fast)")
    g.add_argument("--epochs", type=_positive_int)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any recipe field, e.g. val_size=5000 (repeatable)")
    g.add_argument("--dataset", choices=sorted(NUM_CLASSES), default="cifar10")
    g.add_argument("--data-dir", default="./data", help="official CIFAR folders, an image-folder tree or an archive")
    g.add_argument("--subset", type=_positive_int, help="train every trial on the class-balanced first N training images")
    g.add_argument("--seed", type=int, default=0, help="training seed of every trial; sampler seeds derive from it")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--output-dir", default="./outputs", help="checkpoints go to OUTPUT_DIR/checkpoints/RUN_ID/")
    g = p.add_argument_group("study storage and workers")
    g.add_argument("--storage", default="optuna.journal",
                   help="journal file for processes on one machine (default optuna.journal), or "
                        "postgresql://USER[:PASSWORD]@HOST:PORT/DB for workers on many machines")
    g.add_argument("--study-name", help="default densenet_bc-DATASET-OBJECTIVE; an existing study is resumed")
    g.add_argument("--workers", type=_positive_int, default=1, help="worker processes on this machine (default 1)")
    g.add_argument("--heartbeat", type=_positive_int, default=30, metavar="SECONDS",
                   help="PostgreSQL: trial heartbeat; a trial silent for 3x this is failed and retried (default 30)")
    g = p.add_argument_group("tracking")
    g.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    g.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    g.add_argument("--no-tracking", action="store_true",
                   help="no MLflow runs; the plots go to OUTPUT_DIR/sweeps/STUDY/")
    return p


# ----------------------------------------------------------------------------------------------
# Settings shared by the main process and its workers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    args: argparse.Namespace
    recipe: Recipe
    space: SearchSpace
    study_name: str
    tracking_uri: str | None  # None: --no-tracking

    @property
    def multi(self) -> bool:
        return self.args.objective == "pareto"

    @property
    def directions(self) -> list[str]:
        return ["maximize", "minimize"] if self.multi else ["maximize"]


def resolve(args: argparse.Namespace) -> Settings:
    """Check every flag and file before any data, storage or training is touched."""
    if not 0 <= args.seed < MAX_SEED:
        raise UserError(f"--seed must be an integer in [0, 2**32), got {args.seed}")
    if args.objective == "pareto" and args.pruner not in (None, "none"):
        raise UserError(f"--pruner {args.pruner}: Optuna cannot prune multi-objective studies; "
                        f"drop --pruner with --objective pareto")
    overrides: dict[str, Any] = {"subset": args.subset} if args.subset is not None else {}
    if args.epochs is not None:
        overrides |= {"epochs": args.epochs, "max_steps": None}
    overrides |= dict(parse_key_value(s, "--set") for s in args.set)
    recipe = load_recipe(args.recipe)
    recipe = apply_overrides(recipe, overrides) if overrides else recipe
    if recipe.val_size < 1:
        raise UserError(f"recipe {recipe.name}: val_size is 0 but trials are scored on validation images; "
                        f"--set val_size=N (N >= 1)")
    space = load_space(args.space)
    if args.max_params is not None:
        smallest = param_count({"depth": min(space.depths), "growth_rate": space.growth_rate[0],
                                "compression": space.compression[0]}, NUM_CLASSES[args.dataset])
        if smallest > args.max_params:
            raise UserError(f"--max-params {args.max_params:,} rejects the whole search space: its smallest model "
                            f"has {smallest:,} parameters")
    return Settings(args=args, recipe=recipe, space=space,
                    study_name=args.study_name or f"{ARCH}-{args.dataset}-{args.objective}",
                    tracking_uri=None if args.no_tracking else (args.tracking_uri or default_tracking_uri()))


def param_count(hp: dict[str, Any], num_classes: int) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return zoo.count_params(zoo.create_model(ARCH, num_classes=num_classes, **hp))


def make_sampler(s: Settings, seed: int) -> optuna.samplers.BaseSampler:
    if s.args.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.args.sampler == "nsga2":
        # Optuna's default population of 50 would leave a sweep of a few dozen trials pure random search.
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, s.args.trials // 4)))
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(s: Settings) -> optuna.pruners.BasePruner:
    if s.multi or s.args.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.args.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=s.recipe.epochs, reduction_factor=3)
    # The first quarter of a schedule (warm-up, high lr) says little about the final accuracy.
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=s.recipe.epochs // 4)


def describe(obj: object) -> str:
    return type(obj).__name__


def open_sweep(s: Settings) -> tuple[SweepStorage, optuna.Study]:
    storage = open_storage(s.args.storage, s.args.heartbeat, on_stale=partial(close_dead_run, s.tracking_uri))
    return storage, create_study(storage, s.study_name, s.directions)


def study_config(s: Settings, data: DatasetBundle) -> dict[str, Any]:
    """What every trial of the study must share, so that their accuracies compare."""
    return {"objective": s.args.objective, "space": s.space.to_dict(), "max_params": s.args.max_params,
            "recipe": f"{s.recipe.name} ({s.recipe.hash()})", "dataset": s.args.dataset, "data_digest": data.digest,
            "seed": s.args.seed}


def prepare_study(s: Settings, storage: SweepStorage, study: optuna.Study, data: DatasetBundle) -> str | None:
    """Record (or check) the study's config and create (or reuse) its MLflow parent run; returns the run id."""
    config = study_config(s, data)
    with locked(storage.lock(s.study_name)):
        saved = study.user_attrs.get(CONFIG_ATTR)
        if saved is None:
            study.set_user_attr(CONFIG_ATTR, config)
            default = s.space.default_params()
            if default is not None:  # the paper's DenseNet-BC, trained first as every study's reference point
                study.enqueue_trial(default)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                study.set_metric_names(["val_acc", PARAMS_ATTR] if s.multi else ["val_acc"])  # for the dashboard
        else:
            for key, value in config.items():
                if saved.get(key) != value:
                    raise UserError(f"study {s.study_name!r} in {storage.display} was run with {key} {saved.get(key)!r}, "
                                    f"not {value!r}; resume it with its settings or choose another --study-name")
        return parent_run(s, storage, study, config) if s.tracking_uri else None


def parent_run(s: Settings, storage: SweepStorage, study: optuna.Study, config: dict[str, Any]) -> str:
    """The study's one MLflow parent run: created by the first process, reused by every later one."""
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    client = MlflowClient(s.tracking_uri)
    saved = study.user_attrs.get(MLFLOW_ATTR)
    if saved is not None:
        try:
            run = client.get_run(saved["run_id"])
        except MlflowException:
            raise UserError(f"study {s.study_name!r} logs to MLflow run {saved['run_id']} in {saved['tracking_uri']}, "
                            f"which {s.tracking_uri} does not hold; pass --tracking-uri {saved['tracking_uri']}") from None
        if run.info.lifecycle_stage == "deleted":
            raise UserError(f"the MLflow parent run {run.info.run_id} of study {s.study_name!r} is deleted; restore it "
                            f"or choose another --study-name")
        if saved["experiment"] != s.args.experiment:  # its child runs would land in another experiment
            raise UserError(f"study {s.study_name!r} logs to MLflow experiment {saved['experiment']!r}; "
                            f"pass --experiment {saved['experiment']}")
        if run.info.status != "RUNNING" and n_done(study.get_trials(deepcopy=False)) < s.args.trials:
            client.update_run(run.info.run_id, status="RUNNING")  # a finished study extended with more trials
        return run.info.run_id
    experiment_id = init_store(s.tracking_uri, s.args.experiment)
    run = client.create_run(experiment_id, run_name=s.study_name,
                            tags={"cnn_zoo.kind": "sweep", "optuna.study_name": s.study_name, "arch": ARCH})
    space = s.space.to_dict()
    params = {"study_name": s.study_name, "storage": storage.display, "objective": s.args.objective,
              "sampler": describe(make_sampler(s, s.args.seed)), "pruner": describe(make_pruner(s)),
              "space.growth_rate": space["growth_rate"], "space.compression": space["compression"],
              "space.depths": space["depths"], **{k: v for k, v in config.items() if k not in ("objective", "space")}}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    study.set_user_attr(MLFLOW_ATTR, {"run_id": run.info.run_id, "tracking_uri": s.tracking_uri,
                                      "experiment": s.args.experiment})
    return run.info.run_id


def close_dead_run(tracking_uri: str | None, study: optuna.Study, trial: FrozenTrial) -> None:
    """End the MLflow run of a trial whose worker died (it would stay RUNNING forever)."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    if tracking_uri is None or run_id is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "optuna.state", TrialState.FAIL.name)
        client.set_tag(run_id, "failure", "worker died; the trial was retried")
        client.set_terminated(run_id, "FAILED")


# ----------------------------------------------------------------------------------------------
# Trials
# ----------------------------------------------------------------------------------------------

class _TrialTracker(MlflowTracker):
    """Puts the run id on the Optuna trial as soon as fit() starts the run, so that the run of a
    worker that dies mid-trial can be found and closed."""

    trial: optuna.Trial

    def start(self, **kwargs: Any) -> str:
        run_id = super().start(**kwargs)
        self.trial.set_user_attr(RUN_ATTR, run_id)
        return run_id


class TrialRunner:
    """One worker's suggest() and evaluate(): the model, its fit() run and its MLflow child run."""

    def __init__(self, s: Settings, data: DatasetBundle, parent_run_id: str | None):
        self.s = s
        self.data = data
        self.parent_run_id = parent_run_id
        self.tracker = _TrialTracker(s.tracking_uri, s.args.experiment) if s.tracking_uri else None

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return self.s.space.suggest(trial)

    def evaluate(self, trial: optuna.Trial, hp: dict[str, Any]) -> float | tuple[float, float]:
        args = self.s.args
        n_params = param_count(hp, self.data.num_classes)
        trial.set_user_attr(PARAMS_ATTR, n_params)
        tags = {"cnn_zoo.kind": "trial", "optuna.study_name": self.s.study_name, "optuna.trial_number": str(trial.number)}
        retry_of = _frozen(trial).system_attrs.get("failed_trial")  # set by RetryHeartbeatStaleTrialCallback
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        if args.max_params is not None:
            if "max_params" not in trial.constraints:  # a retried trial inherits its constraint
                trial.set_constraint("max_params", n_params - args.max_params)
            if n_params > args.max_params:
                reason = f"{n_params:,} parameters > --max-params {args.max_params:,}"
                trial.set_user_attr(REJECTED_ATTR, reason)
                print(f"[sweep] trial {trial.number} {_hp_text(hp)}: rejected, {reason}", flush=True)
                self._record_rejected(trial, hp, n_params, tags | {REJECTED_ATTR: reason})
                return self._values(0.0, n_params)  # infeasible: never best, never on the front
        cfg = RunConfig(arch=ARCH, recipe=self.s.recipe, model=hp, dataset=args.dataset, data_dir=args.data_dir,
                        seed=args.seed, device=args.device, output_dir=args.output_dir)
        options = FitOptions(evaluate_test=False, log_model=False, log_checkpoints=False, progress=False,
                             run_name=f"{self.s.study_name}-trial-{trial.number}", tags=tags,
                             parent_run_id=self.parent_run_id)
        tracker: Tracker = Tracker()
        if self.tracker is not None:
            self.tracker.trial = trial
            tracker = self.tracker
        # Multi-objective trials cannot report intermediate values (nor be pruned).
        callbacks = [] if self.s.multi else [partial(_report, trial)]
        print(f"[sweep] trial {trial.number} {_hp_text(hp)}: {n_params:,} parameters", flush=True)
        try:
            result = fit(cfg, tracker, callbacks, options, data=self.data)
        except BaseException:
            # Optuna's state. An interrupted (SIGTERM, Ctrl-C) trial's run still ends KILLED, fit()'s status
            # for an interruption: its trial is FAIL and its parameters are queued again (sweeps.study).
            self._tag_state(tracker, TrialState.FAIL)
            raise
        if result.stopped_early:
            self._tag_state(tracker, TrialState.PRUNED)
            raise optuna.TrialPruned(f"val acc {result.history[-1]['val_acc']:.2f}% at epoch {len(result.history)}")
        self._tag_state(tracker, TrialState.COMPLETE)
        return self._values(result.summary["best_val_acc"], n_params)

    def _record_rejected(self, trial: optuna.Trial, hp: dict[str, Any], n_params: int, tags: dict[str, str]) -> None:
        """A child run for a point rejected before training: its k, θ and size, ended KILLED (never trained),
        so that MLflow holds one run per trial; the analysis counts only FINISHED or PRUNED trials."""
        if self.tracker is None:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        client = MlflowClient(self.s.tracking_uri)
        tags = tags | {"optuna.state": TrialState.COMPLETE.name}
        if self.parent_run_id is not None:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = client.create_run(self.tracker.experiment_id, run_name=f"{self.s.study_name}-trial-{trial.number}",
                                tags=tags)
        client.log_batch(run.info.run_id, params=[Param("arch", ARCH)] + [Param(f"model.{k}", str(v)) for k, v in hp.items()],
                         metrics=[Metric(PARAMS_ATTR, n_params, int(time.time() * 1000), 0)])
        client.set_terminated(run.info.run_id, "KILLED")
        trial.set_user_attr(RUN_ATTR, run.info.run_id)

    def _values(self, val_acc: float, n_params: int) -> float | tuple[float, float]:
        return (val_acc, float(n_params)) if self.s.multi else val_acc

    def _tag_state(self, tracker: Tracker, state: TrialState) -> None:
        if self.s.tracking_uri and tracker.run_id is not None:
            from mlflow import MlflowClient

            MlflowClient(self.s.tracking_uri).set_tag(tracker.run_id, "optuna.state", state.name)


def _report(trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> bool:
    """fit()'s epoch callback: report val acc to Optuna; True (stop) when the pruner says so."""
    if "val_acc" not in metrics:  # an epoch without evaluation (recipe eval_every > 1)
        return False
    trial.report(metrics["val_acc"], epoch)
    return trial.should_prune()


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def _hp_text(hp: dict[str, Any]) -> str:
    return f"(depth {hp['depth']}, k {hp['growth_rate']}, θ {hp['compression']:.3f})"


def work(s: Settings, storage: SweepStorage, study: optuna.Study, data: DatasetBundle) -> int:
    """Run this process's share of the study's trials; returns how many it ran."""
    index = register_worker(study, storage)
    # A seed per worker: workers with one seed would all propose the same random start-up points.
    study.sampler = make_sampler(s, s.args.seed + index)
    study.pruner = make_pruner(s)
    parent_run_id = study.user_attrs.get(MLFLOW_ATTR, {}).get("run_id") if s.tracking_uri else None
    runner = TrialRunner(s, data, parent_run_id)
    # A diverged or out-of-memory trial is a verdict on its point: it counts, and the worker goes on.
    return run_trials(study, storage, s.args.trials, runner.suggest, runner.evaluate,
                      catch=(NonFiniteLoss, torch.OutOfMemoryError))


def _worker_main(args: argparse.Namespace, threads: int) -> None:
    """Entry point of a --workers process (spawned: a fresh interpreter, no inherited CUDA or locks)."""
    torch.set_num_threads(threads)
    try:
        s = resolve(args)
        data = load_dataset(args.dataset, args.data_dir)
        storage, study = open_sweep(s)
        work(s, storage, study, data)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        sys.exit(130)


def run_workers(args: argparse.Namespace) -> list[int]:
    """Start --workers processes and wait for them; returns their exit codes."""
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // args.workers)  # no oversubscription of the cores
    procs = [ctx.Process(target=_worker_main, args=(args, threads), name=f"sweep-worker-{i}") for i in range(args.workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # the workers got the same SIGINT: let them end their trials cleanly
        for p in procs:
            p.join()
        raise
    return [p.exitcode for p in procs]


def worker_failures(codes: list[int], complete: bool) -> str | None:
    """One line on the workers that ended badly (None if none did): a warning when the study still reached
    --trials (a dead worker's trial is failed and trained again by the others), an error otherwise."""
    bad = []
    for i, code in enumerate(codes):
        if code and code < 0:  # multiprocessing: -N means killed by signal N
            bad.append(f"worker {i} was killed by {signal.Signals(-code).name}"
                       + (" (as the kernel's out-of-memory killer does: see dmesg; fewer --workers need less memory)"
                          if -code == signal.SIGKILL else ""))
        elif code:
            bad.append(f"worker {i} exited with code {code}")
    if not bad:
        return None
    if complete:
        return f"warning: {'; '.join(bad)}; the other workers completed the study"
    return f"error: {'; '.join(bad)}; rerun the same command to resume the study"


# ----------------------------------------------------------------------------------------------
# Results: table, plots, retraining
# ----------------------------------------------------------------------------------------------

def best_trials(s: Settings, study: optuna.Study) -> list[FrozenTrial]:
    """The feasible best trial(s): the Pareto front sorted by size, or the top val_acc trials, best first."""
    if s.multi:
        return sorted(study.best_trials, key=lambda t: t.values[1])
    feasible = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if all(c <= 0 for c in t.constraints.values())]
    return sorted(feasible, key=lambda t: -t.value)[:TOP_TRIALS]


def summary_line(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    rejected = sum(t.state == TrialState.COMPLETE and REJECTED_ATTR in t.user_attrs for t in trials)
    by_state = {state: sum(t.state == state for t in trials) for state in TrialState}
    parts = [f"{by_state[TrialState.COMPLETE] - rejected} complete", f"{by_state[TrialState.PRUNED]} pruned",
             f"{rejected} rejected (over --max-params)", f"{by_state[TrialState.FAIL]} failed"]
    parts += [f"{by_state[st]} {st.name.lower()}" for st in (TrialState.RUNNING, TrialState.WAITING) if by_state[st]]
    return f"study {study.study_name}: {len(trials)} trials: {', '.join(parts)}"


def trial_table(s: Settings, rows: list[FrozenTrial], test_acc: dict[int, float] | None = None) -> str:
    header = f"{'trial':>6} {'depth':>6} {'k':>4} {'θ':>6} {'params':>12} {'val acc':>9}"
    lines = [header + (f" {'test acc':>9}" if test_acc else "")]
    for t in rows:
        hp = s.space.model_kwargs(t.params)
        n_params = t.user_attrs.get(PARAMS_ATTR)  # absent from trials added by hand (study.add_trial)
        line = (f"{t.number:>6} {hp['depth']:>6} {hp['growth_rate']:>4} {hp['compression']:>6.3f} "
                f"{'?' if n_params is None else f'{n_params:,}':>12} {t.values[0]:>8.2f}%")
        if test_acc:
            line += f" {test_acc[t.number]:>8.2f}%" if t.number in test_acc else f" {'-':>9}"
        lines.append(line)
    return "\n".join(lines)


def results_text(s: Settings, study: optuna.Study, test_acc: dict[int, float] | None = None) -> str:
    rows = best_trials(s, study)
    title = "Pareto front (val acc vs parameters)" if s.multi else f"best trials by val acc (top {TOP_TRIALS})"
    body = trial_table(s, rows, test_acc) if rows else "no feasible finished trial yet"
    return f"{summary_line(study)}\n{title}:\n{body}"


def plots(s: Settings, study: optuna.Study) -> Iterator[tuple[str, Any]]:
    """(name, matplotlib figure) of the Optuna plots that the study's trials allow."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no browser, no kaleido
    from optuna.visualization import matplotlib as vis

    # Rejected points were never trained: their stand-in accuracy of 0 would paint the accuracy plots.
    trained = optuna.create_study(directions=study.directions, study_name=study.study_name)
    trained.add_trials([t for t in study.get_trials(deepcopy=False) if REJECTED_ATTR not in t.user_attrs])
    acc = (lambda t: t.values[0]) if s.multi else None
    # Optuna's default importance evaluator (PED-ANOVA) explains *low* values of an explicit target.
    low_is_good = (lambda t: -t.values[0]) if s.multi else None
    makers = {
        "optimization_history": lambda: vis.plot_optimization_history(trained, target=acc, target_name="val acc (%)"),
        "param_importances": lambda: vis.plot_param_importances(trained, target=low_is_good, target_name="val acc"),
        "contour_k_theta": lambda: vis.plot_contour(trained, params=["growth_rate", "compression"], target=acc,
                                                    target_name="val acc (%)"),
    }
    if s.multi:  # the whole study: rejected points show as infeasible
        makers["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=["val acc (%)", "parameters"])
    for name, make in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator computes the importances of params to "
                                              "achieve low")  # yes: low_is_good above
            try:
                ax = make()
            except (ValueError, RuntimeError) as e:  # e.g. too few finished trials for importances
                print(f"[sweep] no {name} plot: {e}", file=sys.stderr)
                continue
        first = ax.flat[0] if hasattr(ax, "flat") else ax
        yield name, first.figure


def report(s: Settings, study: optuna.Study, parent_run_id: str | None, n_trials: int,
           test_acc: dict[int, float] | None) -> None:
    """Plots and the results table (with the retrained trials' test accuracy) as artifacts of the parent
    run, which then ends FINISHED; ``n_trials``: the trials that count."""
    import matplotlib.pyplot as plt

    text = results_text(s, study, test_acc)
    if parent_run_id is None:
        folder = Path(s.args.output_dir) / "sweeps" / s.study_name
        folder.mkdir(parents=True, exist_ok=True)
        for name, fig in plots(s, study):
            fig.savefig(folder / f"{name}.png", bbox_inches="tight")
            plt.close(fig)
        (folder / "results.txt").write_text(text + "\n")
        print(f"[sweep] plots written to {folder}")
        return
    from mlflow import MlflowClient

    client = MlflowClient(s.tracking_uri)
    for name, fig in plots(s, study):
        client.log_figure(parent_run_id, fig, f"plots/{name}.png", save_kwargs={"bbox_inches": "tight"})
        plt.close(fig)
    client.log_text(parent_run_id, text + "\n", "results.txt")
    best = best_trials(s, study)
    if best and not s.multi:
        client.log_metric(parent_run_id, "best_val_acc", best[0].value)
        client.set_tag(parent_run_id, "best_trial", str(best[0].number))
    client.log_metric(parent_run_id, "n_trials", n_trials)
    client.set_terminated(parent_run_id, "FINISHED")


def retrain(s: Settings, study: optuna.Study, data: DatasetBundle, parent_run_id: str | None) -> dict[int, float]:
    """Retrain the best trial(s) on train+val and evaluate on the test set; {trial number: test acc}."""
    recipe = apply_overrides(s.recipe, {"val_size": 0})
    if parent_run_id is not None:
        from mlflow import MlflowClient

        client = MlflowClient(s.tracking_uri)
        if client.get_run(parent_run_id).info.status != "RUNNING":  # reported before without --retrain-best
            client.update_run(parent_run_id, status="RUNNING")
    results = {}
    for t in best_trials(s, study)[: None if s.multi else 1]:
        hp = s.space.model_kwargs(t.params)
        cfg = RunConfig(arch=ARCH, recipe=recipe, model=hp, dataset=s.args.dataset, data_dir=s.args.data_dir,
                        seed=s.args.seed, device=s.args.device, output_dir=s.args.output_dir)
        tags = {"cnn_zoo.kind": "retrain", "optuna.study_name": s.study_name, "optuna.trial_number": str(t.number)}
        tracker = MlflowTracker(s.tracking_uri, s.args.experiment) if s.tracking_uri else Tracker()
        print(f"[sweep] retraining trial {t.number} {_hp_text(hp)} on the full training set", flush=True)
        result = fit(cfg, tracker, options=FitOptions(evaluate_test=True, progress=False, tags=tags,
                                                      run_name=f"{s.study_name}-retrain-trial-{t.number}",
                                                      parent_run_id=parent_run_id), data=data)
        results[t.number] = result.summary["final_test_acc"]
    return results


def _report_covers(held: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """A report of the same number of trials makes ours redundant unless we retrain and it did not."""
    return held["trials"] == wanted["trials"] and (held["retrain"] or not wanted["retrain"])


def finish(s: Settings, storage: SweepStorage, study: optuna.Study, data: DatasetBundle,
           parent_run_id: str | None) -> int:
    trials = study.get_trials(deepcopy=False)
    done = n_done(trials)
    if done < s.args.trials or any(t.state == TrialState.RUNNING for t in trials):
        print(results_text(s, study))
        print(f"error: study {s.study_name} has {done} of {s.args.trials} trials done; rerun the same "
              f"command to resume it", file=sys.stderr)
        return 1
    # Every process of the study gets here; one retrains (when asked) and then reports, per study size.
    # A later --retrain-best command retrains and reports again a study reported without retraining.
    token = {"trials": done, "retrain": s.args.retrain_best}
    test_acc = None
    if claim(study, storage, REPORT_CLAIM, token, covers=_report_covers):
        reported = False
        try:
            test_acc = retrain(s, study, data, parent_run_id) if s.args.retrain_best else None
            report(s, study, parent_run_id, done, test_acc)
            reported = True
        finally:
            release_claim(study, storage, REPORT_CLAIM, token, done=reported)
    else:
        retrained = " with its retrained best trial(s)" if s.args.retrain_best else ""
        print(f"[sweep] study {s.study_name} is reported{retrained} by another process, or was already")
    print(results_text(s, study, test_acc))
    if not best_trials(s, study):
        print(f"error: no trial of study {s.study_name} trained successfully within the constraints", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = resolve(args)
        data = load_dataset(args.dataset, args.data_dir)  # once here: bad data fails before any worker starts
        # The study (and on PostgreSQL its tables) is created here, before any worker: concurrent
        # first-time schema creation collides.
        storage, study = open_sweep(s)
        parent_run_id = prepare_study(s, storage, study, data)
        print(f"[sweep] study {s.study_name} in {storage.display}: {n_done(study.get_trials(deepcopy=False))} of "
              f"{args.trials} trials done" + (f"; MLflow parent run {parent_run_id}" if parent_run_id else ""),
              flush=True)
        if args.workers == 1:
            work(s, storage, study, data)
        else:
            codes = run_workers(args)
            if 2 in codes:  # a UserError, already printed by the worker
                return 2
            complete = n_done(study.get_trials(deepcopy=False)) >= args.trials
            line = worker_failures(codes, complete)
            if line:
                print(line, file=sys.stderr)
            # Still report (and finish) the study: the other workers may have completed it.
            return finish(s, storage, study, data, parent_run_id) or int(not complete)
        return finish(s, storage, study, data, parent_run_id)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print("interrupted: rerun the same command to resume the study", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume the study", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
