"""The run's time estimate: the quickstart offer timed at this run's FLOP rate, and a compiled run's preview from
eager steps, which must leave everything the run uses as it was."""
from __future__ import annotations

import copy
import dataclasses
import random
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import zoo
from experiments import fit as fit_module
from experiments import monitor
from experiments.config import RunConfig, load_recipe
from experiments.data import ArrayDataset, DatasetBundle
from experiments.fit import Forecast, build_trainer, make_batches, make_plan, quickstart_flops
from experiments.resume import Progress
from experiments.runtime import COMPILE_COSTS, DistEnv
from experiments.trainer import Trainer
from experiments.run import main
from tests.helpers import CIFAR10_CLASSES

RESNET20_TRAIN_FLOPS = 3 * 81_102_080  # per image: forward + backward, as fit() counts them


def _bundle(n_train: int, n_test: int = 40) -> DatasetBundle:
    """CIFAR-10-shaped data without pixels worth storing: every image is the same array (a zero-stride view)."""
    def split(n: int) -> ArrayDataset:
        images = np.broadcast_to(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(1, 32, 32, 3), (n, 32, 32, 3))
        return ArrayDataset(images, np.arange(n, dtype=np.int64) % 10)

    return DatasetBundle("cifar10", split(n_train), split(n_test), CIFAR10_CLASSES, "0" * 64, "synthetic",
                         (0.5,) * 3, (0.25,) * 3)


def test_quickstart_is_timed_at_this_runs_flop_rate():
    # The quickstart on CIFAR-10: ResNet-20, 10 epochs of 351 batches of 128 (45,000 images after validation).
    flops = quickstart_flops(_bundle(50_000))
    assert flops == RESNET20_TRAIN_FLOPS * 10 * 351 * 128
    # ResNet-20 at 290 img/s (an AVX2 CPU in fp32) trains its 449,280 images in 1,549 s; a run of a model with
    # 7x the FLOPs per image at 41 img/s runs at about the same FLOP rate, so it says about the same.
    line = monitor.quickstart_line("data", "cifar10", flops, 290 * RESNET20_TRAIN_FLOPS)
    assert line == ("that is long: the quickstart (resnet20, recipe quickstart) trains to a meaningful result in "
                    "about 26 min on this machine (at this run's 71 GFLOP/s); run\n"
                    "  python experiments/run.py --arch resnet20 --recipe quickstart --data-dir data")
    assert "about 26 min" in monitor.quickstart_line("data", "cifar10", flops, 41 * 7 * RESNET20_TRAIN_FLOPS)
    assert "about 7 min" in monitor.quickstart_line("data", "cifar10", flops, 1000 * RESNET20_TRAIN_FLOPS)
    assert "about 2h 09m" in monitor.quickstart_line("data", "cifar10", flops, 58 * RESNET20_TRAIN_FLOPS)
    # data too small for the quickstart's 5,000 validation images: no time claimed
    assert quickstart_flops(_bundle(200)) == 0
    assert "trains to a meaningful result sooner; run" in monitor.quickstart_line("data", "cifar10", 0, 1e11)


def test_preview_line():
    length = monitor.RunLength(train_steps=70_200, batch_size=128, eval_batches=6000, epochs=200, resumed=False)
    assert monitor.preview_line(length, 3 * 3600 + 5 * 60, 50.4, 2, 1.18, 112.6) == (
        "estimated 3h 05m for 200 epochs (train + eval + ~1m 53s compile) on this machine: 2 eager steps at 50 "
        "img/s x 1.18 compiled (tabulated); a measured estimate follows after compilation")


