"""Hostile input: one clear line, a non-zero exit, and nothing already recorded lost.

docs/SCALEOUT.md has the table (input | what the program says | exit code | test). Messages are pinned
here or, where a test already existed, in tests/test_harness.py and tests/test_data.py; every case here
also checks that a run recorded before (its MLflow rows, artifacts and checkpoints) is byte-for-byte intact.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

import zoo
from experiments import checkpoint as ckpt_io
from experiments.run import main
from tests.experiments.checkpoint_formats import CreatesFile, old_format
from tests.helpers import CIFAR10_CLASSES, REPO, make_image_folder, pack_archive

TINY = ["--recipe", "smoke", "--arch", "resnet20", "--no-progress"]
STORE_TABLES = ("experiments", "runs", "params", "metrics", "latest_metrics", "tags", "inputs", "logged_models")
NOT_RECORDS = ("cache",)  # derived data that may be (re)built at any time


@dataclass(frozen=True)
class Recorded:
    root: Path  # working dir: mlflow.db, mlruns/, outputs/
    data_dir: Path
    run_id: str

    @property
    def last(self) -> Path:
        return self.root / "outputs" / "checkpoints" / self.run_id / ckpt_io.LAST


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_image_folder_archive) -> Recorded:
    """One finished run (1 epoch) in the default store and output dir: what every case must leave intact."""
    root = tmp_path_factory.mktemp("recorded")
    data_dir = tiny_image_folder_archive.parent
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("CNN_ZOO_CACHE", str(root / "cache"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main([*TINY, "--data-dir", str(data_dir), "--epochs", "1", "--run-name", "recorded"]) == 0
    mlflow.set_tracking_uri(None)
    (run_dir,) = (root / "outputs" / "checkpoints").iterdir()
    return Recorded(root, data_dir, run_dir.name)


@pytest.fixture
def ws(recorded, monkeypatch) -> Recorded:
    monkeypatch.chdir(recorded.root)
    monkeypatch.setenv("CNN_ZOO_CACHE", str(recorded.root / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield recorded
    mlflow.set_tracking_uri(None)


def snapshot(root: Path) -> dict:
    """Every row of the store's run tables and the sha256 of every recorded file under ``root``."""
    db = sqlite3.connect(f"file:{root / 'mlflow.db'}?mode=ro", uri=True)
    try:
        rows = {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}"))) for t in STORE_TABLES}
    finally:
        db.close()
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in NOT_RECORDS and not p.name.startswith("mlflow.db"):
            files[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return {"rows": rows, "files": files}


def assert_kept(before: dict, after: dict) -> None:
    """Everything in ``before`` is still in ``after``, unchanged (new records may have been added)."""
    for table, rows in before["rows"].items():
        missing = set(rows) - set(after["rows"][table])
        assert not missing, f"{table}: rows changed or lost: {sorted(missing)[:3]}"
    changed = {k for k, v in before["files"].items() if after["files"].get(k) != v}
    assert not changed, f"files changed or lost: {sorted(changed)}"


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Bad input rejected before any run starts: exit 2, exactly one line, store and outputs untouched
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_data")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "cifar10.tar.gz").write_bytes(random.Random(0).randbytes(5000))
    src = make_image_folder(root / "src", 20, 5, CIFAR10_CLASSES)
    victim = src / "test" / "frog" / "0001.png"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    truncated = root / "truncated"
    truncated.mkdir()
    pack_archive(src, truncated / "cifar10.tar.gz")
    return {"corrupt": corrupt, "truncated": truncated}


BAD_INPUT = {  # id: (argv after TINY-like defaults, fragment of the one line)
    "unknown-arch": (["--arch", "resnet21"], "error: unknown model 'resnet21'. Did you mean resnet32, resnet20, resnet18?"),
    "growth-rate-0": (["--arch", "densenet_bc", "--growth-rate", "0"], "error: growth_rate must be an integer >= 1, got 0"),
    "compression-1.5": (["--arch", "densenet_bc", "--compression", "1.5"], "error: compression θ must be a number in (0, 1], got 1.5"),
    "compression-0": (["--arch", "densenet_bc", "--compression", "0"], "error: compression θ must be a number in (0, 1], got 0.0"),
    "depth-101": (["--arch", "densenet_bc", "--depth", "101"], "error: DenseNet-BC depth must satisfy (depth - 4) % 6 == 0"),
    "unknown-recipe-key": (["--arch", "resnet20", "--set", "optimizer.nope=1"], "error: unknown recipe key 'optimizer.nope'; keys: "),
    "recipe-wrong-type": (["--arch", "resnet20", "--set", "epochs=many"], "error: override: Recipe.epochs must be an integer, got 'many'"),
    "missing-data-dir": (["--arch", "resnet20", "--data-dir", "/nonexistent/data"], "error: data directory /nonexistent/data does not exist"),
    "corrupt-archive": (["--arch", "resnet20", "--data-dir", "{corrupt}"], "is corrupt or truncated (ReadError: "),
    "truncated-image": (["--arch", "resnet20", "--data-dir", "{truncated}"], "error: cannot decode image test/frog/0001.png in archive "),
    "resume-other-arch": (["--resume", "{run_id}", "--arch", "resnet32"], "refusing to resume run {run_id}: architecture resnet20 != resnet32"),
    "resume-other-recipe": (["--resume", "{run_id}", "--recipe", "fast"], "refusing to resume run {run_id}: recipe smoke ("),
}


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ws, bad_data, capsys, case):
    argv, fragment = BAD_INPUT[case]
    fill = {"run_id": ws.run_id, **{k: str(v) for k, v in bad_data.items()}}
    argv = [a.format(**fill) for a in argv]
    if "--resume" not in argv:
        argv = ["--recipe", "smoke", "--no-progress", "--data-dir", str(ws.data_dir), *argv]  # last --data-dir wins
    before = snapshot(ws.root)
    assert main(argv) == 2  # tracked: the default store of the working dir holds the recorded run
    err = capsys.readouterr().err
    assert fragment.format(**fill) in one_error_line(err) and len(err.strip().splitlines()) == 1, err
    assert snapshot(ws.root) == before  # no new run, no new checkpoint, nothing touched


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_or_truncated_checkpoint_on_resume(ws, capsys, tmp_path, damage):
    """The recorded run's last.pt, damaged in a copy of its output dir, then resumed from there."""
    content = ws.last.read_bytes()
    copy = ws.root / f"damaged-{damage}" / "checkpoints" / ws.run_id / ckpt_io.LAST
    copy.parent.mkdir(parents=True)
    copy.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"not a checkpoint at all")
    before = snapshot(ws.root)
    assert main(["--resume", ws.run_id, "--output-dir", str(copy.parents[2]), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"checkpoint {copy} is corrupt or truncated (" in line and line.endswith("delete it to restart, or resume another run")
    assert snapshot(ws.root) == before  # the damaged file is left for the user to inspect; the run is untouched


@pytest.mark.slow  # trains a model
def test_checkpoints_the_harness_writes_load_weights_only(ws):
    for name in (ckpt_io.LAST, ckpt_io.BEST):
        path = ws.last.with_name(name)
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], name
        assert torch.load(path, weights_only=True)["arch"] == "resnet20"


@pytest.mark.slow  # trains a model
@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
@pytest.mark.parametrize("how", ["open", "os.system"])
def test_checkpoint_that_would_run_code_is_refused_unread(ws, capsys, fmt, how):
    """A last.pt whose unpickling would create a file (a stand-in for any command): --resume refuses it in
    one line naming it, exit 2, and the file never appears."""
    marker = ws.root / f"pwned-{fmt}-{how}"
    crafted = {"model": {}, "config": {}, "payload": CreatesFile(marker, how)}
    copy = ws.root / f"crafted-{fmt}-{how}" / "checkpoints" / ws.run_id / ckpt_io.LAST
    copy.parent.mkdir(parents=True)
    if fmt == "torch.save":
        torch.save(crafted, copy)
    else:
        copy.write_bytes(pickle.dumps(crafted))
    before = snapshot(ws.root)
    assert main(["--resume", ws.run_id, "--output-dir", str(copy.parents[2]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert len(err.strip().splitlines()) == 1, err
    assert line.startswith(f"error: checkpoint {copy} names ") and "refusing to load it (unpickling it could run code)" in line
    assert not marker.exists()
    assert snapshot(ws.root) == before  # the crafted file is left for the user to inspect


@pytest.mark.slow  # trains a model
def test_old_format_checkpoint_with_numpy_data_elsewhere_is_refused(ws, capsys):
    """The old format holds exactly one ndarray (numpy's RNG state); arrays anywhere else mean another writer."""
    old = old_format(ckpt_io.load(ws.last))
    old["history"][0]["val_acc"] = np.float64(1.0).reshape(1)
    copy = ws.root / "numpy-elsewhere" / "checkpoints" / ws.run_id / ckpt_io.LAST
    copy.parent.mkdir(parents=True)
    torch.save(old, copy)
    before = snapshot(ws.root)
    assert main(["--resume", ws.run_id, "--output-dir", str(copy.parents[2]), "--no-progress"]) == 2
    assert one_error_line(capsys.readouterr().err) == (f"error: checkpoint {copy} was not written by this harness "
                                                       f"(numpy data outside its RNG state)")
    assert snapshot(ws.root) == before  # not converted, not rewritten


def test_bit_npz_with_pickled_objects_is_refused_unread(tmp_path):
    """zoo.load_bit_weights reads .npz with allow_pickle=False: an object array is an error, never unpickled."""
    model = zoo.bit.bit_resnetv2((1, 1, 1, 1), base_width=8)
    keys = list(zoo.bit._bit_key_map(model))  # exactly the keys it expects, so it reaches the arrays
    marker = tmp_path / "pwned-npz"
    evil = np.empty(1, dtype=object)
    evil[0] = CreatesFile(marker, "open")
    np.savez(tmp_path / "evil.npz", **{k: evil for k in keys})
    with pytest.raises(ValueError, match="allow_pickle"):
        zoo.load_bit_weights(model, tmp_path / "evil.npz")
    assert not marker.exists()


@pytest.mark.slow  # trains a model
def test_non_finite_loss_fails_only_the_new_run(ws, capsys):
    before = snapshot(ws.root)
    assert main([*TINY, "--data-dir", str(ws.data_dir), "--epochs", "1", "--lr", "1e30", "--run-name", "diverges"]) == 1
    assert one_error_line(capsys.readouterr().err) == ("error: non-finite training loss in epoch 1; lower the learning rate "
                                                        "(--lr) or check the data (run marked FAILED)")
    after = snapshot(ws.root)
    assert_kept(before, after)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws.root / 'mlflow.db'}")
    (new,) = client.search_runs([client.get_run(ws.run_id).info.experiment_id], "attributes.run_name = 'diverges'")
    assert new.info.status == "FAILED" and "non-finite" in new.data.tags["failure"]
    assert client.get_run(ws.run_id).info.status == "FINISHED"


@pytest.mark.slow  # trains a model
def test_unreachable_tracking_server_fails_fast_before_training(ws, capsys, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("CNN_ZOO_CACHE", str(cache))
    before = snapshot(ws.root)
    t0 = time.monotonic()
    assert main([*TINY, "--data-dir", str(ws.data_dir), "--tracking-uri", f"http://127.0.0.1:{port}"]) == 2
    assert time.monotonic() - t0 < 10
    assert one_error_line(capsys.readouterr().err) == (
        f"error: tracking server http://127.0.0.1:{port} is unreachable ([Errno 111] Connection refused); "
        f"start it, fix --tracking-uri, or train with --no-tracking")
    assert not cache.exists()  # the data was never loaded
    assert snapshot(ws.root) == before  # no checkpoint dir, no run


# ----------------------------------------------------------------------------------------------
# Subprocesses: a race on a fresh SQLite store, a disk that fills up
# ----------------------------------------------------------------------------------------------

RACER = r"""
import sys, time
from pathlib import Path
import mlflow
from experiments.tracking import MlflowTracker
uri, start, i = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
Path(f"ready-{i}").touch()
deadline = time.monotonic() + 120
while not start.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
tracker = MlflowTracker(uri, "race", system_metrics=False)  # schema creation + experiment, all at once
tracker.start(run_name=f"racer-{i}")
tracker.log_metrics({"racer": float(i)}, step=0)
tracker.end("FINISHED")
"""


@pytest.mark.slow
def test_many_processes_open_a_fresh_sqlite_store_at_once(tmp_path):
    n = 6
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, "sqlite:///x.db", "go", str(i)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < n:  # every process imported mlflow: start together
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        assert not (tmp_path / "x.db").exists()
        (tmp_path / "go").touch()
        results = [(p.wait(timeout=180), p.communicate()[1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(rc == 0 for rc, _ in results), "\n".join(err[-2000:] for rc, err in results if rc)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'x.db'}")
    assert [e.name for e in client.search_experiments() if e.name == "race"] == ["race"]
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"racer-{i}" for i in range(n)]
    assert all(r.info.status == "FINISHED" and r.data.metrics["racer"] == int(r.info.run_name[6:]) for r in runs)


# run.py, except that once the first last.pt is written the disk is "full": the process may no longer
# write any file past that size (RLIMIT_FSIZE; SIGXFSZ ignored, so write() fails with EFBIG instead).
DISK_FILLS_UP = r"""
import resource, sys
from experiments import checkpoint as ckpt_io
_save_atomic = ckpt_io.save_atomic
def save_atomic(obj, path):
    _save_atomic(obj, path)
    if path.name == ckpt_io.LAST and resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size - 1, resource.RLIM_INFINITY))
ckpt_io.save_atomic = save_atomic
from experiments.run import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_disk_full_while_writing_checkpoint_keeps_the_previous_one(tmp_path, tiny_image_folder_archive):
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "PYTHONPATH": str(REPO), "CNN_ZOO_CACHE": str(tmp_path / "cache")}
    argv = [*TINY, "--data-dir", str(tiny_image_folder_archive.parent), "--epochs", "3"]
    proc = subprocess.run([sys.executable, "-c", DISK_FILLS_UP, *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    (run_dir,) = (tmp_path / "outputs" / "checkpoints").iterdir()
    last = run_dir / ckpt_io.LAST
    assert line == (f"error: cannot write checkpoint {Path('outputs/checkpoints') / run_dir.name / ckpt_io.LAST} "
                    f"([Errno 27] File too large); the previous checkpoint is intact; free disk space or choose "
                    f"another --output-dir, then --resume")
    assert sorted(p.name for p in run_dir.iterdir()) == [ckpt_io.BEST, ckpt_io.LAST]  # no temporary file left
    ckpt = ckpt_io.load(last)  # the epoch-1 checkpoint, whole
    assert ckpt["epoch"] == 1 and ckpt["run_id"] == run_dir.name and len(ckpt["history"]) == 1
    zoo.create_model("resnet20", num_classes=10).load_state_dict(ckpt["model"])
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_dir.name).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_dir.name, "val_acc")] == [1]  # epoch 1 stays recorded

    # Space is back: the advice in the message works.
    resumed = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), "--resume", run_dir.name,
                              "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client.get_run(run_dir.name).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_dir.name, "val_acc")] == [1, 2, 3]
