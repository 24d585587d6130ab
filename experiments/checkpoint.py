"""Atomic checkpoints: a crash, a full disk or a kill while writing never damages the previous one."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.errors import UserError

LAST = "last.pt"
BEST = "best.pt"


class CheckpointWriteError(UserError):
    """The disk refused a checkpoint (full, quota, permissions); the previous one was not touched."""


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save into a temporary file in the same directory, fsync, then rename over ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save wraps ENOSPC/EFBIG in RuntimeError
            previous = "the previous checkpoint is intact" if path.exists() else "no earlier checkpoint existed"
            raise CheckpointWriteError(f"cannot write checkpoint {path} ({e}); {previous}; free disk space "
                                       f"or choose another --output-dir, then --resume") from None
        raise


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by ``save_atomic``; a truncated or foreign file is a UserError."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated zips and pickles
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                        f"delete it to restart, or resume another run") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"checkpoint {path} was not written by this harness")
    return ckpt


def rng_state(data_generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], data_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_dir(output_dir: str | Path, run_key: str) -> Path:
    return Path(output_dir) / "checkpoints" / run_key


def find_resume(output_dir: str | Path, run: str) -> Path:
    """The ``last.pt`` of run id ``run``, or of the most recently written run for ``latest``."""
    root = Path(output_dir) / "checkpoints"
    if run == "latest":
        candidates = sorted(root.glob(f"*/{LAST}"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise UserError(f"--resume latest: no checkpoint under {root}; pass --output-dir where the run wrote them")
        return candidates[-1]
    path = root / run / LAST
    if not path.is_file():
        known = sorted(p.parent.name for p in root.glob(f"*/{LAST}"))[-5:]
        raise UserError(f"--resume {run}: no checkpoint {path}" + (f"; runs with checkpoints: {', '.join(known)}" if known else ""))
    return path
