"""torchrun with 2 Gloo processes trains the same weights as one process with the same global batch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from tests.helpers import REPO



TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _cmd(data_dir: Path, out: Path, *launcher: str, epochs: int = 2) -> list[str]:
    # AlexNet has neither BatchNorm nor dropout: on the CPU there is no SyncBatchNorm, so per-rank BN
    # statistics would (correctly) differ from one process; on CUDA the harness converts BN to SyncBatchNorm.
    # fp32 NCHW (--no-amp --no-channels-last), as these tolerances assume: a rank's half batch and the whole
    # batch take other oneDNN kernels, which round differently: by far more than 1e-4 under bf16 autocast, and
    # by up to ~1e-4 absolute after 4 epochs with channels_last. A resumed run keeps the recorded settings.
    return [*launcher, str(REPO / "experiments" / "run.py"), "--arch", "alexnet", "--recipe", "smoke",
            "--data-dir", str(data_dir), "--device", "cpu", "--no-progress", "--output-dir", str(out),
            "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", "--epochs", str(epochs), "--no-amp",
            "--no-channels-last"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "CNN_ZOO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _final(out: Path) -> dict:
    (last,) = (out / "checkpoints").glob("*/last.pt")  # only rank 0 writes checkpoints
    return torch.load(last, weights_only=False)


def _assert_same_training(a: dict, b: dict) -> None:
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["val_acc"] == ra["val_acc"] and rb["test_acc"] == ra["test_acc"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, tiny_image_folder_archive):
    env = _env(tmp_path)
    data_dir = tiny_image_folder_archive.parent
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(_cmd(data_dir, single, sys.executable), env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.run(_cmd(data_dir, multi, *TORCHRUN), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout and proc.stdout.count("epoch 2/2") == 1  # only rank 0 reports
    _assert_same_training(_final(single), _final(multi))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{multi / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnn-zoo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 alone logs


@pytest.mark.slow
def test_sigterm_to_torchrun_then_resume_under_torchrun(tmp_path, tiny_image_folder_archive):
    """SIGTERM to the launcher: both ranks stop at the same step, rank 0 checkpoints, the run ends KILLED;
    `torchrun ... --resume` finishes it with the weights of an uninterrupted single-process run."""
    env = _env(tmp_path)
    data_dir = tiny_image_folder_archive.parent
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(_cmd(data_dir, single, sys.executable, epochs=4), env=env, check=True, capture_output=True,
                   timeout=300)
    proc = subprocess.Popen(_cmd(data_dir, multi, *TORCHRUN, epochs=4), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((multi / "checkpoints").glob("*/last.pt")):  # epoch 1 done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0, out + err
    assert err.count("SIGTERM received: checkpoint written") == 1, err[-3000:]  # rank 0 alone says so
    (run_dir,) = (multi / "checkpoints").glob("*")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{multi / 'mlflow.db'}")
    assert client.get_run(run_dir.name).info.status == "KILLED"
    assert _final(multi)["epoch"] < 4
    resumed = subprocess.run([*TORCHRUN, str(REPO / "experiments" / "run.py"), "--resume", run_dir.name, "--no-progress",
                              "--output-dir", str(multi)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client.get_run(run_dir.name).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_dir.name, "val_acc")] == [1, 2, 3, 4]
    _assert_same_training(_final(single), _final(multi))
