"""experiments/bench.py: the comparison arithmetic, the target checks, the baseline's data pipeline, and a
tiny CPU run end to end. No timing threshold is asserted anywhere."""
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
from experiments.config import apply_overrides, load_recipe
from experiments.data import ArrayDataset, DeviceLoader
from tests.helpers import REPO


MODE_FIELDS = {"images_per_second", "step_ms", "timed_seconds", "data_wait_fraction", "peak_memory_bytes",
               "warmup_seconds", "compile_seconds", "graphs_compiled", "recompiles", "compile_cache_hits", "amp_bf16",
               "channels_last", "loss_finite", "speedup_vs_baseline", "mfu"}
META_FIELDS = {"device", "device_name", "torch", "torchvision", "python", "date", "command", "batch_size", "steps",
               "warmup", "modes", "recipe", "recipe_hash", "optimizer", "dataset", "workers", "torch_threads", "cores",
               "peak", "memory_metric", "flops_convention", "data_wait", "load_average_before_after"}


def test_throughput_and_ratio_arithmetic() -> None:
    assert bench.images_per_second(128, 50, 2.0) == 3200.0
    assert bench.speedup(3200.0, 800.0) == 4.0
    assert bench.speedup(3200.0, None) is None
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


def test_compare_modes_relates_every_mode_to_the_baseline() -> None:
    modes = {"baseline": {"images_per_second": 500.0}, "harness": {"images_per_second": 2000.0},
             "compile": {"images_per_second": 3000.0}}
    out = bench.compare_modes(modes, forward_flops=10 ** 8, peak_flops_per_second=1e12)
    assert [out[m]["speedup_vs_baseline"] for m in bench.MODES] == [1.0, 4.0, 6.0]
    assert out["harness"]["mfu"] == pytest.approx(3e8 * 2000 / 1e12)
    assert bench.compare_modes({"harness": {"images_per_second": 1.0}}, 1, 1.0)["harness"]["speedup_vs_baseline"] is None


def _report(device: str) -> dict:
    def mode(speed: float, wait: float, recompiles: int | None = None) -> dict:
        return {"speedup_vs_baseline": speed, "data_wait_fraction": wait, "recompiles": recompiles}

    return {"meta": {"device": device},
            "archs": {"resnet20": {"modes": {"baseline": mode(1.0, 0.5), "harness": mode(5.5, 0.01),
                                             "compile": mode(4.0, 0.03, recompiles=1)}},
                      "alexnet": {"modes": {"baseline": mode(1.0, 0.5), "harness": mode(1.5, 0.001)}}},
            "memory_efficient": {"memory_saving": 0.45, "time_increase": 0.30},
            "overhead": {"arch": "resnet20", "ratio": 1.02}}


def test_targets_on_cuda() -> None:
    met = {t["target"]: t["met"] for t in bench.evaluate_targets(_report("cuda"))}
    assert met == {
        "resnet20 harness speed-up over baseline": True,
        "resnet20 harness data wait": True,
        "resnet20 compile speed-up over baseline": False,
        "resnet20 compile data wait": False,
        "resnet20 compile: recompilations in steady state": False,
        "alexnet harness data wait": True,  # no speed-up target for alexnet
        "densenet_bc memory_efficient: peak memory saving": True,
        "densenet_bc memory_efficient: extra step time": False,
    }


def test_targets_on_cpu_are_the_overhead_and_recompilation_only() -> None:
    rows = bench.evaluate_targets(_report("cpu"))
    assert [(t["target"], t["met"], t["measured"]) for t in rows] == [
        ("resnet20 compile: recompilations in steady state", False, "1"),
        ("resnet20 harness overhead over the bare loop", True, "+2.0%")]


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
])
def test_bad_arguments_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--device", "cpu", "--synthetic", "16", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_run_end_to_end_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "experiments" / "bench.py"), "--arch", "resnet20", "--device", "cpu",
           "--steps", "2", "--warmup", "1", "--batch-size", "8", "--synthetic", "64", "--modes", "baseline,harness",
           "--overhead-rounds", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "resnet20: 269,722 params" in proc.stdout and "memory_efficient" in proc.stdout
    report = json.loads(out.read_text())

    meta = report["meta"]
    assert META_FIELDS <= set(meta)
    assert meta["device"] == "cpu" and meta["batch_size"] == 8 and meta["steps"] == 2 and meta["warmup"] == 1
    assert meta["modes"] == ["baseline", "harness"] and meta["dataset"]["synthetic"] is True
    assert meta["command"].startswith("python experiments/bench.py --arch resnet20")
    assert meta["peak"]["dtype"] == "fp32" and meta["peak"]["flops_per_second"] > 0

    entry = report["archs"]["resnet20"]
    assert entry["params"] == 269_722 and entry["training_flops_per_image"] == 3 * entry["forward_flops_per_image"] > 0
    assert set(entry["modes"]) == {"baseline", "harness"}
    for mode, r in entry["modes"].items():
        assert set(r) == MODE_FIELDS, mode
        assert r["images_per_second"] > 0 and 0 <= r["data_wait_fraction"] <= 1 and r["mfu"] > 0
        assert r["images_per_second"] == pytest.approx(8 * 2 / r["timed_seconds"])
        assert r["compile_seconds"] is None and r["recompiles"] is None  # eager modes compile nothing
        assert r["amp_bf16"] is False and r["channels_last"] is False  # fit()'s CPU defaults
        if bench.cpu_peak_memory_supported():
            assert r["peak_memory_bytes"] > 0
    assert entry["modes"]["baseline"]["speedup_vs_baseline"] == 1.0

    me = report["memory_efficient"]
    assert set(me) == {"arch", "model", "standard", "memory_efficient", "memory_saving", "time_increase"}
    for path in ("standard", "memory_efficient"):
        assert set(me[path]) == {"images_per_second", "step_ms", "peak_memory_bytes"}
    assert me["time_increase"] == pytest.approx(me["memory_efficient"]["step_ms"] / me["standard"]["step_ms"] - 1)

    overhead = report["overhead"]
    assert overhead["arch"] == "resnet20" and overhead["rounds"] == 1
    assert overhead["ratio"] == pytest.approx(overhead["harness_step_ms"] / overhead["bare_step_ms"])
    assert [t["target"] for t in report["targets"]] == ["resnet20 harness overhead over the bare loop"]
