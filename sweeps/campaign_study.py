"""A campaign as an Optuna study: one trial per cell (the ``cell`` parameter), handed out in the campaign's
order by CellSampler under the study's lock, so that no two workers take one cell and none is lost; each
trial skips, resumes or starts its cell's MLflow run; and the report once every cell is done.

The study is named after the experiment and a hash of the campaign's recipe, cells and data digests: an
unfinished study of the same experiment with another hash is an earlier version, which this one may not mix
with (a finished one may be extended: its FINISHED runs are skipped).
"""
from __future__ import annotations

import dataclasses
import sys
from functools import partial
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from experiments import checkpoint as ckpt_io
from experiments import names
from experiments.data import DatasetBundle, load_dataset
from experiments.errors import NonFiniteLoss, UserError
from experiments.fit import FitOptions, fit
from experiments.resume import saved_config
from experiments.tracking import TrackingStore
from sweeps.campaign_runs import (
    DONE,
    RESUME,
    RUNNING,
    CellState,
    cell_states,
    checkpoint_path,
    experiment_runs,
)
from sweeps.campaign_spec import Campaign, Settings, fingerprint_hash
from sweeps.records import CONFIG_ATTR, close_dead_worker_run
from sweeps.study import (
    FAILURE_ATTR,
    SweepStorage,
    claim,
    counts,
    create_study,
    locked,
    n_done,
    open_storage,
    release_claim,
    run_trials,
)
from sweeps.trials import TrialTracker

CELL_PARAM = "cell"  # the trial parameter naming its cell
REPORT_CLAIM = "cnn_zoo.campaign_report"  # study user attr: the process that writes the report


def study_prefix(c: Campaign) -> str:
    return f"campaign-{c.experiment}-"


def open_campaign_study(s: Settings, digests: dict[str, str]) -> tuple[SweepStorage, optuna.Study, TrackingStore]:
    """The storage (whose dead-worker hook ends the dead worker's MLflow run FAILED), the campaign's study
    (created, or checked against the earlier versions in the storage) and the MLflow store."""
    c = s.campaign
    store = TrackingStore(c.tracking_uri, c.experiment)
    storage = open_storage(s.storage, s.heartbeat, on_stale=partial(close_dead_worker_run, store))
    fingerprint = c.fingerprint(digests)
    name = study_prefix(c) + fingerprint_hash(fingerprint)
    _refuse_unfinished_versions(c, storage, name, fingerprint)
    study = create_study(storage, name, ["maximize"])
    with locked(storage.lock(name)):
        if CONFIG_ATTR not in study.user_attrs:
            study.set_user_attr(CONFIG_ATTR, fingerprint)
    return storage, study, store


def _refuse_unfinished_versions(c: Campaign, storage: SweepStorage, name: str, fingerprint: dict[str, Any]) -> None:
    for other in storage.optuna.get_all_studies():
        saved = other.user_attrs.get(CONFIG_ATTR)
        if other.study_name == name or not other.study_name.startswith(study_prefix(c)) or saved is None:
            continue
        trials = optuna.load_study(study_name=other.study_name, storage=storage.optuna).get_trials(deepcopy=False)
        if n_done(trials) < len(saved["cells"]) or any(t.state == TrialState.RUNNING for t in trials):
            raise UserError(f"campaign {c.name}: experiment {c.experiment!r} holds an unfinished earlier version "
                            f"(study {other.study_name} in {storage.display}) whose {changes(saved, fingerprint)}; "
                            f"finish it with its own file, or give this version a new experiment name")


def changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two campaign fingerprints, in words."""
    said = []
    if old["recipe"] != new["recipe"]:
        said.append(f"recipe was {old['recipe']}, now {new['recipe']}")
    added = [k for k in new["cells"] if k not in old["cells"]]
    removed = [k for k in old["cells"] if k not in new["cells"]]
    if added or removed:
        said.append("cells changed (" + ", ".join(
            f"{len(ks)} {verb}, e.g. {ks[0]}" for ks, verb in ((added, "added"), (removed, "removed")) if ks) + ")")
    for dataset, digest in new["data"].items():
        if old["data"].get(dataset) not in (None, digest):
            said.append(f"{dataset} data changed (sha256 {old['data'][dataset][:12]}, now {digest[:12]})")
    return "; ".join(said) or "settings differ"


class CellSampler(optuna.samplers.BaseSampler):
    """The first cell, in campaign order, that no trial holds (COMPLETE, RUNNING, failed with a verdict or
    queued again): asked under the study's lock, so two workers never get one cell, and a cell whose trial
    was failed without being queued again is handed out again."""

    def __init__(self, keys: list[str]):
        self.keys = keys

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        held = {t.params.get(CELL_PARAM) for t in study.get_trials(deepcopy=False)
                if counts(t) or t.state == TrialState.WAITING}
        free = [k for k in self.keys if k not in held]
        if not free:  # run_trials asks only while fewer trials than cells count
            raise RuntimeError("every cell is taken")
        return free[0]


class CellRunner:
    """One worker's suggest() and evaluate() for sweeps.study.run_trials."""

    def __init__(self, c: Campaign, data: dict[str, DatasetBundle]):
        self.c = c
        self.data = data
        self.store = TrackingStore(c.tracking_uri, c.experiment)
        self.tracker = TrialTracker(c.tracking_uri, c.experiment)

    def suggest(self, trial: optuna.Trial) -> str:
        return trial.suggest_categorical(CELL_PARAM, [cell.key for cell in self.c.cells])

    def evaluate(self, trial: optuna.Trial, key: str) -> float:
        """Skip the cell (its run FINISHED), resume its run from the last checkpoint, or start it."""
        c, cell = self.c, self.c.cell(key)
        bundle = self._dataset(cell.dataset)
        state = cell_states(dataclasses.replace(c, cells=(cell,)), experiment_runs(c, self.store),
                            {cell.dataset: bundle.digest})[key]
        if state.state == DONE:
            print(f"[campaign] {key}: run {state.run_id} already FINISHED, skipped", flush=True)
            return _score(state.run.data.metrics)
        if state.state == RUNNING:
            raise UserError(f"cell {key}: run {state.run_id} is RUNNING outside this campaign's study; let it end "
                            f"(or end it in MLflow) and rerun")
        cfg, resume = c.run_config(cell), None
        if state.state == RESUME:  # the run goes on as it started (its model arguments, resolved speed settings)
            resume = ckpt_io.load(checkpoint_path(c, state.run_id))
            cfg = dataclasses.replace(saved_config(resume), data_dir=c.data_dir, output_dir=c.output_dir,
                                      device=c.device)
        print(f"[campaign] {key}: " + (f"resuming run {state.run_id}" if resume else "starting"), flush=True)
        tags = {names.KIND: names.KIND_TRAIN, names.CAMPAIGN: c.name, names.CELL: key,
                names.SEED_GROUP: f"{cell.label}-{c.recipe.hash()}-{c.name}", names.COMMAND: " ".join(sys.argv)}
        options = FitOptions(resume=resume, progress=False, log_model=c.log_model, tags=tags,
                             run_name=f"{cell.label}-{cell.dataset}-{c.recipe.name}-s{cell.seed}")
        # No run yet: a fit() that fails before starting one must not tag the previous cell's trial.
        self.tracker.trial, self.tracker.run_id = trial, None
        return _score(fit(cfg, self.tracker, options=options, data=bundle).summary)

    def _dataset(self, name: str) -> DatasetBundle:
        if name not in self.data:
            self.data[name] = load_dataset(name, self.c.data_dir)
        return self.data[name]


def _score(metrics: dict[str, float]) -> float:
    """The trial's value: final test accuracy (validation accuracy when there is none)."""
    return float(metrics.get(names.FINAL_TEST_ACC, metrics.get(names.BEST_VAL_ACC, 0.0)))


def run_cells(c: Campaign, storage: SweepStorage, study: optuna.Study, data: dict[str, DatasetBundle]) -> int:
    """Train this process's share of the cells; returns how many trials it ran."""
    study.sampler = CellSampler([cell.key for cell in c.cells])
    runner = CellRunner(c, data)
    # A diverged or out-of-memory cell is a verdict: it counts (failed), and the worker goes on.
    return run_trials(study, storage, len(c.cells), runner.suggest, runner.evaluate,
                      catch=(NonFiniteLoss, torch.OutOfMemoryError))