class _Tiny(nn.Module):
    """BatchNorm buffers and dropout (the global RNG): what a preview must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _forecast(compile: bool, lines: list[str]) -> Forecast:
    cfg = RunConfig(arch="resnet20", recipe=load_recipe("smoke"), device="cpu", compile=compile, data_dir="data")
    plan = make_plan(cfg, DistEnv(), torch.device("cpu"), _bundle(200))
    trainer = build_trainer(plan, _Tiny())
    return Forecast(plan, trainer, make_batches(plan, True), Progress(), lambda line, **_: lines.append(line),
                    forward_flops=1e6)


def _state(f: Forecast) -> dict:
    return {"model": {k: v.clone() for k, v in f.trainer.model.state_dict().items()},
            "optimizer": copy.deepcopy(f.trainer.optimizer.state_dict()),
            "scheduler": f.trainer.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "data_rng": f.batches.generator.get_state(), "numpy_rng": np.random.get_state()[1].copy(),
            "python_rng": random.getstate()}


def test_compiled_run_previews_from_eager_steps_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(fit_module, "QUICKSTART_AFTER_SECONDS", 0.0)
    lines: list[str] = []
    forecast = _forecast(compile=True, lines=lines)

    def compiled(*_):
        raise AssertionError("the preview ran the compiled forward")

    forecast.trainer.forward = forecast.trainer.eval_forward = compiled
    before = _state(forecast)
    forecast.preview()
    preview, quickstart = lines
    assert re.fullmatch(r"\[resnet20\] estimated \d+m \d\ds for 2 epochs \(train \+ eval \+ ~1m 53s compile\) on "
                        r"this machine: 2 eager steps at [\d,]+ img/s x 1\.18 compiled \(tabulated\); a measured "
                        r"estimate follows after compilation", preview), preview
    assert quickstart.startswith("[resnet20] that is long: the quickstart")
    after = _state(forecast)
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])  # BN buffers too
    assert all(p.grad is None for p in forecast.trainer.model.parameters())
    assert torch.equal(before["torch_rng"], after["torch_rng"])  # dropout drew from a forked RNG
    assert torch.equal(before["data_rng"], after["data_rng"])
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"]) and before["python_rng"] == after["python_rng"]
    assert before["optimizer"] == after["optimizer"] and before["scheduler"] == after["scheduler"]
    # the measured estimate after compilation does not offer the quickstart again
    forecast.trainer.forward = forecast.trainer.eval_forward = forecast.trainer.model
    forecast.report(1, step_seconds=1.0)
    assert len(lines) == 3 and lines[2].startswith("[resnet20] estimated ")


def test_eager_run_has_no_preview():
    lines: list[str] = []
    _forecast(compile=False, lines=lines).preview()
    assert lines == [] and "cpu" in COMPILE_COSTS


@pytest.mark.slow  # trains twice
def test_a_run_with_the_preview_ends_bit_identical_to_one_without(tmp_path, monkeypatch, tiny_image_folder_archive,
                                                                 capsys):
    """The preview forced on in an eager run (compiling would only add minutes): dropout and BatchNorm make any
    RNG draw or buffer update of the real model show in the final weights."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CNN_ZOO_CACHE", str(tmp_path / "cache"))
    argv = ["--recipe", "smoke", "--arch", "densenet_bc:depth=10,growth_rate=4,drop_rate=0.2", "--no-progress",
            "--no-tracking", "--device", "cpu", "--data-dir", str(tiny_image_folder_archive.parent)]
    assert main([*argv, "--output-dir", "plain"]) == 0
    preview = Forecast.preview

    def as_if_compiled(self: Forecast) -> None:
        plan = self.plan
        self.plan = dataclasses.replace(plan, cfg=dataclasses.replace(plan.cfg, compile=True))
        try:
            preview(self)
        finally:
            self.plan = plan

    monkeypatch.setattr(Forecast, "preview", as_if_compiled)
    capsys.readouterr()
    assert main([*argv, "--output-dir", "previewed"]) == 0
    assert "a measured estimate follows after compilation" in capsys.readouterr().out
    states = []
    for out in ("plain", "previewed"):
        (last,) = (tmp_path / out / "checkpoints").glob("*/last.pt")
        ckpt = torch.load(last, weights_only=True)
        states.append((ckpt["model"], [row["train_loss"] for row in ckpt["history"]]))
    (plain, plain_losses), (previewed, previewed_losses) = states
    assert plain_losses == previewed_losses
    assert all(torch.equal(plain[k], previewed[k]) for k in plain)


@pytest.mark.slow  # compiles a small model (~1 min on a CPU)
def test_a_compiled_run_says_the_preview_before_its_first_step(tmp_path, monkeypatch, tiny_image_folder_archive,
                                                              capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CNN_ZOO_CACHE", str(tmp_path / "cache"))
    train_step = Trainer.train_step

    def announced(self: Trainer, x: torch.Tensor, y: torch.Tensor):
        print("<first step>", flush=True)
        monkeypatch.setattr(Trainer, "train_step", train_step)
        return train_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", announced)
    assert main(["--recipe", "smoke", "--arch", "densenet_bc:depth=10,growth_rate=4", "--no-progress", "--no-tracking",
                 "--device", "cpu", "--compile", "--epochs", "1",
                 "--data-dir", str(tiny_image_folder_archive.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    preview = next(i for i, line in enumerate(lines) if "a measured estimate follows after compilation" in line)
    measured = next(i for i, line in enumerate(lines) if re.search(r"estimated .* at [\d,]+ img/s$", line))
    assert preview < lines.index("<first step>") < measured, lines
