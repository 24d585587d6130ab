"""Training throughput: the way reference CIFAR repositories train against this harness, eager and compiled.

    python experiments/bench.py --arch resnet20,densenet_bc --device cpu --batch-size 64 --steps 10 --data-dir ../shared/data
    python experiments/bench.py --device cuda --data-dir ../shared/data --json bench-cuda.json

Modes (same model initialisation, recipe optimizer, batch size and step counts):
  baseline  a torchvision-CIFAR-style Dataset (PIL image -> RandomCrop(32, padding) -> RandomHorizontalFlip ->
            ToTensor -> Normalize) behind a DataLoader (min(8, cores) workers, pinned memory on CUDA); eager,
            fp32, NCHW
  harness   fit()'s path: DeviceLoader (device-resident uint8, batched crop/flip/normalise) + Trainer, with
            bf16 autocast and channels_last on CUDA (fp32 NCHW on the CPU, as fit() defaults)
  compile   harness with Trainer(compile=True); the warm-up's extra time is reported as compile seconds

Every mode runs fit()'s per-step work (Trainer.train_step plus the device-side loss/accuracy sums), so they
differ only in the data pipeline, precision, memory layout and compilation. Each mode runs --warmup steps,
then --steps timed steps synchronised at the ends only; on CUDA a second pass of --steps steps, synchronised
around every batch fetch, attributes the data wait. FLOPs come from zoo.model_info (forward pass of one
3x32x32 image, 1 MAC = 2 FLOPs); training FLOPs are taken as 3x forward; MFU is training FLOPs per second
over the matrix-multiply rate measured at start-up (bf16 on CUDA, fp32 on the CPU).
"""
from __future__ import annotations

import argparse
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
from dataclasses import dataclass
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
from experiments.config import Recipe, apply_overrides, list_recipes, load_recipe
from experiments.data import NUM_CLASSES, ArrayDataset, DatasetBundle, DeviceLoader, load_dataset
from experiments.errors import UserError
from experiments.runtime import release_freed_memory, resolve_device, retain_freed_memory, seed_everything
from experiments.trainer import StepMeter, Trainer, train_loader

DEFAULT_ARCHS = "resnet20,resnet110,densenet_bc,vgg16_bn,inception_v3,bit_r50x1"
MODES = ("baseline", "harness", "compile")
TRAIN_FLOPS_PER_FORWARD = 3  # backward ~ 2x forward (gradients w.r.t. activations and weights)
PEAK_SECONDS = 1.0  # time spent measuring the matmul rate
PREBUILT_BATCHES = 16  # the bare loop cycles through this many ready device batches

# Targets from the issue. CUDA ones are judged only on CUDA runs, the overhead one only on CPU runs.
SPEEDUP_TARGETS = {"resnet20": 5.0, "resnet110": 3.0, "densenet_bc": 3.0, "vgg16_bn": 2.0, "inception_v3": 2.0,
                   "bit_r50x1": 2.0}
MAX_DATA_WAIT = 0.02
MIN_MEMORY_SAVING = 0.40
MAX_TIME_INCREASE = 0.25
MAX_OVERHEAD_RATIO = 1.03


# ---------------------------------------------------------------------------------------------- arithmetic


def images_per_second(batch_size: int, steps: int, seconds: float) -> float:
    return batch_size * steps / seconds


def speedup(ips: float, baseline_ips: float | None) -> float | None:
    return None if baseline_ips is None else ips / baseline_ips


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
    """Harness step time over bare-loop step time (1.03 = 3% overhead)."""
    return harness_step_seconds / bare_step_seconds


def memory_saving(standard_peak: float, efficient_peak: float) -> float:
    """Fraction of the standard path's peak memory that the memory-efficient path saves."""
    return 1.0 - efficient_peak / standard_peak


def time_increase(standard_step_seconds: float, efficient_step_seconds: float) -> float:
    """Extra step time of the memory-efficient path, as a fraction of the standard path's."""
    return efficient_step_seconds / standard_step_seconds - 1.0


