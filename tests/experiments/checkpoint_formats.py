"""Checkpoints as earlier versions of the harness wrote them, and ones crafted to run code when unpickled."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

# The keys of a last.pt, in order, as every version wrote them (experiments/train.py's _save_last before the
# split into fit.py and resume.py, and Checkpoint.to_dict since) ...
OLD_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "run_id", "arch", "recipe_hash", "config", "epoch",
                       "history", "best_val_acc", "best_epoch", "best_test_acc", "elapsed", "partial", "tracking_uri",
                       "data_digest")
# ... and since train, evaluation and wall seconds are kept apart, two more.
CHECKPOINT_KEYS = (*OLD_CHECKPOINT_KEYS, "eval_seconds", "wall_seconds")


def old_format(ckpt: dict[str, Any]) -> dict[str, Any]:
    """``ckpt`` (as experiments.checkpoint.load returns it) as the harness wrote it before checkpoints were
    weights-only: numpy's RNG state is the tuple np.random.get_state() returns, with its uint32 array; no
    evaluation or wall seconds; the speed flags in its config as given (None: "on for CUDA only" then, so
    ``ckpt`` must come from a run with amp and channels_last off on the CPU). torch.save it to get the old file."""
    assert tuple(ckpt) == CHECKPOINT_KEYS
    kind, key, pos, has_gauss, gauss = ckpt["rng"]["numpy"]
    old = {k: ckpt[k] for k in OLD_CHECKPOINT_KEYS}
    config = {**ckpt["config"], "amp": None, "channels_last": None}
    return {**old, "config": config,
            "rng": {**ckpt["rng"], "numpy": (kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss)}}


class CreatesFile:
    """Unpickling this creates ``path``: a harmless stand-in for what a crafted checkpoint could run."""

    def __init__(self, path: Path, how: str):
        self.path, self.how = str(path), how

    def __reduce__(self) -> tuple:
        if self.how == "open":
            return open, (self.path, "w")
        return os.system, (f"touch {self.path}",)
