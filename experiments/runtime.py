"""Where training runs: the device, the torchrun process group, signals, the CPU heap policy and seeds."""
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
def graceful_signals() -> Iterator[list[int]]:
    """SIGTERM, SIGHUP (the terminal or SSH session closed) and the first Ctrl-C only set a flag, checked
    between steps; a second Ctrl-C aborts."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return

    def handler(signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and pending:
            raise KeyboardInterrupt
        pending.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield pending
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