def compare_modes(modes: dict[str, dict[str, Any]], forward_flops: int,
                  peak_flops_per_second: float) -> dict[str, dict[str, float | None]]:
    """Per mode: speed-up over the baseline (None without one) and MFU."""
    base = modes.get("baseline", {}).get("images_per_second")
    return {mode: {"speedup_vs_baseline": speedup(r["images_per_second"], base),
                   "mfu": mfu(forward_flops, r["images_per_second"], peak_flops_per_second)}
            for mode, r in modes.items()}


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets that this report can judge: CUDA targets on CUDA runs, the overhead one on CPU runs,
    "no recompilation in steady state" wherever compile mode ran."""
    cuda = report["meta"]["device"] == "cuda"
    rows = []

    def add(target: str, required: str, measured: str, met: bool) -> None:
        rows.append({"target": target, "required": required, "measured": measured, "met": met})

    for arch, entry in report["archs"].items():
        for mode in ("harness", "compile"):
            r = entry["modes"].get(mode)
            if r is None:
                continue
            need = SPEEDUP_TARGETS.get(arch)
            if cuda and need is not None and r["speedup_vs_baseline"] is not None:
                add(f"{arch} {mode} speed-up over baseline", f">= {need:g}x", f"{r['speedup_vs_baseline']:.2f}x",
                    r["speedup_vs_baseline"] >= need)
            if cuda:
                add(f"{arch} {mode} data wait", f"< {MAX_DATA_WAIT:.0%} of step time",
                    f"{r['data_wait_fraction']:.2%}", r["data_wait_fraction"] < MAX_DATA_WAIT)
            if mode == "compile":
                add(f"{arch} compile: recompilations in steady state", "0", str(r["recompiles"]), r["recompiles"] == 0)
    me = report.get("memory_efficient")
    if cuda and me is not None:
        add("densenet_bc memory_efficient: peak memory saving", f">= {MIN_MEMORY_SAVING:.0%}",
            f"{me['memory_saving']:.1%}", me["memory_saving"] >= MIN_MEMORY_SAVING)
        add("densenet_bc memory_efficient: extra step time", f"<= {MAX_TIME_INCREASE:.0%}",
            f"{me['time_increase']:+.1%}", me["time_increase"] <= MAX_TIME_INCREASE)
    ov = report.get("overhead")
    if not cuda and ov is not None:
        add(f"{ov['arch']} harness overhead over the bare loop", f"<= {MAX_OVERHEAD_RATIO - 1:.0%}",
            f"{ov['ratio'] - 1:+.1%}", ov["ratio"] <= MAX_OVERHEAD_RATIO)
    return rows


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


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_matmul_peak(device: torch.device) -> dict[str, Any]:
    """The best sustained rate of a large square matmul: bf16 on CUDA, fp32 on the CPU (its training dtype)."""
    dtype, n = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 2048)
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                 platform.processor() or "unknown CPU")
    return f"{model} ({_cores()} cores available)"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _compile_counts() -> tuple[int, int]:
    """(graphs compiled so far, compile-cache hits so far); a recompilation adds a graph."""
    return (dynamo_counters["stats"]["unique_graphs"],
            dynamo_counters["inductor"]["fxgraph_cache_hit"] + dynamo_counters["aot_autograd"]["autograd_cache_hit"])


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


def baseline_batches(bundle: DatasetBundle, recipe: Recipe, batch_size: int, device: torch.device,
                     workers: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        PILArrayDataset(bundle.train, reference_transform(recipe, bundle.mean, bundle.std)), batch_size=batch_size,
        shuffle=True, num_workers=workers, pin_memory=cuda, drop_last=True, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed))
    for x, y in _forever(loader):  # the host-to-device copy is part of waiting for data
        yield x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)


def harness_loader(bundle: DatasetBundle, recipe: Recipe, batch_size: int, device: torch.device,
                   channels_last: bool, seed: int) -> DeviceLoader:
    """fit()'s training loader (experiments.trainer.train_loader), its generator seeded as fit() seeds it."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return train_loader(bundle.train, recipe, batch_size, generator, device=device, mean=bundle.mean, std=bundle.std,
                        channels_last=channels_last)


def synthetic_bundle(n: int, dataset: str, seed: int) -> DatasetBundle:
    """``n`` uniform random 32x32 images with random labels, for runs without the real archive."""
    rng = np.random.default_rng(seed)
    classes = NUM_CLASSES[dataset]
    ds = ArrayDataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, classes, n, dtype=np.int64))
    # Uniform bytes: mean 127.5 / 255, std sqrt((256^2 - 1) / 12) / 255.
    return DatasetBundle(name=dataset, train=ds, test=ds, classes=tuple(str(i) for i in range(classes)),
                         digest="synthetic", source=f"synthetic ({n} random images)", mean=(0.5, 0.5, 0.5),
                         std=(0.2898, 0.2898, 0.2898))


