"""Where training runs: the device and its speed defaults, the torchrun process group, signals, the CPU heap
policy and seeds."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from experiments.errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


# ----------------------------------------------------------------------------------------------
# Speed defaults: bf16 autocast, channels_last, torch.compile
# ----------------------------------------------------------------------------------------------

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 arithmetic in hardware


@functools.cache
def native_cpu_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU does bf16 arithmetic in hardware (AVX-512 BF16 or AMX; Linux x86). Elsewhere bf16
    autocast would be emulated, slower than fp32, so the CPU default stays fp32 there."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in CPU_BF16_FLAGS)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs in hardware on ``device``: CUDA, or a CPU with AVX-512 BF16 / AMX."""
    return device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16())


@dataclass(frozen=True)
class CompileCost:
    """Measured cost and gain of torch.compile on one device type, and where the numbers come from."""

    speedup: float  # compiled over eager img/s, same model and settings
    compile_seconds: float  # the first compiled step's extra time, cold inductor cache
    eager_flops_per_second: float  # training FLOPs (3 x forward) per second, eager, under the device defaults
    source: str


# One row per device type; a device type without a row never compiles by default (nothing measured there).
# cpu, speed-up and compile seconds: docs/BENCHMARKS.md run A (2-core AMD EPYC, batch 64, fp32 NCHW, eager
# "harness" vs "compile" mode): ResNet-20 780.7/615.1 = 1.27x after 39.2 s, DenseNet-BC-100 57.3/48.4 = 1.18x
# after 112.6 s. (Its 1.51x and 1.12x are against the naive-loader baseline, not eager.) The row takes the
# smaller gain and the longer compile, so it errs towards not compiling. Eager rate: ResNet-20 under the new
# defaults (bf16 + channels_last, batch 128, same CPU, measured with Trainer + train_loader: 1,038 img/s x
# 243.3 training MFLOPs/image); DenseNet-BC-100 runs at a lower rate (48.4 x 1,727.6 MFLOPs = 84 GFLOP/s in
# fp32), so the faster rate means a shorter estimated run, again erring towards not compiling.
COMPILE_COSTS = {
    "cpu": CompileCost(speedup=1.18, compile_seconds=112.6, eager_flops_per_second=252.5e9,
                       source="docs/BENCHMARKS.md run A; eager rate measured with bf16 + channels_last"),
}
# Compiling pays when the time it saves is at least this many times the compile time: the margin covers the
# evaluation graph's own compilation and the error of a FLOP-based estimate of the run's length.
COMPILE_PAYBACK = 2.0


@dataclass(frozen=True)
class SpeedSettings:
    """What a run trains with, resolved from the flags and the device; ``compile_rule`` says why compile is what it is."""

    amp: bool
    channels_last: bool
    compile: bool
    compile_rule: str


def speed_settings(device: torch.device, amp: bool | None, channels_last: bool | None, compile: bool | None,
                   train_flops: float) -> SpeedSettings:
    """The device defaults for the flags left None: bf16 autocast on CUDA and on CPUs with native bf16,
    channels_last everywhere (it changes the memory layout, not the arithmetic), and torch.compile when the
    run is long enough to repay compiling. ``train_flops``: the training FLOPs the run has left on this process."""
    if amp is None:
        amp = native_bf16(device)
    if channels_last is None:
        channels_last = True
    if compile is not None:
        return SpeedSettings(amp, channels_last, compile, "explicit (--compile/--no-compile)")
    cost = COMPILE_COSTS.get(device.type)
    if cost is None:
        return SpeedSettings(amp, channels_last, False, f"off: no measured compile speed-up for {device.type}")
    eager = train_flops / cost.eager_flops_per_second
    saved = eager * (1.0 - 1.0 / cost.speedup)
    on = saved >= COMPILE_PAYBACK * cost.compile_seconds
    rule = (f"{'on' if on else 'off'}: saves ~{saved:.0f} s of ~{eager:.0f} s eager at {cost.speedup}x, "
            f"{'>=' if on else '<'} {COMPILE_PAYBACK:g} x {cost.compile_seconds:.0f} s compile ({device.type}, {cost.source})")
    return SpeedSettings(amp, channels_last, on, rule)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# torchrun
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> "DistEnv":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """NCCL on CUDA, Gloo on CPU; created (and destroyed) here unless the caller already made one."""
    create = env.world > 1 and not dist.is_initialized()
    if create:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if create:
            dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any (a collective: every rank must call it)."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def rank_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """A seed of its own per rank and resumable position, so ranks draw different dropout masks."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{epoch}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def graceful_signals(announce: bool = True) -> Iterator[list[int]]:
    """SIGTERM, SIGHUP (the terminal or SSH session closed) and the first Ctrl-C only set a flag, checked
    between steps; a second Ctrl-C aborts. With ``announce`` the first signal says so on stderr at once."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def handler(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and pending:
            raise KeyboardInterrupt
        if announce and not pending:
            # os.write, not print: the handler may interrupt a print to stderr (print is not reentrant).
            os.write(2, stop_notice(signum).encode())
        pending.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield pending
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_notice(signum: int) -> str:
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    return (f"\n{name} received: the run stops after the current step and writes a checkpoint "
            f"(--resume continues it); press Ctrl-C again to abort at once\n")


# ----------------------------------------------------------------------------------------------
# CPU memory policy (glibc)
# ----------------------------------------------------------------------------------------------

@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (CPU training, process-wide).

    By default every activation above 128 KiB is its own mmap, returned to the kernel when freed and
    faulted in page by page at the next step: on a 2-core CPU that spent about 40% of a DenseNet sweep's
    CPU time in the kernel. Heap-only allocation without trimming reuses the pages; the arithmetic is
    untouched. Returns False where there is no glibc (nothing changes).
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim(0)``); False without glibc.

    The counterpart of retain_freed_memory() once training ends: otherwise a process that goes on (a sweep
    worker between trials, or waiting for the other worker) keeps its largest model's peak resident. Two
    sweep workers on 24 GiB were OOM-killed that way.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def cpu_heap_policy(device: torch.device) -> Iterator[None]:
    """On the CPU, retain freed memory while the body trains and give it back when the body is done."""
    if device.type != "cpu":
        yield
        return
    retain_freed_memory()
    try:
        yield
    finally:  # the body's tensors are freed by now; give back what retain_freed_memory kept
        release_freed_memory()
