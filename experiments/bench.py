"""Training throughput and where the time goes: fit()'s own setup, measured per model and mode.

    python experiments/bench.py --arch resnet20,densenet_bc --device cpu --batch-size 128 --steps 20 --data-dir ../shared/data
    python experiments/bench.py --device cuda --data-dir ../shared/data --json bench-cuda.json

Modes (same seed, model initialisation, recipe optimizer, batch size and step counts):
  baseline  a torchvision-CIFAR-style Dataset (PIL image -> RandomCrop(32, padding) -> RandomHorizontalFlip ->
            ToTensor -> Normalize) behind a DataLoader (min(8, cores) workers, pinned memory on CUDA); fp32 NCHW
  fp32      fit() with --no-amp --no-channels-last: the CPU default before bf16 autocast and channels_last
  harness   fit() with its defaults for this device (precision and layout as fit() resolves them)
  compile   harness with --compile; the warm-up's extra time is reported as compile seconds

Every mode builds the model, Trainer and loaders with fit()'s own functions (experiments.fit) and runs fit()'s
step (StepMeter: Trainer.train_step plus the device-side loss/accuracy sums). Each runs --warmup steps, then
--steps timed steps synchronised at the ends only, then evaluates --eval-images validation images with
Trainer.evaluate. The step is split into data, forward, optimizer and the rest (loss, backward, metric sums)
by hooks on the model and the optimizer; on CUDA that happens in a second pass synchronised around each
section, on the CPU in the timed pass. Evaluation's share is that of one evaluated epoch of the recipe's
train/val/test sizes. MFU: training FLOPs (3x forward) per second over the matmul rate of the mode's
precision, bf16 and fp32 both measured at start-up. Targets and published numbers: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python experiments/bench.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch._dynamo.utils import counters as dynamo_counters  # no public API counts compiled graphs yet

import zoo
from experiments.cli import Parser, exit_code
from experiments.config import NUM_CLASSES, Recipe, RunConfig, apply_overrides, list_recipes, load_recipe
from experiments.data import ArrayDataset, DatasetBundle, load_dataset
from experiments.errors import UserError
from experiments.fit import Batches, Plan, build_model, build_trainer, make_batches, make_plan
from experiments.runtime import DistEnv, cpu_heap_policy, native_bf16, release_freed_memory, resolve_device
from experiments.tracking import device_name
from experiments.trainer import StepMeter, Trainer, make_splits

FAMILY_MAIN_VARIANTS = ("alexnet,vgg16_bn,googlenet,inception_v3,inception_v4,inception_resnet_v2,resnet20,resnet110,"
                        "densenet_bc,densenet121,bit_r50x1")
MODES = ("baseline", "fp32", "harness", "compile")
# RunConfig precision/layout/compile per mode; None leaves the choice to fit()'s defaults for the device.
MODE_SETTINGS = {"baseline": (False, False, False), "fp32": (False, False, False), "harness": (None, None, False),
                 "compile": (None, None, True)}
SECTIONS = ("data", "forward", "backward", "optimizer")
TRAIN_FLOPS_PER_FORWARD = 3  # backward ~ 2x forward (gradients w.r.t. activations and weights)
PEAK_SECONDS = 1.0  # time spent measuring each matmul rate
PREBUILT_BATCHES = 16  # the bare loop cycles through this many ready device batches


# ---------------------------------------------------------------------------------------------- arithmetic


def images_per_second(batch_size: int, steps: int, seconds: float) -> float:
    return batch_size * steps / seconds


def ratio(ips: float, reference_ips: float | None) -> float | None:
    return None if reference_ips is None else ips / reference_ips


def training_flops_per_image(forward_flops: int) -> int:
    return TRAIN_FLOPS_PER_FORWARD * forward_flops


def mfu(forward_flops: int, ips: float, peak_flops_per_second: float) -> float:
    """Model FLOP utilisation: useful training FLOPs per second over the measured matmul rate."""
    return training_flops_per_image(forward_flops) * ips / peak_flops_per_second


def matmul_flops(n: int) -> int:
    """FLOPs of one n x n by n x n matrix product (n^3 multiply-adds)."""
    return 2 * n ** 3


def compile_seconds(warmup_seconds: float, warmup_steps: int, step_seconds: float) -> float:
    """Warm-up time beyond what as many steady-state steps take: the compilation cost."""
    return max(0.0, warmup_seconds - warmup_steps * step_seconds)


def overhead_ratio(harness_step_seconds: float, bare_step_seconds: float) -> float:
    """Harness step time over bare-step time (1.03 = 3% overhead)."""
    return harness_step_seconds / bare_step_seconds


def memory_saving(standard_peak: float, efficient_peak: float) -> float:
    """Fraction of the standard path's peak memory that the memory-efficient path saves."""
    return 1.0 - efficient_peak / standard_peak


