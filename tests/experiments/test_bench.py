"""experiments/bench.py: the comparison arithmetic, fit()'s setup per mode, the section clock, the baseline's data
pipeline, and a tiny CPU run end to end. No timing threshold is asserted anywhere (targets: docs/BENCHMARKS.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from experiments import bench
from experiments.config import RunConfig, apply_overrides, load_recipe
from experiments.data import ArrayDataset, DeviceLoader
from experiments.fit import build_model, make_plan
from experiments.runtime import DistEnv, native_bf16
from tests.helpers import REPO


MODE_FIELDS = {"images_per_second", "step_ms", "timed_seconds", "data_wait_fraction", "step_fractions",
               "eval_images_per_second", "peak_memory_bytes", "warmup_seconds", "compile_seconds", "graphs_compiled",
               "recompiles", "compile_cache_hits", "amp_bf16", "channels_last", "loss_finite", "epoch_seconds",
               "epoch_shares", "speedup_vs_baseline", "speedup_vs_fp32", "mfu_dtype", "mfu"}
META_FIELDS = {"device", "device_name", "torch", "torchvision", "python", "date", "command", "batch_size", "steps",
               "warmup", "modes", "recipe", "recipe_hash", "optimizer", "dataset", "epoch_sizes", "eval_images",
               "workers", "torch_threads", "cores", "peaks", "memory_metric", "flops_convention", "data_wait",
               "load_average_before_after"}
PEAKS = {"fp32": {"flops_per_second": 1e12}, "bf16": {"flops_per_second": 4e12}}


def test_throughput_and_ratio_arithmetic() -> None:
    assert bench.images_per_second(128, 50, 2.0) == 3200.0
    assert bench.ratio(3200.0, 800.0) == 4.0
    assert bench.ratio(3200.0, None) is None
    assert bench.overhead_ratio(10.3, 10.0) == pytest.approx(1.03)
    assert bench.memory_saving(1000, 550) == pytest.approx(0.45)
    assert bench.time_increase(10.0, 12.5) == pytest.approx(0.25)
    assert bench.compile_seconds(32.0, 4, 0.5) == 30.0
    assert bench.compile_seconds(1.9, 4, 0.5) == 0.0  # warm-up no slower than steady state: nothing compiled


def test_flops_convention_and_mfu() -> None:
    assert bench.training_flops_per_image(81_000_000) == 243_000_000  # training = 3x forward
    assert bench.matmul_flops(1024) == 2 * 1024 ** 3
    # 1 GFLOP forward = 3 GFLOP per trained image; 1000 img/s = 3 TFLOP/s = 30% of a 10 TFLOP/s peak
    assert bench.mfu(10 ** 9, 1000.0, 10e12) == pytest.approx(0.3)


def test_compare_modes_relates_every_mode_to_the_baseline_and_fp32() -> None:
    modes = {"baseline": {"images_per_second": 500.0, "amp_bf16": False},
             "fp32": {"images_per_second": 1000.0, "amp_bf16": False},
             "harness": {"images_per_second": 2000.0, "amp_bf16": True},
             "compile": {"images_per_second": 3000.0, "amp_bf16": True}}
    out = bench.compare_modes(modes, forward_flops=10 ** 8, peaks=PEAKS)
    assert [out[m]["speedup_vs_baseline"] for m in bench.MODES] == [1.0, 2.0, 4.0, 6.0]
    assert [out[m]["speedup_vs_fp32"] for m in bench.MODES] == [0.5, 1.0, 2.0, 3.0]
    assert out["fp32"]["mfu_dtype"] == "fp32" and out["fp32"]["mfu"] == pytest.approx(3e8 * 1000 / 1e12)
    assert out["harness"]["mfu_dtype"] == "bf16" and out["harness"]["mfu"] == pytest.approx(3e8 * 2000 / 4e12)
    alone = bench.compare_modes({"harness": {"images_per_second": 1.0, "amp_bf16": False}}, 1, PEAKS)["harness"]
    assert alone["speedup_vs_baseline"] is None and alone["speedup_vs_fp32"] is None
    no_bf16 = bench.compare_modes(modes, 10 ** 8, {"fp32": PEAKS["fp32"]})  # bf16's rate not measured here
    assert no_bf16["harness"]["mfu"] is None and no_bf16["fp32"]["mfu"] == out["fp32"]["mfu"]


def test_step_sections_and_epoch_shares() -> None:
    f = bench.step_fractions(step_seconds=10.0, data=1.0, forward=3.0, optimizer=2.0)
    assert f == pytest.approx({"data": 0.1, "forward": 0.3, "backward": 0.4, "optimizer": 0.2})
    # 45,000 train images at 1000 img/s with batch 128 (351 whole batches); 15,000 eval images at 3000 img/s
    train_s, eval_s = bench.epoch_seconds({"train": 45_000, "val": 5_000, "test": 10_000}, 128, 1000.0, 3000.0)
    assert train_s == pytest.approx(351 * 128 / 1000) and eval_s == pytest.approx(5.0)
    shares = bench.epoch_shares(f, 45.0, 5.0)
    assert shares == pytest.approx({"data": 0.09, "forward": 0.27, "backward": 0.36, "optimizer": 0.18,
                                    "evaluation": 0.1})
    assert sum(shares.values()) == pytest.approx(1.0)


def _setup(**kw) -> bench.Setup:
    recipe = apply_overrides(load_recipe("standard"), {"batch_size": 8})
    return bench.Setup(bench.synthetic_bundle(64, "cifar10", 0), recipe, torch.device("cpu"), steps=2, warmup=1,
                       workers=0, seed=0, eval_images=16, peaks=PEAKS, **kw)


def test_modes_are_built_by_fit_with_its_settings() -> None:
    setup = _setup()
    fp32 = bench.prepare("resnet20", "fp32", setup, total_steps=7)
    assert not fp32.plan.amp and not fp32.plan.channels_last and not fp32.plan.cfg.compile
    assert fp32.plan.total_steps == 7 and len(fp32.plan.splits.val) == 16 and fp32.batches.test is None
    harness = bench.prepare("resnet20", "harness", setup, total_steps=7)
    cfg = RunConfig("resnet20", harness.plan.cfg.recipe, dataset="cifar10", device="cpu")  # fit()'s defaults
    defaults = make_plan(cfg, DistEnv(), torch.device("cpu"), setup.bundle)
    assert (harness.plan.amp, harness.plan.channels_last) == (defaults.amp, defaults.channels_last)
    assert harness.trainer.amp == defaults.amp
    # the same seed gives the same initial weights as fit() would build
    assert all(torch.equal(a, b) for a, b in zip(fp32.trainer.model.state_dict().values(),
                                                 build_model(cfg, 10)[0].state_dict().values()))


def test_section_clock_times_forward_and_optimizer_then_detaches() -> None:
    trainer = bench.prepare("resnet20", "fp32", _setup(), total_steps=4).trainer
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with bench.SectionClock(trainer) as clock:
        trainer.train_step(x, y)
    assert clock.seconds["forward"] > 0 and clock.seconds["optimizer"] > 0
    assert not trainer.model._forward_hooks and not trainer.model._forward_pre_hooks
    before = dict(clock.seconds)
    trainer.train_step(x, y)
    assert clock.seconds == before


def test_reference_transform_is_the_reference_repositories_one() -> None:
    transform = bench.reference_transform(load_recipe("standard"), (0.5,) * 3, (0.25,) * 3)
    assert [type(t) for t in transform.transforms] == [T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert transform.transforms[0].padding == 4 and transform.transforms[0].size == (32, 32)


def test_baseline_and_harness_pipelines_feed_the_same_images() -> None:
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6, dtype=np.int64))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    recipe = apply_overrides(load_recipe("standard"), {"augment.random_crop": False, "augment.hflip": False})
    baseline = bench.PILArrayDataset(ds, bench.reference_transform(recipe, mean, std))
    x, y, _ = next(iter(DeviceLoader(ds, 6, torch.device("cpu"), mean, std, train=False)))
    assert len(baseline) == 6
    for i in range(6):
        xi, yi = baseline[i]
        torch.testing.assert_close(xi, x[i])
        assert yi == int(y[i])


def test_timed_steps_attributes_fetch_time_to_the_data() -> None:
    def batches():
        while True:
            time.sleep(0.02)
            yield torch.zeros(1), torch.zeros(1)

    timing = bench.timed_steps(batches(), lambda x, y: time.sleep(0.01), 3, torch.device("cpu"), sync_each_fetch=True)
    assert timing.wait_seconds >= 0.06 and timing.seconds >= timing.wait_seconds + 0.03


@pytest.mark.skipif(not bench.cpu_peak_memory_supported(), reason="needs Linux /proc and glibc")
def test_cpu_peak_memory_sees_a_transient_allocation_and_resets() -> None:
    memory = bench.PeakMemory(torch.device("cpu"))
    memory.start()
    block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, every page touched
    del block
    assert memory.peak() >= 60 * 2 ** 20
    memory.start()
    assert memory.peak() < 60 * 2 ** 20


@pytest.mark.parametrize("argv, message", [
    (["--modes", "baseline,bogus"], "--modes: unknown bogus"),
    (["--arch", "resnet2"], "unknown model 'resnet2'"),
    (["--warmup", "0"], "--warmup must be >= 1"),
    (["--overhead", "nope", "--modes", "harness"], "unknown model 'nope'"),
    (["--synthetic", "4", "--batch-size", "8"], "batch size 8 exceeds the 4 training images"),
    (["--eval-images", "0"], "--eval-images must be >= 1"),
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--device", "cpu", "--synthetic", "16", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_run_end_to_end_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # 5,200 images: enough for the standard recipe's 5,000-image validation split, so epoch shares are computed
    cmd = [sys.executable, str(REPO / "experiments" / "bench.py"), "--arch", "resnet20", "--device", "cpu",
           "--steps", "2", "--warmup", "1", "--batch-size", "8", "--synthetic", "5200", "--eval-images", "16",
           "--modes", "baseline,fp32,harness", "--overhead-rounds", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "resnet20: 269,722 params" in proc.stdout and "memory_efficient" in proc.stdout
    report = json.loads(out.read_text())

    meta = report["meta"]
    assert META_FIELDS <= set(meta)
    assert meta["device"] == "cpu" and meta["batch_size"] == 8 and meta["steps"] == 2 and meta["warmup"] == 1
    assert meta["modes"] == ["baseline", "fp32", "harness"] and meta["dataset"]["synthetic"] is True
    assert meta["command"].startswith("python experiments/bench.py --arch resnet20")
    assert meta["epoch_sizes"] == {"train": 200, "val": 5000, "test": 5200}
    # bf16's rate only where bf16 runs in hardware (elsewhere one emulated product takes a minute)
    expected = {"fp32", "bf16"} if native_bf16(torch.device("cpu")) else {"fp32"}
    assert {p["dtype"] for p in meta["peaks"].values()} == set(meta["peaks"]) == expected
    assert all(p["flops_per_second"] > 0 for p in meta["peaks"].values())

    entry = report["archs"]["resnet20"]
    assert entry["params"] == 269_722 and entry["training_flops_per_image"] == 3 * entry["forward_flops_per_image"] > 0
    assert set(entry["modes"]) == {"baseline", "fp32", "harness"}
    for mode, r in entry["modes"].items():
        assert set(r) == MODE_FIELDS, mode
        assert r["images_per_second"] > 0 and 0 <= r["data_wait_fraction"] <= 1 and r["mfu"] > 0
        assert r["images_per_second"] == pytest.approx(8 * 2 / r["timed_seconds"])
        assert r["compile_seconds"] is None and r["recompiles"] is None  # eager modes compile nothing
        assert set(r["step_fractions"]) == set(bench.SECTIONS)
        assert r["step_fractions"]["data"] == pytest.approx(r["data_wait_fraction"])
        assert sum(r["epoch_shares"].values()) == pytest.approx(1.0) and r["eval_images_per_second"] > 0
        assert r["mfu_dtype"] == ("bf16" if r["amp_bf16"] else "fp32")
        if bench.cpu_peak_memory_supported():
            assert r["peak_memory_bytes"] > 0
    for mode in ("baseline", "fp32"):  # the CPU default before issue 12: fp32 NCHW
        assert entry["modes"][mode]["amp_bf16"] is False and entry["modes"][mode]["channels_last"] is False
    assert entry["modes"]["baseline"]["speedup_vs_baseline"] == 1.0 and entry["modes"]["fp32"]["speedup_vs_fp32"] == 1.0

    me = report["memory_efficient"]
    assert set(me) == {"arch", "model", "standard", "memory_efficient", "memory_saving", "time_increase"}
    for path in ("standard", "memory_efficient"):
        assert set(me[path]) == {"images_per_second", "step_ms", "peak_memory_bytes"}
    assert me["time_increase"] == pytest.approx(me["memory_efficient"]["step_ms"] / me["standard"]["step_ms"] - 1)

    overhead = report["overhead"]
    assert overhead["arch"] == "resnet20" and overhead["rounds"] == 1 and overhead["mode"] == "harness"
    assert overhead["ratio"] == pytest.approx(overhead["harness_step_ms"] / overhead["bare_step_ms"])
