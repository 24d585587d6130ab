"""A study's results: the best trials as a table, Optuna's plots, and the report that one process of the
study writes (as artifacts of the MLflow parent run, which it then ends, or into a folder) once --trials
trials are done, after retraining the best trial(s) when asked."""
from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from experiments import names
from experiments.data import DatasetBundle
from sweeps.settings import SweepSettings
from sweeps.study import SweepStorage, claim, n_done, release_claim
from sweeps.trials import PARAMS_ATTR, REJECTED_ATTR, retrain

REPORT_CLAIM = "cnn_zoo.report"  # study user attr: who retrains (--retrain-best), reports and ends the parent run
TOP_TRIALS = 5  # rows of the val_acc table


def best_trials(s: SweepSettings, study: optuna.Study) -> list[FrozenTrial]:
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


def trial_table(s: SweepSettings, rows: list[FrozenTrial], test_acc: dict[int, float] | None = None) -> str:
    columns = s.space.columns
    header = f"{'trial':>6} " + " ".join(f"{c.header:>{c.width}}" for c in columns) + f" {'params':>12} {'val acc':>9}"
    lines = [header + (f" {'test acc':>9}" if test_acc else "")]
    for t in rows:
        hp = s.space.model_kwargs(t.params)
        n_params = t.user_attrs.get(PARAMS_ATTR)  # absent from trials added by hand (study.add_trial)
        line = (f"{t.number:>6} " + " ".join(f"{hp[c.key]:>{c.width}{c.precision}}" for c in columns)
                + f" {'?' if n_params is None else f'{n_params:,}':>12} {t.values[0]:>8.2f}%")
        if test_acc:
            line += f" {test_acc[t.number]:>8.2f}%" if t.number in test_acc else f" {'-':>9}"
        lines.append(line)
    return "\n".join(lines)


def results_text(s: SweepSettings, study: optuna.Study, test_acc: dict[int, float] | None = None) -> str:
    rows = best_trials(s, study)
    title = "Pareto front (val acc vs parameters)" if s.multi else f"best trials by val acc (top {TOP_TRIALS})"
    body = trial_table(s, rows, test_acc) if rows else "no feasible finished trial yet"
    return f"{summary_line(study)}\n{title}:\n{body}"


def optuna_figures(s: SweepSettings, study: optuna.Study) -> Iterator[tuple[str, Any]]:
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
    contour_name, contour_params = s.space.contour
    makers = {
        "optimization_history": lambda: vis.plot_optimization_history(trained, target=acc, target_name="val acc (%)"),
        "param_importances": lambda: vis.plot_param_importances(trained, target=low_is_good, target_name="val acc"),
        contour_name: lambda: vis.plot_contour(trained, params=list(contour_params), target=acc,
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


def publish_results(s: SweepSettings, study: optuna.Study, parent_run_id: str | None, n_trials: int,
                    test_acc: dict[int, float] | None) -> None:
    """Plots and the results table (with the retrained trials' test accuracy) as artifacts of the parent
    run, which then ends FINISHED, or without tracking into OUTPUT_DIR/sweeps/STUDY; ``n_trials``: the
    trials that count."""
    import matplotlib.pyplot as plt

    text = results_text(s, study, test_acc)
    store = s.tracking_store()
    if parent_run_id is None or store is None:
        folder = Path(s.run.output_dir) / "sweeps" / s.study_name
        folder.mkdir(parents=True, exist_ok=True)
        for name, fig in optuna_figures(s, study):
            fig.savefig(folder / f"{name}.png", bbox_inches="tight")
            plt.close(fig)
        (folder / "results.txt").write_text(text + "\n")
        print(f"[sweep] plots written to {folder}")
        return
    for name, fig in optuna_figures(s, study):
        store.log_figure(parent_run_id, fig, f"plots/{name}.png")
        plt.close(fig)
    store.log_text(parent_run_id, text + "\n", "results.txt")
    best = best_trials(s, study)
    if best and not s.multi:
        store.log_metrics(parent_run_id, {names.BEST_VAL_ACC: best[0].value})
        store.set_tags(parent_run_id, {names.BEST_TRIAL: str(best[0].number)})
    store.log_metrics(parent_run_id, {names.N_TRIALS: n_trials})
    store.end_run(parent_run_id, "FINISHED")


def _report_covers(held: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """A report of the same number of trials makes ours redundant unless we retrain and it did not."""
    return held["trials"] == wanted["trials"] and (held["retrain"] or not wanted["retrain"])


def finish_study(s: SweepSettings, storage: SweepStorage, study: optuna.Study, data: DatasetBundle,
                 parent_run_id: str | None) -> int:
    """Once --trials trials are done: retrain (--retrain-best) and report, in one process of the study,
    then print the results; the command's exit code."""
    trials = study.get_trials(deepcopy=False)
    done = n_done(trials)
    if done < s.trials or any(t.state == TrialState.RUNNING for t in trials):
        print(results_text(s, study))
        print(f"error: study {s.study_name} has {done} of {s.trials} trials done; rerun the same "
              f"command to resume it", file=sys.stderr)
        return 1
    # Every process of the study gets here; one retrains (when asked) and then reports, per study size.
    # A later --retrain-best command retrains and reports again a study reported without retraining.
    token = {"trials": done, "retrain": s.retrain_best}
    test_acc = None
    if claim(study, storage, REPORT_CLAIM, token, covers=_report_covers):
        reported = False
        try:
            if s.retrain_best:
                test_acc = retrain(s, best_trials(s, study)[: None if s.multi else 1], data, parent_run_id)
            publish_results(s, study, parent_run_id, done, test_acc)
            reported = True
        finally:
            release_claim(study, storage, REPORT_CLAIM, token, done=reported)
    else:
        retrained = " with its retrained best trial(s)" if s.retrain_best else ""
        print(f"[sweep] study {s.study_name} is reported{retrained} by another process, or was already")
    print(results_text(s, study, test_acc))
    if not best_trials(s, study):
        print(f"error: no trial of study {s.study_name} trained successfully within the constraints", file=sys.stderr)
        return 1
    return 0