def time_increase(standard_step_seconds: float, efficient_step_seconds: float) -> float:
    """Extra step time of the memory-efficient path, as a fraction of the standard path's."""
    return efficient_step_seconds / standard_step_seconds - 1.0


def step_fractions(step_seconds: float, data: float, forward: float, optimizer: float) -> dict[str, float]:
    """A step's time split into data, forward, optimizer and the rest ("backward": loss, backward pass,
    zero_grad, schedule and metric sums), each as a fraction of the step."""
    rest = max(0.0, step_seconds - data - forward - optimizer)
    return {"data": data / step_seconds, "forward": forward / step_seconds, "backward": rest / step_seconds,
            "optimizer": optimizer / step_seconds}


def epoch_shares(fractions: dict[str, float], train_seconds: float, eval_seconds: float) -> dict[str, float]:
    """Shares of one evaluated epoch: the step's sections scaled to the training time, plus evaluation."""
    total = train_seconds + eval_seconds
    return {**{k: f * train_seconds / total for k, f in fractions.items()}, "evaluation": eval_seconds / total}


def epoch_seconds(sizes: dict[str, int], batch_size: int, train_ips: float, eval_ips: float) -> tuple[float, float]:
    """(training, evaluation) seconds of one epoch that trains on sizes["train"] (whole batches) and
    evaluates sizes["val"] + sizes["test"] images."""
    return (sizes["train"] // batch_size * batch_size / train_ips, (sizes["val"] + sizes["test"]) / eval_ips)


def compare_modes(modes: dict[str, dict[str, Any]], forward_flops: int,
                  peaks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: speed-up over the baseline and over fp32 (None without them) and MFU against the matmul rate
    of the mode's precision."""
    base, fp32 = (modes.get(m, {}).get("images_per_second") for m in ("baseline", "fp32"))
    out = {}
    for mode, r in modes.items():
        dtype = "bf16" if r["amp_bf16"] else "fp32"
        out[mode] = {"speedup_vs_baseline": ratio(r["images_per_second"], base),
                     "speedup_vs_fp32": ratio(r["images_per_second"], fp32), "mfu_dtype": dtype,
                     "mfu": (mfu(forward_flops, r["images_per_second"], peaks[dtype]["flops_per_second"])
                             if dtype in peaks else None)}
    return out


# --------------------------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_metric(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over the mode (warm-up included)"
    return ("growth of this process's peak RSS over the mode (warm-up included; /proc VmHWM after clear_refs, "
            "DataLoader worker processes not counted)")


class PeakMemory:
    """Peak memory of a block of work.

    CUDA: max_memory_allocated, reset at start. CPU: growth of the process's resident-set high-water mark;
    freed heap is handed back to the OS first (glibc malloc_trim) so memory an earlier mode left in malloc's
    free lists neither hides this mode's growth nor counts as it, then the kernel's mark is reset by writing
    5 to /proc/self/clear_refs. Without those (not Linux/glibc) the CPU peak is unavailable (None).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif cpu_peak_memory_supported():
            release_freed_memory()
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _proc_status_kib("VmRSS")

    def peak(self) -> int | None:
        """Bytes: CUDA peak allocated, or CPU peak RSS growth since start()."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if not cpu_peak_memory_supported():
            return None
        return (_proc_status_kib("VmHWM") - self.base) * 1024


def cpu_peak_memory_supported() -> bool:
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and Path("/proc/self/clear_refs").exists()


def _proc_status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name}")


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The best sustained rate of a large square matmul in ``dtype`` on ``device``."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    torch.mm(a, b, out=out)
    sync(device)
    best, reps, spent = 0.0, 1, 0.0
    while spent < PEAK_SECONDS:
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync(device)
        seconds = time.perf_counter() - start
        spent += seconds
        best = max(best, matmul_flops(n) * reps / seconds)
        if seconds < 0.1:  # too short to time well: batch more products per sync
            reps *= 2
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    return {"dtype": name, "n": n, "flops_per_second": best,
            "label": f"{name} {n}x{n} matmul on {device.type}, best of {spent:.1f} s"}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _compile_counts() -> tuple[int, int]:
    """(graphs compiled so far, compile-cache hits so far); a recompilation adds a graph."""
    return (dynamo_counters["stats"]["unique_graphs"],
            dynamo_counters["inductor"]["fxgraph_cache_hit"] + dynamo_counters["aot_autograd"]["autograd_cache_hit"])


@dataclass
class Timing:
    seconds: float
    wait_seconds: float  # time spent producing batches


def timed_steps(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], step: Callable[[torch.Tensor, torch.Tensor], None],
                n: int, device: torch.device, sync_each_fetch: bool) -> Timing:
    """Run ``n`` steps. Without ``sync_each_fetch`` the device is synchronised at the ends only (throughput);
    with it, around every fetch too, so the GPU's queued work is not billed to the data (attribution)."""
    sync(device)
    wait = 0.0
    start = time.perf_counter()
    for _ in range(n):
        if sync_each_fetch:
            sync(device)
        t0 = time.perf_counter()
        x, y = next(batches)
        if sync_each_fetch:
            sync(device)
        wait += time.perf_counter() - t0
        step(x, y)
    sync(device)
    return Timing(time.perf_counter() - start, wait)


