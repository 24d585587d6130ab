"""A campaign's cells as MLflow holds them: the train runs of its experiment with the campaign's recipe hash,
model arguments (and, when known, data digest) per cell; what each cell needs next (skip, resume, start);
and the status table with the time left, from the throughput the runs measured."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments import checkpoint as ckpt_io
from experiments import names
from experiments.tracking import TrackingStore
from sweeps.campaign_spec import Campaign, Cell

DONE, RUNNING, RESUME, FAILED, PENDING = "done", "running", "resume", "failed", "pending"


@dataclass(frozen=True)
class CellState:
    state: str  # DONE | RUNNING | RESUME (KILLED or FAILED, with a checkpoint) | FAILED (without one) | PENDING
    run: Any = None  # the mlflow Run it was read from (None: PENDING)

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else None

    def metric(self, key: str) -> float | None:
        return self.run.data.metrics.get(key) if self.run is not None else None


def experiment_runs(c: Campaign, store: TrackingStore) -> list[Any]:
    """The experiment's train runs under the campaign's recipe hash, newest first."""
    query = f"tags.`{names.KIND}` = '{names.KIND_TRAIN}' and params.{names.RECIPE_HASH} = '{c.recipe.hash()}'"
    return store.search_runs(query, order_by=["attributes.start_time DESC"])


def is_cell_run(cell: Cell, run: Any, digest: str | None) -> bool:
    """``run`` trained ``cell``'s model on its dataset and seed (and, with ``digest``, on that data)."""
    return is_cell_params(cell, run.data.params, digest)


def is_cell_params(cell: Cell, params: dict[str, str], digest: str | None) -> bool:
    """A run with these MLflow ``params`` trained ``cell`` (on data ``digest``, unless None)."""
    model = {k: v for k, v in params.items() if k.startswith(names.MODEL_PARAM_PREFIX)}
    return (params.get(names.ARCH) == cell.arch and params.get(names.DATASET) == cell.dataset
            and params.get(names.SEED) == str(cell.seed) and model == cell.model_params()
            and (digest is None or params.get(names.DATA_DIGEST) == digest))


def cell_states(c: Campaign, runs: list[Any], digests: dict[str, str] | None) -> dict[str, CellState]:
    """Each cell's state from its newest runs: FINISHED anywhere wins, then RUNNING, then a checkpoint to
    resume; ``digests``: dataset -> data digest, or None to match runs on any data (status)."""
    return {cell.key: _state(c, [r for r in runs if is_cell_run(cell, r, digests and digests[cell.dataset])])
            for cell in c.cells}


def _state(c: Campaign, runs: list[Any]) -> CellState:
    for status, state in (("FINISHED", DONE), ("RUNNING", RUNNING)):
        for run in runs:
            if run.info.status == status:
                return CellState(state, run)
    for run in runs:
        if checkpoint_path(c, run.info.run_id).is_file():
            return CellState(RESUME, run)
    return CellState(FAILED, runs[0]) if runs else CellState(PENDING)


def checkpoint_path(c: Campaign, run_id: str) -> Path:
    return ckpt_io.run_dir(c.output_dir, run_id) / ckpt_io.LAST


# ----------------------------------------------------------------------------------------------
# status
# ----------------------------------------------------------------------------------------------

@dataclass
class Row:
    cell: Cell
    state: CellState
    epochs_done: int = 0
    epochs: int | None = None
    train_size: int | None = None
    img_s: float | None = None  # this cell's own measured throughput

    def images_left(self) -> float | None:
        if self.epochs is None or self.train_size is None:
            return None
        return max(0, self.epochs - self.epochs_done) * self.train_size


def status_rows(c: Campaign, store: TrackingStore, runs: list[Any]) -> list[Row]:
    """One row per cell, with its progress; pending cells borrow epochs and training-set size from a run
    of their dataset."""
    states = cell_states(c, runs, None)
    rows = []
    for cell in c.cells:
        row = Row(cell, states[cell.key])
        run = row.state.run
        if run is not None:
            row.epochs = int(run.data.params.get(names.EPOCHS, c.recipe.epochs))
            row.train_size = int(run.data.params[names.TRAIN_SIZE]) if names.TRAIN_SIZE in run.data.params else None
            row.img_s = row.state.metric(names.IMAGES_PER_SECOND)
            row.epochs_done = row.epochs if row.state.state == DONE else _epochs_logged(store, run.info.run_id)
        rows.append(row)
    for row in rows:
        if row.state.run is None:
            like = next((r for r in rows if r.cell.dataset == row.cell.dataset and r.train_size), None)
            row.epochs = like.epochs if like else None
            row.train_size = like.train_size if like else None
    return rows


