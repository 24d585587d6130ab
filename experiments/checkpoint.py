"""Checkpoints: atomic writes (a crash, a full disk or a kill while writing never damages the previous one)
and loads that cannot run code.

Checkpoints travel (MLflow artifacts on a shared server, files passed between colleagues), and unpickling
a crafted file runs whatever it names. So a checkpoint holds only tensors and plain Python values and is
read with ``torch.load(weights_only=True)``. A checkpoint from before that rule also holds numpy's RNG
state (an ndarray); it is read by an unpickler that resolves only the globals such a file contains,
converted once and rewritten. Anything else is refused unread.
"""
from __future__ import annotations

import codecs
import collections
import os
import pickle
import random
import sys
import tempfile
import warnings
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
    """Load a checkpoint written by ``save_atomic`` without running code from it.

    One written before checkpoints were weights-only is converted and rewritten in place (once, with a
    notice); a truncated, foreign or code-carrying file is a UserError naming it.
    """
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickles it did not write: the error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a type the weights-only unpickler refuses: perhaps the old format
        ckpt = _convert_old_format(path)
    except Exception as e:  # torch raises several types for truncated zips and pickles
        raise _corrupt(path, e) from None
    _check_written_here(path, ckpt)
    return ckpt


def _corrupt(path: Path, error: Exception) -> UserError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return UserError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {reason}); "
                     f"delete it to restart, or resume another run")


def _check_written_here(path: Path, ckpt: Any) -> None:
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"checkpoint {path} was not written by this harness")


# ----------------------------------------------------------------------------------------------
# RNG state, as tensors and plain values
# ----------------------------------------------------------------------------------------------

def rng_state(data_generator: torch.Generator) -> dict[str, Any]:
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),  # (version, tuple of ints, gauss): plain values already
        "numpy": [kind, key.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], data_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Checkpoints written before the weights-only format
# ----------------------------------------------------------------------------------------------

_reconstruct = np.empty(0).__reduce__()[0]  # numpy's array-unpickling function, whatever its module
# Every global a checkpoint of the old format names (torch's Storage types are resolved by torch.load).
_OLD_FORMAT_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 pickles the bytes of an array
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # as numpy 1 names it
}


class _ForeignGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class _OldFormatPickle:
    """A pickle module for torch.load whose unpickler resolves the old format's globals and nothing else,
    so no callable outside that list is ever reached."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return _OLD_FORMAT_GLOBALS[module, name]
            except KeyError:
                raise _ForeignGlobal(module, name) from None

    @classmethod
    def load(cls, file: Any, **kwargs: Any) -> Any:
        return cls.Unpickler(file, **kwargs).load()


def _convert_old_format(path: Path) -> dict[str, Any]:
    """Read an old-format checkpoint, give it the weights-only RNG layout and rewrite it atomically."""
    try:
        ckpt = torch.load(path, map_location="cpu", pickle_module=_OldFormatPickle, weights_only=False)
    except _ForeignGlobal as e:
        raise UserError(f"checkpoint {path} names {e.qualname}, which no checkpoint of this harness holds; "
                        f"refusing to load it (unpickling it could run code)") from None
    except Exception as e:
        raise _corrupt(path, e) from None
    _check_written_here(path, ckpt)
    numpy_state = ckpt.get("rng", {}).get("numpy")
    if not (isinstance(numpy_state, tuple) and len(numpy_state) == 5 and isinstance(numpy_state[1], np.ndarray)
            and numpy_state[1].dtype == np.uint32):
        raise UserError(f"checkpoint {path} was not written by this harness (unexpected numpy data)")
    kind, key, *rest = numpy_state
    ckpt["rng"]["numpy"] = [kind, key.tolist(), *rest]
    if not _plain(ckpt):
        raise UserError(f"checkpoint {path} was not written by this harness (numpy data outside its RNG state)")
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 alone writes
        save_atomic(ckpt, path)
        print(f"note: converted checkpoint {path} to the weights-only format (it was written by an older version "
              f"of the harness)", file=sys.stderr, flush=True)
    return ckpt


def _plain(obj: Any) -> bool:
    """Whether ``obj`` holds only what torch.load(weights_only=True) reads back: tensors and plain values."""
    if isinstance(obj, dict):
        return all(_plain(k) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor))


# ----------------------------------------------------------------------------------------------
# Where checkpoints live
# ----------------------------------------------------------------------------------------------

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