class SectionClock:
    """Seconds inside the model's forward and the optimizer's step, from hooks on the trainer's own model and
    optimizer (synchronised on CUDA), while the context is open. Eager only: hooks on a compiled model would
    recompile it."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.seconds = {"forward": 0.0, "optimizer": 0.0}
        self._t0 = 0.0
        self._handles: list[Any] = []

    def _start(self, *_: Any) -> None:
        sync(self.trainer.device)
        self._t0 = time.perf_counter()

    def _stopper(self, section: str) -> Callable[..., None]:
        def stop(*_: Any) -> None:
            sync(self.trainer.device)
            self.seconds[section] += time.perf_counter() - self._t0
        return stop

    def __enter__(self) -> SectionClock:
        model, opt = self.trainer.model, self.trainer.optimizer
        self._handles = [model.register_forward_pre_hook(self._start),
                         model.register_forward_hook(self._stopper("forward")),
                         opt.register_step_pre_hook(self._start), opt.register_step_post_hook(self._stopper("optimizer"))]
        return self

    def __exit__(self, *_: Any) -> None:
        for h in self._handles:
            h.remove()


# --------------------------------------------------------------------------------------------- batch sources


class PILArrayDataset(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10.__getitem__ over the harness's uint8 arrays: each sample becomes a PIL
    image and goes through ``transform``, so the baseline pays the reference repositories' per-image cost."""

    def __init__(self, ds: ArrayDataset, transform: Callable[[Image.Image], torch.Tensor]):
        self.images, self.labels, self.transform = ds.images, ds.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def reference_transform(recipe: Recipe, mean: Iterable[float], std: Iterable[float]) -> T.Compose:
    """The reference repositories' CIFAR training transform, following the recipe's augmentation switches."""
    steps: list[Callable] = []
    if recipe.augment.random_crop:
        steps.append(T.RandomCrop(32, padding=recipe.augment.crop_padding))
    if recipe.augment.hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def _forever(batches: Iterable[Any]) -> Iterator[Any]:
    """Epoch after epoch, as training does; each new epoch's setup cost lands in the data wait."""
    while True:
        yield from batches


def baseline_batches(ds: ArrayDataset, bundle: DatasetBundle, recipe: Recipe, device: torch.device,
                     workers: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        PILArrayDataset(ds, reference_transform(recipe, bundle.mean, bundle.std)), batch_size=recipe.batch_size,
        shuffle=True, num_workers=workers, pin_memory=cuda, drop_last=True, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed))
    for x, y in _forever(loader):  # the host-to-device copy is part of waiting for data
        yield x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)


