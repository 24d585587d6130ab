"""Run a comparison campaign: every (architecture, model arguments, dataset, seed) cell of a campaign file
trained exactly once under one recipe, shared by any number of workers and machines.

    python sweeps/campaign.py sweeps/campaigns/cifar10-cpu.yaml                  # one worker
    python sweeps/campaign.py CAMPAIGN.yaml --workers 2                         # two processes, cores split
    python sweeps/campaign.py CAMPAIGN.yaml --gpus 0,1,2,3                      # one worker per GPU
    python sweeps/campaign.py CAMPAIGN.yaml --storage postgresql://USER@HOST:5432/DB   # on every machine
    python sweeps/campaign.py status CAMPAIGN.yaml                              # the cells and the time left
    python sweeps/campaign.py export CAMPAIGN.yaml DIR     # one JSON file per FINISHED cell run, for another store
    python sweeps/campaign.py import CAMPAIGN.yaml DIR     # those files' runs into this campaign's store: done

MLflow's own INFO messages (store creation, system metrics) are hidden unless --verbose.

Rerunning the command skips the cells whose run FINISHED in the campaign's experiment (same recipe hash, model
arguments and data digest), resumes a KILLED or FAILED run from its last checkpoint (exactly) and starts the
rest. The cells are the trials of one Optuna study (journal file or PostgreSQL, as the sweeps): a cell whose
worker died is failed and handed to another worker, which resumes its run. When the last cell is done, the
campaign writes its experiment's report and figures (analysis/report.py and analysis/plots.py) into
REPORT_DIR/EXPERIMENT/RECIPE_HASH/. sweeps/campaign_spec.py describes the campaign file.

A machine that shares no MLflow store contributes cells as files: `export` writes its FINISHED cell runs, and
`import` recreates them in the campaign's store, where they count as done (sweeps/campaign_export.py).
"""
from __future__ import annotations

import argparse
import signal
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # `python sweeps/campaign.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.cli import Parser, exit_code
from experiments.errors import Interrupted, UserError

if TYPE_CHECKING:
    from sweeps.campaign_spec import Settings


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _gpus(text: str) -> tuple[str, ...]:
    ids = tuple(s.strip() for s in text.split(","))
    if not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"expected distinct GPU indices such as 0,1,2,3, got {text!r}")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="campaign.py", description=__doc__)
    p.add_argument("campaign", metavar="CAMPAIGN.yaml",
                   help="the campaign file (or: status CAMPAIGN.yaml, export/import CAMPAIGN.yaml DIR)")
    p.add_argument("--workers", type=_positive_int,
                   help="worker processes on this machine, the cores split between them (default 1, or one per --gpus)")
    p.add_argument("--gpus", type=_gpus, metavar="0,1,...", help="one worker per GPU, each seeing only its own")
    p.add_argument("--storage", default="optuna.journal",
                   help="journal file for processes on one machine (default optuna.journal), or "
                        "postgresql://USER[:PASSWORD]@HOST:PORT/DB for workers on many machines")
    p.add_argument("--heartbeat", type=_positive_int, default=30, metavar="SECONDS",
                   help="PostgreSQL: a cell whose worker is silent for 3x this is handed to another (default 30)")
    _add_verbose(p)
    return p


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show MLflow's own INFO messages (store creation, system metrics), workers' too")


def build_status_parser() -> argparse.ArgumentParser:
    p = Parser(prog="campaign.py status", description="The campaign's cells (done, running, pending, failed) and "
                                                      "its time left, from its MLflow experiment.")
    p.add_argument("campaign", metavar="CAMPAIGN.yaml")
    _add_verbose(p)
    return p


