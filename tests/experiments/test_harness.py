"""The training harness end to end on a tiny synthetic archive: MLflow contents, resume, signals, bad input."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch

from experiments import checkpoint as ckpt_io
from experiments import monitor, runtime
from experiments.config import RunConfig, apply_overrides, load_recipe
from experiments.run import main
from experiments.tracking import MlflowTracker, default_tracking_uri
from experiments.trainer import Trainer
from experiments import fit as fit_module
from experiments.errors import Interrupted
from experiments.fit import FitOptions, fit
from experiments.resume import saved_config
from experiments.runtime import graceful_signals, native_cpu_bf16
from tests.experiments.checkpoint_formats import CHECKPOINT_KEYS, OLD_CHECKPOINT_KEYS, old_format
from tests.helpers import CIFAR10_CLASSES, REPO, make_image_folder

TINY = ["--recipe", "smoke", "--arch", "resnet20", "--no-progress"]


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_image_folder_archive):
    """A fresh working directory with its own MLflow store, cache and outputs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CNN_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path, tiny_image_folder_archive.parent
    mlflow.set_tracking_uri(None)


def _client(path: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{path / 'mlflow.db'}")


def _runs(path: Path, experiment: str = "cnn-zoo"):
    client = _client(path)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow  # trains a model
def test_run_records_everything_in_mlflow(workdir, capsys):
    tmp, data_dir = workdir
    assert main([*TINY, "--data-dir", str(data_dir), "--run-name", "tiny"]) == 0
    out, err = capsys.readouterr()
    # how long the run takes here, measured on its first steps; a short run is offered no quickstart
    assert re.search(r"^\[resnet20\] estimated \d+m \d\ds for 2 epochs \(train \+ eval\) on this machine at "
                     r"[\d,]+ img/s$", out, re.M), out
    assert "--recipe quickstart" not in out and "diverged" not in err
    client, runs = _runs(tmp)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    p = run.data.params
    recipe = load_recipe("smoke")
    assert p["arch"] == "resnet20" and p["family"] == "resnet" and p["dataset"] == "cifar10"
    assert p["recipe"] == "smoke" and p["recipe_hash"] == recipe.hash() and p["seed"] == "0"
    assert p["model.shortcut"] == "A"  # every model hyperparameter, defaults included
    assert p["recipe.optimizer.lr"] == "0.05" and p["recipe.schedule.name"] == "cosine"
    assert (p["data.train_size"], p["data.val_size"], p["data.test_size"]) == ("180", "20", "50")
    assert len(p["data.digest"]) == 64 and p["device"] == "cpu" and p["data.preprocess"] == "none"
    # the resolved CPU defaults: bf16 where the CPU has it natively, channels_last, no compile for 22 steps
    assert p["amp"] == str(native_cpu_bf16()) and p["channels_last"] == "True" and p["compile"] == "False"
    assert p["compile_rule"].startswith("off: saves ~0 s of ~"), p["compile_rule"]
    t = run.data.tags
    assert "cnn_zoo.diverged" not in t
    for tag in ("git_commit", "git_dirty", "torch_version", "cuda_version", "device_name", "host", "command"):
        assert t[tag], tag
    assert t["cnn_zoo.kind"] == "train"
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
                "epoch_seconds", "images_per_second"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    m = run.data.metrics
    assert m["param_count"] == 269_722 and m["flops"] > 0
    for key in ("best_val_acc", "best_epoch", "test_acc_at_best_val", "final_test_acc", "final_val_acc", "train_seconds"):
        assert key in m, key
    # training steps, evaluation and the whole run apart; the epochs' own training seconds sum to train_seconds
    epoch_seconds = sum(x.value for x in client.get_metric_history(run.info.run_id, "epoch_seconds"))
    assert m["train_seconds"] == pytest.approx(epoch_seconds, rel=1e-6, abs=1e-6)
    assert m["eval_seconds"] > 0 and m["train_seconds"] + m["eval_seconds"] < m["wall_seconds"]
    assert 0 <= m["final_test_acc"] <= 100
    history = {s.step: s.value for s in client.get_metric_history(run.info.run_id, "val_acc")}
    assert m["best_val_acc"] == max(history.values()) and history[int(m["best_epoch"])] == m["best_val_acc"]
    assert any(k.startswith("system/") for k in m), "system metrics are logged"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model_summary.txt", "checkpoints"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/best.pt", "checkpoints/last.pt"}
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp))
    assert "recipe_hash: " + recipe.hash() in Path(config).read_text()
    (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    example = mlflow.models.Model.load(logged.model_uri).load_input_example(logged.model_uri)
    assert example.shape == (2, 3, 32, 32)
    inputs = run.inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {"cifar10-train", "cifar10-validation", "cifar10-test"}


@pytest.mark.slow  # trains a model
def test_seeds_are_grouped_and_arch_lists_train_each(workdir):
    tmp, data_dir = workdir
    assert main([*TINY, "--data-dir", str(data_dir), "--seeds", "0,1", "--epochs", "1"]) == 0
    _, runs = _runs(tmp)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    groups = {r.data.tags["seed_group"] for r in runs}
    assert len(groups) == 1
    # same recipe and seed-independent data split sizes => same hash, different weights
    assert len({r.data.params["recipe_hash"] for r in runs}) == 1
    assert runs[0].data.metrics["train_seconds"] > 0


@pytest.mark.slow  # trains a model
def test_sqlite_store_keeps_artifacts_beside_the_database(workdir):
    tmp, data_dir = workdir
    assert main([*TINY, "--data-dir", str(data_dir), "--epochs", "1", "--tracking-uri", "sqlite:///store/mlflow.db"]) == 0
    _, runs = _runs(tmp / "store")
    (run,) = runs
    assert run.info.artifact_uri.startswith((tmp / "store" / "mlruns").as_uri())
    assert (tmp / "store" / "mlruns").is_dir() and not (tmp / "mlruns").exists()


def _train_cmd(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "experiments" / "run.py"), *TINY, "--data-dir", str(data_dir),
            "--epochs", "4", "--output-dir", str(out), "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", *extra]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "CNN_ZOO_CACHE": str(tmp / "cache"), "PYTHONPATH": str(REPO)}