def _epochs_logged(store: TrackingStore, run_id: str) -> int:
    return len(store.metric_history(run_id, names.EPOCH_SECONDS))


def throughput(rows: list[Row], cell: Cell, flops: dict[str, int]) -> float | None:
    """Measured img/s of the finished or running cells of ``cell``'s architecture; else the FLOP rate the other
    cells measured, at ``cell``'s forward FLOPs per image (``flops``: per cell key; a model with twice the
    FLOPs trains at about half the img/s); None before any cell has a measured speed."""
    measured = [r for r in rows if r.img_s and r.state.state in (DONE, RUNNING)]
    same = [r.img_s for r in measured if r.cell.label == cell.label]
    if same:
        return statistics.fmean(same)
    rates = [r.img_s * flops[r.cell.key] for r in measured]
    return statistics.fmean(rates) / flops[cell.key] if rates else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def _detail(row: Row, seconds_left: float | None) -> str:
    s, epochs = row.state, row.epochs
    reason = s.run.data.tags.get(names.FAILURE) if s.run is not None else None
    if s.state == DONE:
        acc = s.metric(names.FINAL_TEST_ACC)
        return f"test acc {acc:.2f}%" if acc is not None else "finished (no test accuracy)"
    if s.state == RUNNING:
        speed = f"{row.img_s:,.0f} img/s" if row.img_s else "? img/s"
        return f"epoch {row.epochs_done}/{epochs}, {speed}, ETA {duration(seconds_left)}"
    if s.state == RESUME:
        return (f"{s.run.info.status} at epoch {row.epochs_done}/{epochs}, resumes from its checkpoint"
                + (f" ({reason})" if reason else ""))
    if s.state == FAILED:
        return (reason or f"{s.run.info.status} before its first checkpoint").splitlines()[0] + "; starts again"
    return f"ETA {duration(seconds_left)} once started"


def status_text(c: Campaign, store: TrackingStore) -> str:
    rows = status_rows(c, store, experiment_runs(c, store))
    width = max(len(r.cell.key) for r in rows)
    title = (f"campaign {c.name}: experiment {c.experiment!r} in {c.tracking_uri}, recipe {c.recipe.name} "
             f"({c.recipe.hash()}), {len(rows)} cells")
    lines = [title, f"{'cell':<{width}}  {'state':<8} detail"]
    left: list[float | None] = []  # seconds per cell not done; None: no measured throughput to estimate it
    flops = {key: info["flops"] for key, info in c.info.items()}  # counted by load_campaign, at the training size
    for row in rows:
        speed, images = throughput(rows, row.cell, flops), row.images_left()
        seconds = images / speed if speed and images is not None else None
        if row.state.state != DONE:
            left.append(seconds)
        lines.append(f"{row.cell.key:<{width}}  {row.state.state:<8} {_detail(row, seconds)}")
    counts = {state: sum(r.state.state == state for r in rows) for state in (DONE, RUNNING, RESUME, FAILED, PENDING)}
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    lines.append(time_left_line(left, counts[RUNNING]))
    return "\n".join(lines)


def time_left_line(left: list[float | None], running: int) -> str:
    """The campaign's time left from each unfinished cell's estimate (None: not measurable yet)."""
    if not left:
        return "time left: none, every cell is done"
    known = [s for s in left if s is not None]
    unknown = len(left) - len(known)
    cells = f"{unknown} cell{'s' if unknown != 1 else ''}"
    if not known:  # 0 s would read as "almost done"
        return f"time left: unknown until a cell has trained ({cells} pending)"
    total = sum(known)
    line = f"time left: {duration(total)} of training at the measured speeds on one worker"
    if running > 1:
        line += f", about {duration(total / running)} with the {running} cells running now in parallel"
    if unknown:
        line += f" (plus {cells} with no measured throughput yet)"
    return line
