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
import signal
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python sweeps/densenet_bc.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zoo
from experiments.cli import Parser, exit_code
from experiments.config import RunConfig, apply_overrides, check_seed, flag_overrides, list_recipes, load_recipe
from experiments.data import NUM_CLASSES, load_dataset
from experiments.errors import Interrupted, UserError
from experiments.names import DEFAULT_EXPERIMENT
from experiments.tracking import default_tracking_uri, mlflow_logging
from sweeps.records import open_study, prepare_study
from sweeps.results import finish_study
from sweeps.settings import SweepSettings
from sweeps.space import DEFAULT_SPACE, SearchSpace, load_space
from sweeps.study import n_done
from sweeps.workers import run_worker_processes, run_worker_trials, worker_failures, worker_process

ARCH = "densenet_bc"


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
    p = Parser(prog="densenet_bc.py", description=__doc__)
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


def param_count(hp: dict[str, Any], num_classes: int) -> int:
    return zoo.variant_info(ARCH, num_classes, **hp)["params"]


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    """Check every flag and file before any data, storage or training is touched."""
    check_seed(args.seed, "--seed")
    if args.objective == "pareto" and args.pruner not in (None, "none"):
        raise UserError(f"--pruner {args.pruner}: Optuna cannot prune multi-objective studies; "
                        f"drop --pruner with --objective pareto")
    overrides = flag_overrides({"subset": args.subset}, args.epochs, args.set)
    recipe = load_recipe(args.recipe)
    recipe = apply_overrides(recipe, overrides) if overrides else recipe
    if recipe.val_size < 1:
        raise UserError(f"recipe {recipe.name}: val_size is 0 but trials are scored on validation images; "
                        f"--set val_size=N (N >= 1)")
    space = load_space(args.space)
    if args.max_params is not None:
        _check_budget_admits_a_model(space, args.max_params, NUM_CLASSES[args.dataset])
    run = RunConfig(arch=ARCH, recipe=recipe, dataset=args.dataset, data_dir=args.data_dir, seed=args.seed,
                    device=args.device, output_dir=args.output_dir)
    return SweepSettings(
        run=run, space=space, study_name=args.study_name or f"{ARCH}-{args.dataset}-{args.objective}",
        trials=args.trials, objective=args.objective, sampler=args.sampler, pruner=args.pruner,
        max_params=args.max_params, retrain_best=args.retrain_best, storage=args.storage, heartbeat=args.heartbeat,
        workers=args.workers, tracking_uri=None if args.no_tracking else (args.tracking_uri or default_tracking_uri()),
        experiment=args.experiment)


def _check_budget_admits_a_model(space: SearchSpace, max_params: int, num_classes: int) -> None:
    smallest = param_count(space.smallest_model(), num_classes)
    if smallest > max_params:
        raise UserError(f"--max-params {max_params:,} rejects the whole search space: its smallest model "
                        f"has {smallest:,} parameters")


def run_sweep(s: SweepSettings) -> int:
    """Run the study to --trials trials in this process or in --workers processes, then report it."""
    data = load_dataset(s.run.dataset, s.run.data_dir)  # once here: bad data fails before any worker starts
    # The study (and on PostgreSQL its tables) is created here, before any worker: concurrent
    # first-time schema creation collides.
    storage, study = open_study(s)
    parent_run_id = prepare_study(s, storage, study, data)
    print(f"[sweep] study {s.study_name} in {storage.display}: {n_done(study.get_trials(deepcopy=False))} of "
          f"{s.trials} trials done" + (f"; MLflow parent run {parent_run_id}" if parent_run_id else ""), flush=True)
    if s.workers == 1:
        run_worker_trials(s, storage, study, data)
        return finish_study(s, storage, study, data, parent_run_id)
    codes = run_worker_processes(s.workers, worker_process, s)
    if 2 in codes:  # a UserError, already printed by the worker
        return 2
    complete = n_done(study.get_trials(deepcopy=False)) >= s.trials
    line = worker_failures(codes, complete)
    if line:
        print(line, file=sys.stderr)
    # Still report (and finish) the study: the other workers may have completed it.
    return finish_study(s, storage, study, data, parent_run_id) or int(not complete)


def _run_sweep_saying_how_to_resume(args: argparse.Namespace) -> int:
    try:
        mlflow_logging(verbose=False)
        return run_sweep(settings_from_args(args))
    except (Interrupted, KeyboardInterrupt) as e:
        print("interrupted: rerun the same command to resume the study", file=sys.stderr)
        # Both as Interrupted: exit_code() maps it to 128 + the signal, 130 for Ctrl-C, with no line of its own.
        raise (e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: _run_sweep_saying_how_to_resume(args))


if __name__ == "__main__":
    sys.exit(main())