def _wait_for_epoch(path: Path, epoch: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                if torch.load(path, weights_only=True)["epoch"] >= epoch:
                    return
            except Exception:
                pass  # being replaced right now
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise TimeoutError(path)


def _final_state(out: Path) -> tuple[dict, list]:
    (last,) = (out / "checkpoints").glob("*/last.pt")
    ckpt = torch.load(last, weights_only=True)  # what fit() writes needs no unpickling of code
    return ckpt["model"], ckpt["history"]


def _strip_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")} for row in history]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(workdir, device):
    tmp, data_dir = workdir
    ref, killed = tmp / "ref", tmp / "killed"
    subprocess.run(_train_cmd(data_dir, ref, "--device", device), env=_env(tmp), check=True, capture_output=True)

    proc = subprocess.Popen(_train_cmd(data_dir, killed, "--device", device), env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    (run_dir,) = _wait_dir(killed / "checkpoints", proc)
    _wait_for_epoch(run_dir / "last.pt", 1, proc)
    proc.send_signal(signal.SIGKILL)  # somewhere inside epoch 2
    proc.wait()
    run_id = run_dir.name
    resumed = subprocess.run(_train_cmd(data_dir, killed, "--resume", run_id, "--device", device), env=_env(tmp), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    ref_model, ref_hist = _final_state(ref)
    model, hist = _final_state(killed)
    assert _strip_timing(hist) == _strip_timing(ref_hist)  # every metric of every epoch, bit for bit
    assert all(torch.equal(ref_model[k], model[k]) for k in ref_model)
    client = _client(killed)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2, 3, 4]  # continues, no duplicates
    ref_run = _client(ref).search_runs([_client(ref).get_experiment_by_name("cnn-zoo").experiment_id])[0]
    assert run.data.metrics["final_test_acc"] == ref_run.data.metrics["final_test_acc"]


def _wait_dir(root: Path, proc: subprocess.Popen, timeout: float = 120) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dirs = [d for d in root.glob("*") if d.is_dir()] if root.exists() else []
        if dirs:
            return dirs
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise TimeoutError(root)


@pytest.mark.slow
def test_sigterm_writes_checkpoint_marks_killed_and_resumes_exactly(workdir, device):
    tmp, data_dir = workdir
    ref, term = tmp / "ref", tmp / "term"
    subprocess.run(_train_cmd(data_dir, ref, "--device", device), env=_env(tmp), check=True, capture_output=True)
    proc = subprocess.Popen(_train_cmd(data_dir, term, "--device", device), env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (run_dir,) = _wait_dir(term / "checkpoints", proc)
    _wait_for_epoch(run_dir / "last.pt", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    # said at once, in the handler, before the step ends; then where the checkpoint went
    notice = ("SIGTERM received: the run stops after the current step and writes a checkpoint (--resume continues "
              "it); press Ctrl-C again to abort at once")
    assert notice in err and err.index(notice) < err.index("SIGTERM received: checkpoint written"), err
    run_id = run_dir.name
    assert _client(term).get_run(run_id).info.status == "KILLED"
    resumed = subprocess.run(_train_cmd(data_dir, term, "--resume", "latest", "--device", device), env=_env(tmp), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"^\[resnet20\] resuming run {run_id} at epoch [234]/4, step \d+/11$", resumed.stdout, re.M), \
        resumed.stdout
    finished = _client(term).get_run(run_id)
    assert finished.info.status == "FINISHED"
    ref_model, ref_hist = _final_state(ref)
    model, hist = _final_state(term)
    assert _strip_timing(hist) == _strip_timing(ref_hist)
    assert all(torch.equal(ref_model[k], model[k]) for k in ref_model)
    # the timings add up across the two sessions: training steps (the epochs' own seconds), evaluation, wall
    m = finished.data.metrics
    assert m["train_seconds"] == pytest.approx(sum(row["epoch_seconds"] for row in hist), rel=1e-9)
    assert m["eval_seconds"] > 0 and m["train_seconds"] + m["eval_seconds"] < m["wall_seconds"]


@pytest.mark.slow  # trains a model
def test_non_finite_loss_fails_the_run(workdir, capsys, device):
    tmp, data_dir = workdir
    assert main([*TINY, "--data-dir", str(data_dir), "--lr", "1e30", "--epochs", "1", "--device", device]) == 1
    assert "non-finite training loss" in capsys.readouterr().err
    _, runs = _runs(tmp)
    assert runs[0].info.status == "FAILED" and "non-finite" in runs[0].data.tags["failure"]


@pytest.mark.slow  # trains a model
def test_resume_with_other_arch_or_recipe_is_refused(workdir, capsys):
    tmp, data_dir = workdir
    assert main([*TINY, "--data-dir", str(data_dir), "--epochs", "1", "--no-tracking"]) == 0
    (run_dir,) = (tmp / "outputs" / "checkpoints").glob("*")
    before = (run_dir / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["--resume", run_dir.name, "--arch", "resnet32", "--no-tracking"]) == 2
    assert "refusing to resume" in capsys.readouterr().err
    assert main(["--resume", run_dir.name, "--recipe", "fast", "--no-tracking"]) == 2
    assert "refusing to resume" in capsys.readouterr().err
    assert (run_dir / "last.pt").read_bytes() == before  # nothing recorded was touched


# Unknown architecture, invalid DenseNet hyperparameters, bad recipe keys and types and a missing data
# directory are in tests/experiments/test_hostile.py (with their whole line, and that nothing recorded changes).
@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet20", "--recipe", "nosuch"], "unknown recipe 'nosuch'"),
    (["--arch", "resnet20", "--model-arg", "width=3"], "no hyperparameter 'width'"),
    (["--resume", "0123abc"], "no checkpoint"),
    (["--arch", "resnet20", "--seed", "-1"], "seed must be an integer in [0, 2**32), got -1"),
    (["--arch", "resnet20", "--seeds", "0,4294967296"], "seed must be an integer in [0, 2**32)"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, capsys, argv, message):
    assert main([*argv, "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_unknown_flag_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), "--arch", "resnet20", "--bogus"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["run.py: error: unrecognized arguments: --bogus (see --help)"]


def test_dry_run_and_list(capsys):
    assert main(["--arch", "densenet_bc", "--growth-rate", "24", "--dry-run", "--recipe", "densenet-paper"]) == 0
    out = capsys.readouterr().out
    assert "growth_rate: 24" in out and "batch_size: 64" in out and "trainable params" in out
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "densenet_bc" in out and "densenet-paper" in out


def test_aux_classifier_losses_are_weighted():
    recipe = load_recipe("smoke")
    trainer = Trainer(torch.nn.Linear(2, 2), recipe, torch.device("cpu"), 10, amp=False, channels_last=False, compile=False)
    y = torch.tensor([0, 1])
    main_logits, aux = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    loss, logits = trainer.loss((main_logits, aux), y)
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(loss, ce(main_logits, y) + recipe.aux_loss_weight * ce(aux, y)) and logits is main_logits


def test_scientific_notation_in_overrides(capsys):
    """YAML 1.1 reads 1e-4 as a string; --set and --model-arg take it as the number a user means."""
    assert main(["--arch", "densenet_bc", "--set", "optimizer.weight_decay=1e-4", "--model-arg", "compression=5e-1",
                 "--depth", "40", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "weight_decay: 0.0001" in out and "compression: 0.5" in out


@pytest.mark.slow  # trains a model
def test_resume_of_finished_run_is_refused_and_changes_nothing(workdir, capsys):
    tmp, data_dir = workdir
    assert main([*TINY, "--data-dir", str(data_dir), "--epochs", "1"]) == 0
    client, (run,) = _runs(tmp)
    metrics_before = {k: len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
    capsys.readouterr()
    assert main(["--resume", "latest", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: run {run.info.run_id} has FINISHED; nothing to resume (resume a KILLED or FAILED run, or start a new one)"
    _, (after,) = _runs(tmp)
    assert {k: len(client.get_metric_history(run.info.run_id, k)) for k in after.data.metrics} == metrics_before
    assert len(mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")) == 1


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_after_the_last_epoch_ends_killed_and_resume_completes_the_record(workdir, capsys, signum):
    """A SIGTERM, or the SIGHUP of a closed terminal, while the results are being recorded still ends the
    run KILLED (never RUNNING); --resume then records the summary, checkpoints and model without training."""
    tmp, data_dir = workdir
    cfg = RunConfig(arch="resnet20", recipe=apply_overrides(load_recipe("smoke"), {"epochs": 1}), data_dir=str(data_dir))

    def signal_after_last_epoch(epoch: int, row: dict) -> None:
        os.kill(os.getpid(), signum)  # handled as a flag: fit() notices it after the epoch loop

    tracker = MlflowTracker(default_tracking_uri(), "cnn-zoo")
    with pytest.raises(Interrupted) as stopped:
        fit(cfg, tracker, callbacks=[signal_after_last_epoch], options=FitOptions(progress=False))
    assert stopped.value.signum == signum
    client, (run,) = _runs(tmp)
    assert run.info.status == "KILLED" and "final_test_acc" not in run.data.metrics
    assert main(["--resume", run.info.run_id, "--no-progress"]) == 0
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "final_test_acc" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]  # not trained again


@pytest.mark.slow
def test_checkpoint_written_before_weights_only_format_is_converted_once_and_resumes_exactly(workdir, capsys):
    """A last.pt exactly as the harness wrote it before checkpoints were weights-only (numpy's RNG state as
    an ndarray; no evaluation or wall seconds; amp and channels_last None, which meant fp32 NCHW on the CPU),
    interrupted at the start of epoch 2: --resume converts it once, with one line on stderr, and finishes in
    fp32 NCHW with the weights and metrics of an uninterrupted run under the old CPU defaults."""
    tmp, data_dir = workdir
    cfg = RunConfig(arch="resnet20", recipe=load_recipe("smoke"), data_dir=str(data_dir), amp=False,
                    channels_last=False)
    options = FitOptions(progress=False, log_model=False)
    ref = fit(replace(cfg, output_dir=str(tmp / "ref")), options=options)

    def sigterm_after_epoch_1(epoch: int, row: dict) -> None:
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        fit(cfg, callbacks=[sigterm_after_epoch_1], options=options)
    (last,) = Path("outputs/checkpoints").glob("*/last.pt")
    old = old_format(ckpt_io.load(last))
    assert tuple(old) == OLD_CHECKPOINT_KEYS and old["epoch"] == 1 and old["partial"]["step"] == 0
    torch.save(old, last)  # as the old save_atomic did
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(last)
    capsys.readouterr()

    assert main(["--resume", last.parent.name, "--no-progress"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "converted" in line]
    assert notes == [f"note: converted checkpoint {last} to the weights-only format (it was written by an older "
                     f"version of the harness)"]
    resumed, reference = torch.load(last, weights_only=True), torch.load(ref.checkpoint_dir / "last.pt", weights_only=True)
    assert tuple(resumed) == CHECKPOINT_KEYS
    assert (resumed["config"]["amp"], resumed["config"]["channels_last"]) == (False, False)  # pinned, then recorded
    assert _strip_timing(resumed["history"]) == _strip_timing(reference["history"])
    assert all(torch.equal(reference["model"][k], resumed["model"][k]) for k in reference["model"])
    ckpt_io.load(last)
    assert capsys.readouterr().err == ""  # converted once: nothing more to say


@pytest.mark.slow  # trains a model
def test_resume_takes_device_and_data_flags_and_refuses_other_data(workdir, tmp_path_factory, capsys):
    tmp, data_dir = workdir
    assert main([*TINY, "--data-dir", str(data_dir), "--epochs", "2", "--no-tracking"]) == 0
    (run_dir,) = (tmp / "outputs" / "checkpoints").glob("*")
    ckpt = ckpt_io.load(run_dir / "last.pt")
    ckpt["epoch"], ckpt["history"] = 1, ckpt["history"][:1]  # pretend epoch 2 never ran
    torch.save(ckpt, run_dir / "last.pt")
    before = (run_dir / "last.pt").read_bytes()
    other = make_image_folder(tmp_path_factory.mktemp("other"), 20, 5, CIFAR10_CLASSES, fmt="jpg")
    capsys.readouterr()
    assert main(["--resume", run_dir.name, "--data-dir", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "is not the data the run trained on" in err and len(err.splitlines()) == 1
    assert (run_dir / "last.pt").read_bytes() == before
    moved = tmp / "moved"
    shutil.copytree(data_dir, moved)  # the same archive somewhere else: accepted
    assert main(["--resume", run_dir.name, "--data-dir", str(moved), "--device", "cpu", "--no-progress"]) == 0
    assert ckpt_io.load(run_dir / "last.pt")["config"]["data_dir"] == str(moved)


@pytest.mark.slow  # trains a model
def test_progress_bar_shows_rate_and_eta_on_request(workdir, capsys):
    tmp, data_dir = workdir
    cfg = RunConfig(arch="resnet20", recipe=apply_overrides(load_recipe("smoke"), {"epochs": 1}), data_dir=str(data_dir))
    fit(cfg, options=FitOptions(progress=True, log_model=False))
    err = capsys.readouterr().err
    assert re.search(r"resnet20 1/1: +\d+%.*img/s\]", err), err  # tqdm: percent, rate ...
    assert re.search(r"<\d\d:\d\d", err), err  # ... and the ETA
    fit(cfg, options=FitOptions(progress=None, log_model=False))  # stderr is not a terminal here: no bar
    assert "img/s]" not in capsys.readouterr().err


def test_runconfig_roundtrip():
    cfg = RunConfig(arch="resnet20", recipe=load_recipe("smoke"), model={"shortcut": "B"})
    assert saved_config({"config": cfg.to_dict()}) == cfg


@pytest.mark.slow  # trains a model
def test_retain_freed_memory_stops_refaulting_big_allocations_and_release_gives_it_back():
    """After retain_freed_memory(), a freed 128 MB buffer is reused rather than unmapped and faulted in
    again: once the heap has grown to fit (one or two rounds: small allocations in between can leave the
    freed chunk just too small for the next aligned request), rounds cost (almost) no new page faults.
    The freed buffer stays resident until release_freed_memory() hands it back. In a fresh process whose heap
    is a training process's: after importing experiments.fit and all it imports. (With torch alone, the small
    allocations of each round split the previous round's freed buffer and no round reuses it.)"""
    code = """
import resource, torch
import experiments.fit
from experiments.runtime import release_freed_memory, retain_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(32_000_000)  # 128 MB, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mib():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmRSS:"))
    return int(line.split()[1]) // 1024

faults(); default = faults()
assert retain_freed_memory()
retained = sum([faults() for _ in range(6)][3:])  # steady state: the last three rounds
held = rss_mib()
assert release_freed_memory()
print(default, retained, held - rss_mib())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    default, retained, released_mib = map(int, proc.stdout.split())
    assert default > 1000 and retained < default / 20, (default, retained)
    assert released_mib >= 100, released_mib  # the freed 122 MiB buffer left the resident set


# ----------------------------------------------------------------------------------------------
# Device defaults, signals, divergence and the run-time estimate
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, native", [("fpu sse2 avx512f avx512_bf16 avx512_vnni", True),
                                           ("fpu sse2 amx_bf16 amx_tile", True), ("fpu sse2 avx512f avx2", False)])
def test_native_cpu_bf16_reads_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n")
    assert native_cpu_bf16(cpuinfo) is native
    assert native_cpu_bf16(tmp_path / "missing") is False  # not Linux: fp32


def test_speed_settings_defaults_and_the_compile_payback_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cost = runtime.COMPILE_COSTS["cpu"]
    # the run length (eager seconds) at which compiling starts to pay
    breakeven = runtime.COMPILE_PAYBACK * cost.compile_seconds / (1 - 1 / cost.speedup) * cost.eager_flops_per_second
    short = runtime.speed_settings(cpu, None, None, None, 0.99 * breakeven)
    long = runtime.speed_settings(cpu, None, None, None, 1.01 * breakeven)
    assert (short.amp, short.channels_last, short.compile) == (native_cpu_bf16(), True, False)
    assert long.compile and long.compile_rule.startswith("on: saves ~") and short.compile_rule.startswith("off: saves ~")
    explicit = runtime.speed_settings(cpu, False, False, False, 100 * breakeven)  # the flags always win
    assert (explicit.amp, explicit.channels_last, explicit.compile) == (False, False, False)
    assert runtime.speed_settings(cpu, True, None, True, 0.0).compile_rule == "explicit (--compile/--no-compile)"
    gpu = runtime.speed_settings(cuda, None, None, None, 100 * breakeven)  # nothing measured on CUDA: no compile
    assert (gpu.amp, gpu.channels_last, gpu.compile) == (True, True, False) and "no measured" in gpu.compile_rule


def test_first_ctrl_c_says_what_happens_at_once_and_the_second_aborts(capfd):
    with graceful_signals() as pending:
        os.kill(os.getpid(), signal.SIGINT)
        assert pending == [signal.SIGINT]
        assert capfd.readouterr().err == ("\nCtrl-C received: the run stops after the current step and writes a "
                                          "checkpoint (--resume continues it); press Ctrl-C again to abort at once\n")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with graceful_signals(announce=False) as pending:  # torchrun's other ranks stay silent
        os.kill(os.getpid(), signal.SIGTERM)
        assert pending == [signal.SIGTERM] and capfd.readouterr().err == ""


def _rows(*loss_acc: tuple[float, float]) -> list[dict]:
    return [{"epoch": e, "train_loss": loss, "train_acc": acc} for e, (loss, acc) in enumerate(loss_acc, 1)]


def test_divergence_rules():
    healthy = _rows((2.0, 25.0), (1.5, 45.0), (1.2, 58.0), (1.0, 65.0), (2.5, 50.0))  # a spike, not divergence
    assert monitor.divergence(healthy, 10, warmup_epochs=0) is None
    epoch, why = monitor.divergence(_rows((2.3, 11.0), (9.8, 10.0)), 10, warmup_epochs=0)
    assert epoch == 2 and why.startswith("training loss 9.8 at epoch 2, above 3x ln(10) = 6.91")
    epoch, why = monitor.divergence(_rows((1.0, 60.0), (0.8, 70.0), (3.1, 30.0)), 10, warmup_epochs=0)
    assert epoch == 3 and "above 3x its first value 1" in why  # blew up mid-run, still under 3 ln(10)
    at_chance = _rows(*[(2.30, 10.4)] * 6)
    assert monitor.divergence(at_chance[:3], 10, warmup_epochs=0) is None  # too early to tell
    assert monitor.divergence(at_chance[:5], 10, warmup_epochs=5) is None  # still warming up
    epoch, why = monitor.divergence(at_chance, 10, warmup_epochs=5)
    assert epoch == 6 and why == "training accuracy 10.4% at epoch 6, at chance (10% for 10 classes) after warm-up"
    assert monitor.divergence(_rows(*[(4.5, 1.2)] * 4), 100, warmup_epochs=0)[0] == 4  # CIFAR-100: chance is 1%
    assert monitor.divergence(_rows(*[(4.0, 8.0)] * 4), 100, warmup_epochs=0) is None


def test_estimate_and_quickstart_lines():
    length = monitor.RunLength(train_steps=70_200, batch_size=128, eval_batches=200 * 30, epochs=200, resumed=False)
    seconds = length.seconds(0.125, 0.1)
    assert seconds == 70_200 * 0.125 + 6000 * 0.1
    assert monitor.estimate_line(length, seconds, 1024) == ("estimated 2h 36m for 200 epochs (train + eval) on this "
                                                            "machine at 1,024 img/s")
    resumed = monitor.RunLength(1, 128, 0, 1, resumed=True)
    assert monitor.estimate_line(resumed, 65, 9.4) == ("estimated 1m 05s for the remaining 1 epoch (train + eval) "
                                                  "on this machine at 9 img/s")
    assert monitor.eval_batches_left(1, 10, 3, per_eval=30) == 4 * 30  # epochs 3, 6, 9 and the last
    assert monitor.quickstart_line("my data", "cifar100", 1e14, 1e11).endswith(
        "python experiments/run.py --arch resnet20 --recipe quickstart --dataset cifar100 --data-dir 'my data'")


@pytest.mark.slow
def test_a_diverged_run_is_flagged_and_finishes(workdir, capsys, monkeypatch):
    """A huge but finite learning rate: the run is tagged and warned about once, and still ends FINISHED.
    (And with the quickstart threshold at 0 s, a CPU run offers the quickstart command.)"""
    tmp, data_dir = workdir
    monkeypatch.setattr(fit_module, "QUICKSTART_AFTER_SECONDS", 0.0)
    assert main([*TINY, "--data-dir", str(data_dir), "--epochs", "4", "--lr", "3"]) == 0
    out, err = capsys.readouterr()
    _, (run,) = _runs(tmp)
    assert run.info.status == "FINISHED"
    reason = run.data.tags["cnn_zoo.diverged"]
    assert re.fullmatch(r"training loss \S+ at epoch \d, above 3x ln\(10\) = 6.91 \(a uniform guess scores ln\(10\)\)",
                        reason), reason
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: [resnet20] the run looks diverged: {reason}; it trains on to the end, tagged "
                        f"cnn_zoo.diverged"]
    assert f"python experiments/run.py --arch resnet20 --recipe quickstart --data-dir {data_dir}" in out
