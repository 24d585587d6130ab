"""Workers: this process's share of a study's trials, the --workers processes that each run such a share,
and the one line that says how those processes ended."""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import optuna
import torch

from experiments.cli import exit_code
from experiments.data import DatasetBundle, load_dataset
from experiments.errors import Interrupted, NonFiniteLoss
from experiments.tracking import mlflow_logging
from sweeps.records import open_study, parent_run_id
from sweeps.settings import SweepSettings, make_pruner, make_sampler
from sweeps.study import SweepStorage, register_worker, run_trials
from sweeps.trials import TrialRunner


def run_worker_trials(s: SweepSettings, storage: SweepStorage, study: optuna.Study, data: DatasetBundle) -> int:
    """Run this process's share of the study's trials; returns how many it ran."""
    index = register_worker(study, storage)
    # A seed per worker: workers with one seed would all propose the same random start-up points.
    study.sampler = make_sampler(s, s.run.seed + index)
    study.pruner = make_pruner(s)
    runner = TrialRunner(s, data, parent_run_id(study) if s.tracking_uri else None)
    # A diverged or out-of-memory trial is a verdict on its point: it counts, and the worker goes on.
    return run_trials(study, storage, s.trials, runner.suggest, runner.evaluate,
                      catch=(NonFiniteLoss, torch.OutOfMemoryError))


def worker_process(s: SweepSettings) -> None:
    """What a --workers process runs: its own data and storage connection, and its share of the trials."""
    data = load_dataset(s.run.dataset, s.run.data_dir)
    storage, study = open_study(s)
    run_worker_trials(s, storage, study, data)


def run_worker_processes(count: int, target: Callable[..., None], *args: Any,
                         envs: Sequence[dict[str, str]] | None = None, verbose: bool = False) -> list[int]:
    """Run ``target(*args)`` in ``count`` processes, each with its share of the cores (and ``envs[i]`` added to
    worker i's environment, e.g. its own CUDA_VISIBLE_DEVICES), and wait for them; returns their exit codes
    (2: bad input, already printed; 128 + N: interrupted by signal N). ``verbose``: the workers show MLflow's
    own INFO messages."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited CUDA state or locks
    threads = max(1, (os.cpu_count() or 1) // count)  # no oversubscription of the cores
    procs = [ctx.Process(target=_process_main, args=(target, threads, envs[i] if envs else {}, verbose, *args),
                         name=f"sweep-worker-{i}") for i in range(count)]
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


def _process_main(target: Callable[..., None], threads: int, env: dict[str, str], verbose: bool, *args: Any) -> None:
    os.environ.update(env)  # before anything initialises CUDA, which reads CUDA_VISIBLE_DEVICES once
    torch.set_num_threads(threads)
    mlflow_logging(verbose)  # a spawned interpreter starts with MLflow's INFO chatter on
    sys.exit(exit_code(partial(_call_quietly_interrupted, target, *args)))


def _call_quietly_interrupted(target: Callable[..., None], *args: Any) -> None:
    """Ctrl-C becomes Interrupted(SIGINT), which exit_code() maps to 130 without a line: the command that
    started the worker says what to do."""
    try:
        target(*args)
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT) from None


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