# -------------------------------------------------------------------------------------------------- steps


def bare_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward, backward and the recipe's optimizer and schedule step on the trainer's own model, with no
    metrics and no wrapper: the floor the harness's overhead is measured against."""
    with trainer.autocast():
        loss, _ = trainer.loss(trainer.model(x), y)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    trainer.scheduler.step()


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


@dataclass(frozen=True)
class Setup:
    bundle: DatasetBundle
    recipe: Recipe
    device: torch.device
    batch_size: int
    steps: int
    warmup: int
    workers: int
    seed: int


def run_mode(mode: str, arch: str, setup: Setup, model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build a fresh model and its batch source, warm up, time; the mode's numbers (comparisons added later)."""
    device, cuda = setup.device, setup.device.type == "cuda"
    memory = PeakMemory(device)
    memory.start()
    harness = mode != "baseline"
    fast = harness and cuda  # fit()'s defaults: bf16 autocast and channels_last on CUDA only
    if mode == "compile":
        torch._dynamo.reset()  # each model compiles from scratch, not against an earlier arch's cache entries
    seed_everything(setup.seed)
    model = zoo.create_model(arch, num_classes=setup.bundle.num_classes, **(model_kwargs or {}))
    passes = 2 if cuda else 1
    trainer = Trainer(model, setup.recipe, device, setup.warmup + passes * setup.steps, amp=fast,
                      channels_last=fast, compile=mode == "compile")
    if harness:
        batches = _forever(harness_loader(setup.bundle, setup.recipe, setup.batch_size, device, fast, setup.seed))
    else:
        batches = baseline_batches(setup.bundle, setup.recipe, setup.batch_size, device, setup.workers, setup.seed)
    meter = StepMeter(trainer)  # fit()'s step: train_step, device-side sums, periodic loss check
    step = meter.step
    graphs0, hits0 = _compile_counts()
    sync(device)
    start = time.perf_counter()
    for _ in range(setup.warmup):
        step(*next(batches))
    sync(device)
    warmup_seconds = time.perf_counter() - start
    graphs1, hits1 = _compile_counts()
    timed = timed_steps(batches, step, setup.steps, device, sync_each_fetch=False)
    # On the CPU nothing runs ahead of the host, so the timed pass attributes the wait exactly.
    waits = timed_steps(batches, step, setup.steps, device, sync_each_fetch=True) if cuda else timed
    graphs2, _ = _compile_counts()
    peak = memory.peak()
    batches.close()  # stops the DataLoader workers
    step_seconds = timed.seconds / setup.steps
    compiled = mode == "compile"
    return {
        "images_per_second": images_per_second(setup.batch_size, setup.steps, timed.seconds),
        "step_ms": 1000 * step_seconds,
        "timed_seconds": timed.seconds,
        "data_wait_fraction": waits.wait_seconds / waits.seconds,
        "peak_memory_bytes": peak,
        "warmup_seconds": warmup_seconds,
        "compile_seconds": compile_seconds(warmup_seconds, setup.warmup, step_seconds) if compiled else None,
        "graphs_compiled": graphs1 - graphs0 if compiled else None,
        "recompiles": graphs2 - graphs1 if compiled else None,
        "compile_cache_hits": hits1 - hits0 if compiled else None,
        "amp_bf16": fast,
        "channels_last": fast,
        "loss_finite": meter.finite,
    }


def bench_arch(arch: str, modes: Iterable[str], setup: Setup, peak_flops: float) -> dict[str, Any]:
    info = zoo.model_info(zoo.create_model(arch, num_classes=setup.bundle.num_classes))
    results = {mode: run_mode(mode, arch, setup) for mode in modes}
    for mode, extra in compare_modes(results, info["flops"], peak_flops).items():
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


def compare_overhead(arch: str, setup: Setup, rounds: int) -> dict[str, Any]:
    """Harness steps (DeviceLoader + fit()'s StepMeter) against bare steps on pre-built device batches, same model and
    optimizer, alternated for ``rounds`` rounds; the fastest round of each counts, which discounts
    interference from other processes."""
    device = setup.device
    fast = device.type == "cuda"
    seed_everything(setup.seed)
    model = zoo.create_model(arch, num_classes=setup.bundle.num_classes)
    trainer = Trainer(model, setup.recipe, device, 2 * (setup.warmup + rounds * setup.steps), amp=fast,
                      channels_last=fast, compile=False)
    batches = _forever(harness_loader(setup.bundle, setup.recipe, setup.batch_size, device, fast, setup.seed))
    prebuilt = [next(batches) for _ in range(min(setup.steps, PREBUILT_BATCHES))]
    fit_step = StepMeter(trainer).step

    def bare(x: torch.Tensor, y: torch.Tensor) -> None:
        bare_step(trainer, x, y)

    runs: dict[str, list[float]] = {"harness": [], "bare": []}
    for r in range(rounds + 1):  # round 0 warms both up and is not counted
        for name, source, step in (("harness", batches, fit_step), ("bare", itertools.cycle(prebuilt), bare)):
            n = setup.warmup if r == 0 else setup.steps
            seconds = timed_steps(source, step, n, device, sync_each_fetch=False).seconds
            if r:
                runs[name].append(1000 * seconds / n)
    harness_ms, bare_ms = min(runs["harness"]), min(runs["bare"])
    return {"arch": arch, "rounds": rounds, "harness_step_ms": harness_ms, "bare_step_ms": bare_ms,
            "harness_round_ms": runs["harness"], "bare_round_ms": runs["bare"],
            "ratio": overhead_ratio(harness_ms, bare_ms)}


# ------------------------------------------------------------------------------------------------ reporting


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def format_arch_table(arch: str, entry: dict[str, Any], meta: dict[str, Any]) -> str:
    head = (f"{arch}: {entry['params']:,} params | forward {entry['forward_flops_per_image'] / 1e6:,.1f} MFLOPs/image, "
            f"training ~3x = {entry['training_flops_per_image'] / 1e6:,.1f} | batch {meta['batch_size']}, "
            f"{meta['steps']} timed steps after {meta['warmup']} warm-up")
    cols = f"{'mode':<10}{'img/s':>10}{'vs base':>9}{'data wait':>11}{'peak MiB':>10}{'compile s':>11}{'recompiles':>12}{'MFU':>8}"
    lines = [head, cols]
    for mode, r in entry["modes"].items():
        lines.append(f"{mode:<10}{r['images_per_second']:>10,.1f}{_fmt(r['speedup_vs_baseline'], '.2f', 'x'):>9}"
                     f"{r['data_wait_fraction']:>11.1%}{_fmt(_mib(r['peak_memory_bytes']), ',.0f'):>10}"
                     f"{_fmt(r['compile_seconds'], '.1f'):>11}{_fmt(r['recompiles'], 'd'):>12}{r['mfu']:>8.2%}")
    return "\n".join(lines)


def format_header(meta: dict[str, Any]) -> str:
    return "\n".join([
        f"device: {meta['device_name']} | torch {meta['torch']} | {meta['date']}",
        f"data: {meta['dataset']['source']} | recipe {meta['recipe']} | DataLoader workers {meta['workers']}",
        f"MFU denominator: {meta['peak']['flops_per_second'] / 1e9:,.1f} GFLOP/s ({meta['peak']['label']})",
        f"peak memory: {meta['memory_metric']}", ""])


def format_comparisons(report: dict[str, Any]) -> str:
    """The memory-efficient and overhead comparisons and the targets, after the per-arch tables."""
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
        out += [f"{ov['arch']} harness vs bare loop (fastest of {ov['rounds']} alternating rounds): harness "
                f"{ov['harness_step_ms']:.1f} ms/step, bare {ov['bare_step_ms']:.1f} ms/step, ratio {ov['ratio']:.3f} "
                f"({ov['ratio'] - 1:+.1%} overhead)", ""]
    if report["targets"]:
        out.append("targets:")
        out += [f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['measured']} (needs {t['required']})"
                for t in report["targets"]]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=DEFAULT_ARCHS, help=f"comma list of zoo models (default {DEFAULT_ARCHS})")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (default all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--recipe", default="standard", help=f"optimizer/augmentation source: {', '.join(list_recipes())} or a .yaml path")
    p.add_argument("--batch-size", type=int, help="default: the recipe's (standard: 128)")
    p.add_argument("--steps", type=int, default=100, help="timed steps per mode (default 100)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first; compile mode compiles here (default 5)")
    p.add_argument("--workers", type=int, help="baseline DataLoader workers (default min(8, available cores))")
    p.add_argument("--dataset", choices=sorted(NUM_CLASSES), default="cifar10")
    p.add_argument("--data-dir", default="./data", help="as for run.py: official folders, image-folder tree or archive")
    p.add_argument("--synthetic", type=int, metavar="N", help="N random images instead of --data-dir")
    p.add_argument("--memory-efficient", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare DenseNet-BC-100 with memory_efficient=True (default on)")
    p.add_argument("--overhead", metavar="ARCH|none",
                   help="harness-vs-bare-loop overhead for ARCH (default resnet20 on the CPU, none on CUDA)")
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
                             ("--warmup", args.warmup, 1 if "compile" in modes else 0)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}" + (" (compile mode compiles during warm-up)" if flag == "--warmup" else ""))
    if args.synthetic is not None and args.synthetic < 1:
        raise UserError("--synthetic must be >= 1")
    for name in archs:
        try:
            zoo.model_family(name)
        except ValueError as e:
            raise UserError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        archs, modes = _parse_list(args.arch, "--arch"), _parse_list(args.modes, "--modes")
        device = resolve_device(args.device)
        overhead_arch = args.overhead or ("resnet20" if device.type == "cpu" else "none")
        _check_args(args, modes, archs + ([] if overhead_arch == "none" else [overhead_arch]))
        modes = [m for m in MODES if m in modes]  # baseline first: the others are compared with it
        recipe = load_recipe(args.recipe)
        if args.batch_size is not None:
            recipe = apply_overrides(recipe, {"batch_size": args.batch_size})
        bundle = (synthetic_bundle(args.synthetic, args.dataset, args.seed) if args.synthetic
                  else load_dataset(args.dataset, args.data_dir))
        if len(bundle.train) < recipe.batch_size:
            raise UserError(f"batch size {recipe.batch_size} exceeds the {len(bundle.train)} training images")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as fit() does, for every mode
        else:
            retain_freed_memory()  # as fit() does; process-wide, so the baseline's steps gain from it too
        workers = args.workers if args.workers is not None else min(8, _cores())
        setup = Setup(bundle, recipe, device, recipe.batch_size, args.steps, args.warmup, workers, args.seed)

        load_before = os.getloadavg()
        peak = measure_matmul_peak(device)
        meta = {"device": device.type, "device_name": device_name(device), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "python": platform.python_version(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": shlex.join(["python", "experiments/bench.py", *argv]),
                "batch_size": recipe.batch_size, "steps": args.steps, "warmup": args.warmup, "modes": modes,
                "recipe": recipe.name, "recipe_hash": recipe.hash(), "optimizer": recipe.optimizer.name,
                "dataset": {"name": bundle.name, "source": bundle.source, "train_images": len(bundle.train),
                            "synthetic": args.synthetic is not None},
                "workers": workers, "torch_threads": torch.get_num_threads(), "cores": _cores(),
                "peak": peak, "memory_metric": memory_metric(device),
                "flops_convention": "forward FLOPs of one 3x32x32 image from zoo.model_info (FlopCounterMode, "
                                    "1 MAC = 2 FLOPs, convolutions and matmuls only); training = 3x forward",
                "data_wait": ("time in next(batches) incl. host-to-device copy, % of step time"
                              + (", from a second pass synchronised around each fetch" if device.type == "cuda" else ""))}
        report: dict[str, Any] = {"meta": meta, "archs": {}, "memory_efficient": None, "overhead": None}
        print(format_header(meta), flush=True)
        for arch in archs:
            report["archs"][arch] = bench_arch(arch, modes, setup, peak["flops_per_second"])
            print(format_arch_table(arch, report["archs"][arch], meta) + "\n", flush=True)
        if args.memory_efficient:
            report["memory_efficient"] = compare_memory_efficient(setup)
        if overhead_arch != "none":
            report["overhead"] = compare_overhead(overhead_arch, setup, args.overhead_rounds)
        meta["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
        report["targets"] = evaluate_targets(report)
        print(format_comparisons(report), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