def build_transfer_parser(command: str) -> argparse.ArgumentParser:
    """export and import: FINISHED cell runs as files, for machines that share no MLflow store."""
    what = {"export": ("Write one JSON file per FINISHED cell run of the campaign into DIR (created).",
                       "the folder the files are written to"),
            "import": ("Recreate the runs of DIR's JSON files (from export) as FINISHED runs of the campaign's "
                       "experiment; the campaign then skips those cells. Every file is checked first.",
                       "the folder of exported files")}[command]
    p = Parser(prog=f"campaign.py {command}", description=what[0])
    p.add_argument("campaign", metavar="CAMPAIGN.yaml")
    p.add_argument("dir", metavar="DIR", type=Path, help=what[1])
    p.add_argument("--tracking-uri", help="the MLflow store (default: the campaign file's tracking_uri, else "
                                          "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    _add_verbose(p)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Check the flags and the whole campaign file before any data, storage or training is touched."""
    from sweeps.campaign_spec import Settings, load_campaign

    if args.gpus and args.workers not in (None, len(args.gpus)):
        raise UserError(f"--gpus {','.join(args.gpus)} runs one worker per GPU: drop --workers {args.workers}")
    workers = len(args.gpus) if args.gpus else args.workers or 1
    return Settings(load_campaign(args.campaign), args.storage, args.heartbeat, workers, args.gpus or (),
                    verbose=args.verbose)


def run_campaign(s: Settings) -> int:
    """Plan, train this machine's share of the cells, then (once every cell is done) report."""
    from experiments.data import load_dataset
    from experiments.tracking import mlflow_logging
    from sweeps.campaign_runs import cell_states, experiment_runs
    from sweeps.campaign_study import (
        campaign_worker,
        finish_campaign,
        open_campaign_study,
        print_plan,
        run_cells,
    )
    from sweeps.workers import run_worker_processes, worker_failures

    mlflow_logging(verbose=s.verbose)
    c = s.campaign
    data = {d: load_dataset(d, c.data_dir) for d in c.datasets}  # bad data fails before any worker starts
    digests = {d: bundle.digest for d, bundle in data.items()}
    storage, study, store = open_campaign_study(s, digests)
    print_plan(c, study, storage, cell_states(c, experiment_runs(c, store), digests))
    if s.workers == 1 and not s.gpus:
        run_cells(c, storage, study, data)
        return finish_campaign(c, storage, study, store, digests)
    envs = [{"CUDA_VISIBLE_DEVICES": g} for g in s.gpus] or None
    codes = run_worker_processes(s.workers, campaign_worker, s, study.study_name, envs=envs, verbose=s.verbose)
    if 2 in codes:  # a UserError, already printed by the worker
        return 2
    code = finish_campaign(c, storage, study, store, digests)
    line = worker_failures(codes, complete=code == 0)
    if line:
        print(line.replace("study", "campaign"), file=sys.stderr)
    return code


def print_status(args: argparse.Namespace) -> None:
    from experiments.tracking import TrackingStore, mlflow_logging
    from sweeps.campaign_runs import status_text
    from sweeps.campaign_spec import load_campaign

    c = load_campaign(args.campaign)
    mlflow_logging(verbose=args.verbose)
    print(status_text(c, TrackingStore(c.tracking_uri, c.experiment)))


def transfer_cells(command: str, args: argparse.Namespace) -> None:
    """export or import, on the campaign's data digests (the data is read, as by the campaign)."""
    import dataclasses

    from experiments.data import load_dataset
    from experiments.tracking import TrackingStore, mlflow_logging, normalize_uri
    from sweeps.campaign_export import export_cells, import_cells, read_records
    from sweeps.campaign_spec import load_campaign

    c = load_campaign(args.campaign)
    if args.tracking_uri:
        c = dataclasses.replace(c, tracking_uri=normalize_uri(args.tracking_uri))
    records = read_records(args.dir) if command == "import" else []  # bad files fail before the data is read
    mlflow_logging(verbose=args.verbose)
    digests = {d: load_dataset(d, c.data_dir).digest for d in c.datasets}
    store = TrackingStore(c.tracking_uri, c.experiment)
    if command == "export":
        export_cells(c, store, digests, args.dir)
    else:
        import_cells(c, store, records, digests)


def _run_saying_how_to_resume(args: argparse.Namespace) -> int:
    try:
        return run_campaign(settings_from_args(args))
    except (Interrupted, KeyboardInterrupt) as e:
        print("interrupted: rerun the same command to resume the campaign", file=sys.stderr)
        # Both as Interrupted: exit_code() maps it to 128 + the signal, 130 for Ctrl-C, with no line of its own.
        raise (e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        args = build_status_parser().parse_args(argv[1:])
        return exit_code(partial(print_status, args))
    if argv[:1] in (["export"], ["import"]):
        args = build_transfer_parser(argv[0]).parse_args(argv[1:])
        return exit_code(partial(transfer_cells, argv[0], args))
    args = build_parser().parse_args(argv)
    return exit_code(partial(_run_saying_how_to_resume, args))


if __name__ == "__main__":
    sys.exit(main())