def campaign_worker(s: Settings, study_name: str) -> None:
    """What a --workers process runs: its own storage connection and data, and its share of the cells."""
    c = s.campaign
    storage = open_storage(s.storage, s.heartbeat,
                           on_stale=partial(close_dead_worker_run, TrackingStore(c.tracking_uri, c.experiment)))
    run_cells(c, storage, optuna.load_study(study_name=study_name, storage=storage.optuna), {})


def verdicts(study: optuna.Study) -> dict[str, str]:
    """Cell key -> the error that failed it for good (a diverged loss, out of memory)."""
    return {t.params[CELL_PARAM]: t.user_attrs[FAILURE_ATTR] for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.FAIL and FAILURE_ATTR in t.user_attrs and CELL_PARAM in t.params}


def print_plan(c: Campaign, study: optuna.Study, storage: SweepStorage, states: dict[str, CellState]) -> None:
    """What this command will do with each cell: skip, resume or start it (or leave it to another worker)."""
    failed = verdicts(study)
    tally = {"skipped": 0, "resumed": 0, "to start": 0, "running elsewhere": 0, "failed": 0}
    shown = {"skipped": "skip", "resumed": "resume", "to start": "start", "running elsewhere": "running"}
    print(f"[campaign] {c.name}: {len(c.cells)} cells, recipe {c.recipe.name} ({c.recipe.hash()}), experiment "
          f"{c.experiment!r}, study {study.study_name} in {storage.display}", flush=True)
    for cell in c.cells:
        st = states[cell.key]
        if st.state == DONE:
            verb, note = "skipped", f"run {st.run_id} FINISHED"
        elif cell.key in failed:
            verb, note = "failed", f"{failed[cell.key]} (not retried in this experiment)"
        elif st.state == RESUME:
            verb, note = "resumed", f"run {st.run_id} {st.run.info.status}, from its last checkpoint"
        elif st.state == RUNNING:
            verb, note = "running elsewhere", f"run {st.run_id}"
        else:
            verb, note = "to start", ""
        tally[verb] += 1
        print(f"[campaign] {shown.get(verb, verb):<8} {cell.key}" + (f": {note}" if note else ""), flush=True)
    print("[campaign] " + ", ".join(f"{n} {verb}" for verb, n in tally.items() if n or verb != "running elsewhere"),
          flush=True)


def finish_campaign(c: Campaign, storage: SweepStorage, study: optuna.Study, store: TrackingStore,
                    digests: dict[str, str]) -> int:
    """Once every cell is done: the report (by one process of the campaign); the command's exit code."""
    trials = study.get_trials(deepcopy=False)
    done, failed = n_done(trials), verdicts(study)
    if done < len(c.cells) or any(t.state == TrialState.RUNNING for t in trials):
        print(f"error: campaign {c.name} has {done} of {len(c.cells)} cells done; rerun the same command to resume "
              f"it", file=sys.stderr)
        return 1
    finished = sum(s.state == DONE for s in cell_states(c, experiment_runs(c, store), digests).values())
    print(f"[campaign] {c.name}: {finished} of {len(c.cells)} cells FINISHED" + (f", {len(failed)} failed" if failed
                                                                                  else ""), flush=True)
    token = study.study_name
    if claim(study, storage, REPORT_CLAIM, token):
        reported = False
        try:
            reported = write_report(c)
        finally:
            release_claim(study, storage, REPORT_CLAIM, token, done=reported)
        if not reported:
            return 1
    else:
        print(f"[campaign] the report of {c.name} is written by another process, or was already", flush=True)
    for key, reason in failed.items():
        print(f"error: cell {key} failed: {reason}", file=sys.stderr)
    return 1 if failed else 0


def write_report(c: Campaign) -> bool:
    """analysis/report.py and analysis/plots.py on the campaign's experiment and recipe; False if one failed."""
    from analysis import plots, report

    argv = ["--experiment", c.experiment, "--tracking-uri", c.tracking_uri, "--out", c.report_dir,
            "--recipe", c.recipe.hash()]
    for name, module in (("report", report), ("plots", plots)):
        try:
            code = module.main(argv)
        except SystemExit as e:  # their one-line errors exit through argparse
            code = e.code
        if code:
            print(f"error: analysis/{name}.py failed (above); rerun the campaign command to write the report, or "
                  f"python analysis/{name}.py {' '.join(argv)}", file=sys.stderr)
            return False
    return True