def synthetic_bundle(n: int, dataset: str, seed: int) -> DatasetBundle:
    """``n`` uniform random 32x32 images with random labels, for runs without the real archive."""
    rng = np.random.default_rng(seed)
    classes = NUM_CLASSES[dataset]
    ds = ArrayDataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n, dtype=np.int64))
    # Uniform bytes: mean 127.5 / 255, std sqrt((256^2 - 1) / 12) / 255.
    return DatasetBundle(name=dataset, train=ds, test=ds, classes=tuple(str(i) for i in range(classes)),
                         digest="synthetic", source=f"synthetic ({n} random images)", mean=(0.5, 0.5, 0.5),
                         std=(0.2898, 0.2898, 0.2898))


# ------------------------------------------------------------------------------------------------- setups


@dataclass(frozen=True)
class Setup:
    bundle: DatasetBundle
    recipe: Recipe  # as given: its train/val/test sizes are the epoch evaluation's share is computed for
    device: torch.device
    steps: int
    warmup: int
    workers: int
    seed: int
    eval_images: int
    peaks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def passes(self) -> int:
        """Passes of --steps steps per mode: on CUDA a second, synchronised one attributes the time."""
        return 2 if self.device.type == "cuda" else 1


@dataclass
class Prepared:
    """What fit() builds for a run, as fit() builds it."""

    plan: Plan
    trainer: Trainer
    batches: Batches


