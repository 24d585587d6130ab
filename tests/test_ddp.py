"""torchrun with 2 Gloo processes trains the same weights as one process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _cmd(data_dir: Path, out: Path, *launcher: str) -> list[str]:
    # AlexNet has no BatchNorm: on the CPU there is no SyncBatchNorm, so per-rank BN statistics would
    # (correctly) differ from one process; on CUDA the harness converts BN to SyncBatchNorm.
    return [*launcher, str(REPO / "experiments" / "run.py"), "--arch", "alexnet", "--recipe", "smoke",
            "--data-dir", str(data_dir), "--device", "cpu", "--no-progress", "--output-dir", str(out),
            "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}", "--epochs", "2"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, tiny_image_folder_archive):
    env = {**os.environ, "CNN_ZOO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    data_dir = tiny_image_folder_archive.parent
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(_cmd(data_dir, single, sys.executable), env=env, check=True, capture_output=True, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(_cmd(data_dir, multi, *torchrun), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout and proc.stdout.count("epoch 2/2") == 1  # only rank 0 reports

    def final(out: Path) -> dict:
        (last,) = (out / "checkpoints").glob("*/last.pt")  # only rank 0 writes checkpoints
        return torch.load(last, weights_only=False)

    a, b = final(single), final(multi)
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    for ra, rb in zip(a["history"], b["history"]):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["val_acc"] == ra["val_acc"] and rb["test_acc"] == ra["test_acc"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{multi / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnn-zoo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 alone logs
