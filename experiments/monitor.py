"""What a run tells its user while it trains: how long it will take here (measured on its first steps) and
whether it has diverged. Pure functions of numbers; fit() feeds them and prints their lines."""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Mapping, Sequence

from experiments import names

# --- divergence ---
# ln(C) is the cross-entropy of a uniform guess, where every freshly initialised model starts. An epoch's
# mean training loss above LOSS_LIMIT x ln(C) means predictions confidently wrong on average, which no
# healthy SGD run produces; 3x rather than 2x leaves room for auxiliary-classifier losses (GoogLeNet's two
# heads at weight 0.3 start the sum at ~1.6 ln C) and label smoothing. A loss that climbs to LOSS_LIMIT x its
# first epoch's value and above ln(C) has blown up mid-run even if it stays below that absolute bound.
LOSS_LIMIT = 3.0
# After warm-up an epoch's training accuracy averages thousands of predictions: a model that learned
# anything is then well clear of chance (100/C %); within CHANCE_MARGIN x chance of it, it learned nothing.
CHANCE_MARGIN = 0.5
MIN_EPOCHS_BEFORE_CHANCE_CHECK = 3


def divergence(history: Sequence[Mapping[str, float]], num_classes: int, warmup_epochs: int) -> tuple[int, str] | None:
    """The first epoch of ``history`` at which the run looks diverged, and why; None while it does not."""
    uniform = math.log(num_classes)
    chance = 100.0 / num_classes
    first = history[0][names.TRAIN_LOSS] if history else 0.0
    for row in history:
        epoch, loss, acc = int(row["epoch"]), row[names.TRAIN_LOSS], row[names.TRAIN_ACC]
        if loss > LOSS_LIMIT * uniform:
            return epoch, (f"training loss {loss:.3g} at epoch {epoch}, above {LOSS_LIMIT:g}x ln({num_classes}) = "
                           f"{LOSS_LIMIT * uniform:.3g} (a uniform guess scores ln({num_classes}))")
        if loss > LOSS_LIMIT * first and loss > uniform:
            return epoch, (f"training loss {loss:.3g} at epoch {epoch}, above {LOSS_LIMIT:g}x its first value "
                           f"{first:.3g} and above a uniform guess's {uniform:.3g}")
        if epoch > max(MIN_EPOCHS_BEFORE_CHANCE_CHECK, warmup_epochs) and acc < chance * (1 + CHANCE_MARGIN):
            return epoch, (f"training accuracy {acc:.1f}% at epoch {epoch}, at chance ({chance:.3g}% for "
                           f"{num_classes} classes) after warm-up")
    return None


# --- how long the run will take ---

@dataclass(frozen=True)
class RunLength:
    """What is left of a run, in the units it is measured in."""

    train_steps: int  # training steps still to run
    batch_size: int  # global batch
    eval_batches: int  # evaluation batches still to run (validation and test, every evaluated epoch)
    epochs: int  # epochs this covers (a started epoch counts)
    resumed: bool

    def seconds(self, step_seconds: float, eval_batch_seconds: float) -> float:
        return self.train_steps * step_seconds + self.eval_batches * eval_batch_seconds


def eval_batches_left(first_epoch: int, epochs: int, eval_every: int, per_eval: int) -> int:
    """Evaluation batches from ``first_epoch`` to ``epochs``: ``per_eval`` every ``eval_every`` epochs and at the end."""
    evaluated = sum(1 for e in range(first_epoch, epochs + 1) if e % eval_every == 0 or e == epochs)
    return evaluated * per_eval


def duration(seconds: float) -> str:
    """``1h 05m`` from an hour on, ``4m 09s`` below."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def estimate_line(length: RunLength, seconds: float, images_per_second: float) -> str:
    which = "the remaining " if length.resumed else ""
    return (f"estimated {duration(seconds)} for {which}{length.epochs} epoch{'s' if length.epochs != 1 else ''} "
            f"(train + eval) on this machine at {images_per_second:,.0f} img/s")


def preview_line(length: RunLength, seconds: float, eager_images_per_second: float, steps: int, speedup: float,
                 compile_seconds: float) -> str:
    """A compiled run's estimate before compilation: ``seconds`` counts ``compile_seconds`` of compilation and
    the run at ``eager_images_per_second`` (measured on ``steps`` eager steps) times the tabulated ``speedup``."""
    which = "the remaining " if length.resumed else ""
    return (f"estimated {duration(seconds)} for {which}{length.epochs} epoch{'s' if length.epochs != 1 else ''} "
            f"(train + eval + ~{duration(compile_seconds)} compile) on this machine: {steps} eager "
            f"step{'s' if steps != 1 else ''} at {eager_images_per_second:,.0f} img/s x {speedup:g} compiled "
            f"(tabulated); a measured estimate follows after compilation")


QUICKSTART_AFTER_SECONDS = 3600.0  # beyond this a CPU user is offered the quickstart
QUICKSTART, QUICKSTART_ARCH = "quickstart", "resnet20"


def quickstart_line(data_dir: str, dataset: str, quickstart_flops: float, flops_per_second: float) -> str:
    """The quickstart's command, with how long it trains here: its ``quickstart_flops`` of training at this
    run's measured ``flops_per_second`` (0 FLOPs: it has no training steps on this data; no time said)."""
    data = f" --dataset {dataset}" if dataset != "cifar10" else ""
    if quickstart_flops > 0 and flops_per_second > 0:
        seconds = quickstart_flops / flops_per_second
        minutes = max(1, round(seconds / 60))
        when = (f"trains to a meaningful result in about {f'{minutes} min' if minutes < 60 else duration(seconds)} "
                f"on this machine (at this run's {flops_per_second / 1e9:,.0f} GFLOP/s)")
    else:
        when = "trains to a meaningful result sooner"
    return (f"that is long: the quickstart ({QUICKSTART_ARCH}, recipe {QUICKSTART}) {when}; run\n"
            f"  python experiments/run.py --arch {QUICKSTART_ARCH} --recipe {QUICKSTART}{data} "
            f"--data-dir {shlex.quote(data_dir)}")