def prepare(arch: str, mode: str, setup: Setup, total_steps: int, model: dict[str, Any] | None = None) -> Prepared:
    """Model, Trainer and loaders through experiments.fit, for ``mode``'s settings. The schedule spans
    ``total_steps``; the validation split holds the --eval-images images evaluation is timed on."""
    amp, channels_last, compile_ = MODE_SETTINGS[mode]
    val_size = min(setup.eval_images, len(setup.bundle.train) // 2)
    recipe = apply_overrides(setup.recipe, {"max_steps": total_steps, "val_size": val_size, "subset": None})
    cfg = RunConfig(arch, recipe, model=dict(model or {}), dataset=setup.bundle.name, seed=setup.seed,
                    device=setup.device.type, amp=amp, channels_last=channels_last, compile=compile_)
    plan = make_plan(cfg, DistEnv(), setup.device, setup.bundle)
    net, _ = build_model(cfg, setup.bundle.num_classes)
    return Prepared(plan, build_trainer(plan, net), make_batches(plan, evaluate_test=False))


def recipe_sizes(bundle: DatasetBundle, recipe: Recipe, seed: int) -> dict[str, int] | None:
    """The recipe's train/val/test sizes on this data (None when the data is too small for its split)."""
    try:
        splits = make_splits(bundle, recipe, seed)
    except UserError:
        return None
    return {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}


# --------------------------------------------------------------------------------------------------- modes


def timed_evaluation(run: Prepared) -> float:
    """Evaluation images per second: Trainer.evaluate over the validation loader, after one untimed pass."""
    trainer, loader = run.trainer, run.batches.val
    trainer.evaluate(loader)
    sync(trainer.device)
    start = time.perf_counter()
    trainer.evaluate(loader)
    sync(trainer.device)
    return len(run.plan.splits.val) / (time.perf_counter() - start)


def run_mode(mode: str, arch: str, setup: Setup, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build fit()'s model, Trainer and loaders for ``mode``; warm up, time, attribute, evaluate."""
    device, cuda, eager = setup.device, setup.device.type == "cuda", mode != "compile"
    memory = PeakMemory(device)
    memory.start()
    if not eager:
        torch._dynamo.reset()  # each model compiles from scratch, not against an earlier arch's cache entries
    run = prepare(arch, mode, setup, setup.warmup + setup.passes() * setup.steps, model)
    trainer, recipe = run.trainer, run.plan.cfg.recipe
    batches = (baseline_batches(run.plan.splits.train, setup.bundle, recipe, device, setup.workers, setup.seed)
               if mode == "baseline" else _forever(run.batches.train))
    meter = StepMeter(trainer)  # fit()'s step: train_step, device-side sums, periodic loss check
    graphs0, hits0 = _compile_counts()
    warmup = timed_steps(batches, meter.step, setup.warmup, device, sync_each_fetch=False)
    graphs1, hits1 = _compile_counts()
    clock = SectionClock(trainer)
    # On the CPU nothing runs ahead of the host, so the timed pass attributes exactly; on CUDA a second pass,
    # synchronised around the fetch and each section, does.
    with clock if eager and not cuda else contextlib.nullcontext():
        timed = timed_steps(batches, meter.step, setup.steps, device, sync_each_fetch=False)
    attributed = timed
    if cuda:
        with clock if eager else contextlib.nullcontext():
            attributed = timed_steps(batches, meter.step, setup.steps, device, sync_each_fetch=True)
    graphs2, _ = _compile_counts()
    eval_ips = timed_evaluation(run)
    peak = memory.peak()
    if mode == "baseline":
        batches.close()  # stops the DataLoader workers
    step_seconds = timed.seconds / setup.steps
    return {
        "images_per_second": images_per_second(recipe.batch_size, setup.steps, timed.seconds),
        "step_ms": 1000 * step_seconds,
        "timed_seconds": timed.seconds,
        "data_wait_fraction": attributed.wait_seconds / attributed.seconds,
        "step_fractions": step_fractions(attributed.seconds, attributed.wait_seconds, clock.seconds["forward"],
                                         clock.seconds["optimizer"]) if eager else None,
        "eval_images_per_second": eval_ips,
        "peak_memory_bytes": peak,
        "warmup_seconds": warmup.seconds,
        "compile_seconds": None if eager else compile_seconds(warmup.seconds, setup.warmup, step_seconds),
        "graphs_compiled": None if eager else graphs1 - graphs0,
        "recompiles": None if eager else graphs2 - graphs1,
        "compile_cache_hits": None if eager else hits1 - hits0,
        "amp_bf16": run.plan.amp,
        "channels_last": run.plan.channels_last,
        "loss_finite": meter.finite,
    }


def with_epoch_shares(r: dict[str, Any], sizes: dict[str, int] | None, batch_size: int) -> dict[str, Any]:
    """The mode's result with its seconds per evaluated epoch of ``sizes`` and the shares of that epoch."""
    if sizes is None:
        return {**r, "epoch_seconds": None, "epoch_shares": None}
    train_s, eval_s = epoch_seconds(sizes, batch_size, r["images_per_second"], r["eval_images_per_second"])
    fractions = r["step_fractions"] or {"train": 1.0}  # compiled: not split into sections
    return {**r, "epoch_seconds": {"train": train_s, "evaluation": eval_s},
            "epoch_shares": epoch_shares(fractions, train_s, eval_s)}


def bench_arch(arch: str, modes: Iterable[str], setup: Setup, sizes: dict[str, int] | None) -> dict[str, Any]:
    info = zoo.model_info(zoo.create_model(arch, num_classes=setup.bundle.num_classes))
    batch_size = setup.recipe.batch_size
    results = {mode: with_epoch_shares(run_mode(mode, arch, setup), sizes, batch_size) for mode in modes}
    for mode, extra in compare_modes(results, info["flops"], setup.peaks).items():
        results[mode].update(extra)
    return {"params": info["params"], "forward_flops_per_image": info["flops"],
            "training_flops_per_image": training_flops_per_image(info["flops"]), "modes": results}


def compare_memory_efficient(setup: Setup) -> dict[str, Any]:
    """DenseNet-BC-100 (k=12) in harness mode, standard against memory_efficient=True (checkpointed
    concatenation + first conv), same batch size and steps."""
    keep = ("images_per_second", "step_ms", "peak_memory_bytes")
    standard, efficient = (run_mode("harness", "densenet_bc", setup, {"memory_efficient": me}) for me in (False, True))
    standard, efficient = ({k: r[k] for k in keep} for r in (standard, efficient))
    return {"arch": "densenet_bc", "model": {"depth": 100, "growth_rate": 12}, "standard": standard,
            "memory_efficient": efficient,
            "memory_saving": (memory_saving(standard["peak_memory_bytes"], efficient["peak_memory_bytes"])
                              if standard["peak_memory_bytes"] else None),
            "time_increase": time_increase(standard["step_ms"], efficient["step_ms"])}


def compare_overhead(arch: str, mode: str, setup: Setup, rounds: int) -> dict[str, Any]:
    """fit()'s step on its loader (DeviceLoader + StepMeter) against Trainer.train_step alone on pre-built
    device batches, same model and optimizer, alternated for ``rounds`` rounds; the fastest round of each
    counts, which discounts interference from other processes."""
    device = setup.device
    run = prepare(arch, mode, setup, 2 * (setup.warmup + rounds * setup.steps))
    batches = _forever(run.batches.train)
    prebuilt = [next(batches) for _ in range(min(setup.steps, PREBUILT_BATCHES))]
    runs: dict[str, list[float]] = {"harness": [], "bare": []}
    for r in range(rounds + 1):  # round 0 warms both up and is not counted
        for name, source, step in (("harness", batches, StepMeter(run.trainer).step),
                                   ("bare", itertools.cycle(prebuilt), run.trainer.train_step)):
            n = setup.warmup if r == 0 else setup.steps
            seconds = timed_steps(source, step, n, device, sync_each_fetch=False).seconds
            if r:
                runs[name].append(1000 * seconds / n)
    harness_ms, bare_ms = min(runs["harness"]), min(runs["bare"])
    return {"arch": arch, "mode": mode, "amp_bf16": run.plan.amp, "channels_last": run.plan.channels_last,
            "rounds": rounds, "harness_step_ms": harness_ms, "bare_step_ms": bare_ms,
            "harness_round_ms": runs["harness"], "bare_round_ms": runs["bare"],
            "ratio": overhead_ratio(harness_ms, bare_ms)}


# ------------------------------------------------------------------------------------------------ reporting


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


TABLE_COLUMNS = (("mode", "<9"), ("img/s", ">9"), ("vs base", ">8"), ("vs fp32", ">8"), ("data", ">6"), ("fwd", ">6"),
                 ("bwd", ">6"), ("opt", ">6"), ("eval", ">6"), ("eval img/s", ">11"), ("peak MiB", ">9"),
                 ("compile s", ">10"), ("recomp", ">7"), ("MFU", ">12"))


def _mode_cells(mode: str, r: dict[str, Any]) -> list[str]:
    shares = r["epoch_shares"] or r["step_fractions"] or {}  # without the recipe's sizes: shares of a step
    return [mode, f"{r['images_per_second']:,.1f}", _fmt(r["speedup_vs_baseline"], ".2f", "x"),
            _fmt(r["speedup_vs_fp32"], ".2f", "x"), *(_fmt(shares.get(k), ".0%") for k in (*SECTIONS, "evaluation")),
            f"{r['eval_images_per_second']:,.1f}", _fmt(_mib(r["peak_memory_bytes"]), ",.0f"),
            _fmt(r["compile_seconds"], ".1f"), _fmt(r["recompiles"], "d"), f"{_fmt(r['mfu'], '.1%')} {r['mfu_dtype']}"]


def format_arch_table(arch: str, entry: dict[str, Any], meta: dict[str, Any]) -> str:
    head = (f"{arch}: {entry['params']:,} params | forward {entry['forward_flops_per_image'] / 1e6:,.1f} MFLOPs/image, "
            f"training ~3x = {entry['training_flops_per_image'] / 1e6:,.1f} | batch {meta['batch_size']}, "
            f"{meta['steps']} timed steps after {meta['warmup']} warm-up")
    lines = [head, "".join(f"{name:{spec}}" for name, spec in TABLE_COLUMNS)]
    for mode, r in entry["modes"].items():
        lines.append("".join(f"{cell:{spec}}" for cell, (_, spec) in zip(_mode_cells(mode, r), TABLE_COLUMNS)))
    return "\n".join(lines)


def format_header(meta: dict[str, Any]) -> str:
    sizes = meta["epoch_sizes"]
    epoch = (f"{sizes['train']:,} train / {sizes['val']:,} val / {sizes['test']:,} test images" if sizes
             else "- (data smaller than the recipe's split: data..opt are shares of a training step)")
    peaks = " | ".join(f"{p['flops_per_second'] / 1e9:,.1f} GFLOP/s ({p['label']})" for p in meta["peaks"].values())
    return "\n".join([
        f"device: {meta['device_name']} | torch {meta['torch']} | {meta['date']}",
        f"data: {meta['dataset']['source']} | recipe {meta['recipe']} | DataLoader workers {meta['workers']}",
        f"MFU denominators: {peaks}",
        f"epoch shares (data, fwd, bwd = rest of the step, opt, eval) are of one evaluated epoch of {epoch}",
        f"peak memory: {meta['memory_metric']}", ""])


def format_comparisons(report: dict[str, Any]) -> str:
    """The memory-efficient and overhead comparisons, after the per-arch tables."""
    out = []
    me = report["memory_efficient"]
    if me is not None:
        out += ["densenet_bc (DenseNet-BC-100, k=12), harness mode: standard vs memory_efficient=True",
                f"{'path':<18}{'img/s':>10}{'step ms':>10}{'peak MiB':>10}"]
        out += [f"{name:<18}{r['images_per_second']:>10,.1f}{r['step_ms']:>10,.1f}"
                f"{_fmt(_mib(r['peak_memory_bytes']), ',.0f'):>10}"
                for name, r in (("standard", me["standard"]), ("memory_efficient", me["memory_efficient"]))]
        out += [f"memory saving {_fmt(me['memory_saving'], '.1%')}, time increase {me['time_increase']:+.1%}", ""]
    ov = report["overhead"]
    if ov is not None:
        out += [f"{ov['arch']} {ov['mode']} step on its loader vs Trainer.train_step on ready batches (fastest of "
                f"{ov['rounds']} alternating rounds): harness {ov['harness_step_ms']:.1f} ms/step, bare "
                f"{ov['bare_step_ms']:.1f} ms/step, ratio {ov['ratio']:.3f} ({ov['ratio'] - 1:+.1%} overhead)"]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = Parser("bench.py", __doc__)
    p.add_argument("--arch", default=FAMILY_MAIN_VARIANTS,
                   help="comma list of zoo models (default: every seed family's main variant)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (default all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--recipe", default="standard",
                   help=f"optimizer/augmentation/split source: {', '.join(list_recipes())} or a .yaml path")
    p.add_argument("--batch-size", type=int, help="default: the recipe's (standard: 128)")
    p.add_argument("--steps", type=int, default=100, help="timed steps per mode (default 100)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first; compile mode compiles here (default 5)")
    p.add_argument("--eval-images", type=int, default=1000,
                   help="validation images evaluation is timed on (default 1000; at most half the training set)")
    p.add_argument("--workers", type=int, help="baseline DataLoader workers (default min(8, available cores))")
    p.add_argument("--dataset", choices=sorted(NUM_CLASSES), default="cifar10")
    p.add_argument("--data-dir", default="./data", help="as for run.py: official folders, image-folder tree or archive")
    p.add_argument("--synthetic", type=int, metavar="N", help="N random images instead of --data-dir")
    p.add_argument("--memory-efficient", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare DenseNet-BC-100 with memory_efficient=True (default on)")
    p.add_argument("--overhead", metavar="ARCH|none",
                   help="harness-vs-bare-step overhead for ARCH (default resnet20 on the CPU, none on CUDA)")
    p.add_argument("--overhead-mode", choices=["fp32", "harness"], default="harness",
                   help="settings of that comparison (default harness: fit()'s defaults)")
    p.add_argument("--overhead-rounds", type=int, default=3, help="alternating rounds of that comparison (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="PATH", help="write every number to PATH")
    return p


def _parse_list(spec: str, flag: str) -> list[str]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UserError(f"{flag} is empty")
    return items


def _check_args(args: argparse.Namespace, modes: list[str], archs: list[str]) -> None:
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise UserError(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    for flag, value, low in (("--steps", args.steps, 1), ("--overhead-rounds", args.overhead_rounds, 1),
                             ("--eval-images", args.eval_images, 1),
                             ("--warmup", args.warmup, 1 if "compile" in modes else 0)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}" + (" (compile mode compiles during warm-up)" if flag == "--warmup" else ""))
    if args.synthetic is not None and args.synthetic < 2:
        raise UserError("--synthetic must be >= 2")
    for name in archs:
        try:
            zoo.model_family(name)
        except ValueError as e:
            raise UserError(str(e)) from None


def make_setup(args: argparse.Namespace, device: torch.device) -> Setup:
    recipe = load_recipe(args.recipe)
    if args.batch_size is not None:
        recipe = apply_overrides(recipe, {"batch_size": args.batch_size})
    bundle = (synthetic_bundle(args.synthetic, args.dataset, args.seed) if args.synthetic
              else load_dataset(args.dataset, args.data_dir))
    if len(bundle.train) - min(args.eval_images, len(bundle.train) // 2) < recipe.batch_size:
        raise UserError(f"batch size {recipe.batch_size} exceeds the {len(bundle.train)} training images "
                        f"left after the {args.eval_images} evaluation images")
    workers = args.workers if args.workers is not None else min(8, _cores())
    # Without native bf16 a 2048² bf16 matmul is emulated (a minute for one product) and no mode trains in bf16.
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if native_bf16(device) else [])
    peaks = {name: measure_matmul_peak(device, dtype) for name, dtype in dtypes}
    return Setup(bundle, recipe, device, args.steps, args.warmup, workers, args.seed, args.eval_images, peaks)


def run_meta(args: argparse.Namespace, argv: list[str], setup: Setup, modes: list[str]) -> dict[str, Any]:
    device, bundle, recipe = setup.device, setup.bundle, setup.recipe
    name = device_name(device) + ("" if device.type == "cuda" else f" ({_cores()} cores available)")
    return {"device": device.type, "device_name": name, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "experiments/bench.py", *argv]),
            "batch_size": recipe.batch_size, "steps": args.steps, "warmup": args.warmup, "modes": modes,
            "recipe": recipe.name, "recipe_hash": recipe.hash(), "optimizer": recipe.optimizer.name,
            "dataset": {"name": bundle.name, "source": bundle.source, "train_images": len(bundle.train),
                        "synthetic": args.synthetic is not None},
            "epoch_sizes": recipe_sizes(bundle, recipe, args.seed), "eval_images": args.eval_images,
            "workers": setup.workers, "torch_threads": torch.get_num_threads(), "cores": _cores(),
            "peaks": setup.peaks, "memory_metric": memory_metric(device),
            "flops_convention": "forward FLOPs of one 3x32x32 image from zoo.model_info (FlopCounterMode, "
                                "1 MAC = 2 FLOPs, convolutions and matmuls only); training = 3x forward",
            "data_wait": ("time in next(batches) incl. host-to-device copy, % of step time"
                          + (", from a second pass synchronised around each fetch" if device.type == "cuda" else ""))}


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    archs, modes = _parse_list(args.arch, "--arch"), _parse_list(args.modes, "--modes")
    device = resolve_device(args.device)
    overhead_arch = args.overhead or ("resnet20" if device.type == "cpu" else "none")
    _check_args(args, modes, archs + ([] if overhead_arch == "none" else [overhead_arch]))
    modes = [m for m in MODES if m in modes]  # baseline and fp32 first: the others are compared with them
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as fit() does, for every mode
    with cpu_heap_policy(device):  # as fit() does; process-wide, so the baseline's steps gain from it too
        setup = make_setup(args, device)
        load_before = os.getloadavg()
        meta = run_meta(args, argv, setup, modes)
        report: dict[str, Any] = {"meta": meta, "archs": {}, "memory_efficient": None, "overhead": None}
        print(format_header(meta), flush=True)
        for arch in archs:
            report["archs"][arch] = bench_arch(arch, modes, setup, meta["epoch_sizes"])
            print(format_arch_table(arch, report["archs"][arch], meta) + "\n", flush=True)
        if args.memory_efficient:
            report["memory_efficient"] = compare_memory_efficient(setup)
        if overhead_arch != "none":
            report["overhead"] = compare_overhead(overhead_arch, args.overhead_mode, setup, args.overhead_rounds)
        meta["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    print(format_comparisons(report), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return exit_code(lambda: bench(args, argv))


if __name__ == "__main__":
    sys.exit(main())
