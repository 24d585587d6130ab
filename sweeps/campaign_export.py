"""A campaign's FINISHED cells as plain files, so that a machine with no shared MLflow store can contribute cells.

``export`` writes one JSON file per FINISHED cell run (the runs the campaign skips as done: same recipe hash,
model arguments and data digest in its experiment): params, tags, every metric's history, start and end time,
status, run id and experiment (experiments.tracking.TrackingStore.export_run); sorted keys, so an unchanged
run exports to the same bytes. ``import`` checks every file against the campaign's cells before recreating
any, then recreates each as a FINISHED run of the campaign's experiment tagged ``imported_from_run_id``,
skipping those already there (the same run, an earlier import of it, or the cell FINISHED). Artifacts do not
travel: the analysis reads none.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from experiments import names
from experiments.errors import UserError
from experiments.tracking import TrackingStore
from sweeps.campaign_runs import DONE, RUNNING, cell_states, experiment_runs, is_cell_params
from sweeps.campaign_spec import Campaign, Cell

FORMAT = "cnn-zoo.cell-run/1"  # the files' "format" field: a change of layout gets a new number
FIELDS = {"format": str, "run_id": str, "run_name": str, "experiment": str, "status": str, "start_time": int,
          "end_time": int, "params": dict, "tags": dict, "metrics": dict}
POINT = {"step": int, "timestamp": int, "value": (int, float)}
RUN_ID = re.compile(r"[0-9A-Za-z_-]+")  # also keeps the id safe inside an MLflow search filter


def cell_file_name(key: str) -> str:
    """``resnet20/cifar10/seed0`` -> ``resnet20__cifar10__seed0.json``: characters no file system objects to."""
    return "__".join(re.sub(r"[^A-Za-z0-9._=,+-]+", "_", part) for part in key.split("/")) + ".json"


def export_cells(c: Campaign, store: TrackingStore, digests: dict[str, str], out: Path) -> int:
    """One file per FINISHED cell in ``out`` (created); returns how many."""
    states = cell_states(c, experiment_runs(c, store), digests)
    done = [cell for cell in c.cells if states[cell.key].state == DONE]
    out.mkdir(parents=True, exist_ok=True)
    for cell in done:
        run_id = states[cell.key].run_id
        path = out / cell_file_name(cell.key)
        text = json.dumps({"format": FORMAT} | store.export_run(run_id), sort_keys=True, indent=1) + "\n"
        partial = path.with_name(f".{path.name}.partial")  # an interrupted export leaves no half file to import
        partial.write_text(text)
        os.replace(partial, path)
        print(f"[campaign] exported {cell.key}: run {run_id} -> {path}", flush=True)
    print(f"[campaign] {c.name}: {len(done)} of {len(c.cells)} cells FINISHED, exported to {out}", flush=True)
    return len(done)


def read_records(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``*.json`` file of ``directory``, in name order, checked for form (UserError naming the file)."""
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory of exported cell runs")
    paths = sorted(directory.glob("*.json"))
    if not paths:
        raise UserError(f"{directory} holds no .json files to import")
    records = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a readable JSON file ({e}); nothing imported") from None
        problem = malformed(record)
        if problem:
            raise UserError(f"{path}: malformed exported run: {problem}; nothing imported")
        records.append((path, record))
    return records


def _typed(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def malformed(record: Any) -> str | None:
    """What makes ``record`` unlike export_cells' files, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key, kind in FIELDS.items():
        if not _typed(record.get(key), kind):
            return f"field {key!r} missing or not of type {kind.__name__}"
    if record["format"] != FORMAT:
        return f"format {record['format']!r}, expected {FORMAT!r}"
    if record["status"] != "FINISHED":
        return f"status {record['status']!r}: only FINISHED runs are imported"
    if not RUN_ID.fullmatch(record["run_id"]):
        return f"run_id {record['run_id']!r} is not an MLflow run id"
    for field in ("params", "tags"):
        if not all(isinstance(v, str) for v in record[field].values()):
            return f"{field} must map names to strings"
    if record["tags"].get("mlflow.runName", record["run_name"]) != record["run_name"]:
        return "run_name differs from tag mlflow.runName"
    for key, points in record["metrics"].items():
        if not isinstance(points, list) or not points or not all(
                isinstance(p, dict) and p.keys() == POINT.keys() and all(_typed(p[k], t) for k, t in POINT.items())
                for p in points):
            return f"metric {key!r} must be a non-empty list of {{step, timestamp, value}} points"
    return None


def matching_cell(c: Campaign, path: Path, record: dict[str, Any], digests: dict[str, str]) -> Cell:
    """The campaign cell that ``record``'s run trained, as the campaign matches runs to skip; else UserError."""
    params, tags = record["params"], record["tags"]
    refused = f"{path}: run {record['run_id']} does not belong to campaign {c.name}"
    if tags.get(names.KIND) != names.KIND_TRAIN:
        raise UserError(f"{refused}: tag {names.KIND} is {tags.get(names.KIND)!r}, not {names.KIND_TRAIN!r}; "
                        f"nothing imported")
    if params.get(names.RECIPE_HASH) != c.recipe.hash():
        raise UserError(f"{refused}: recipe hash {params.get(names.RECIPE_HASH)!r}, the campaign's is "
                        f"{c.recipe.hash()!r} (recipe {c.recipe.name}); nothing imported")
    cell = next((cell for cell in c.cells if is_cell_params(cell, params, None)), None)
    if cell is None:
        raise UserError(f"{refused}: no cell has its architecture, model arguments, dataset and seed "
                        f"({params.get(names.ARCH)}, {params.get(names.DATASET)}, seed {params.get(names.SEED)}); "
                        f"nothing imported")
    if params.get(names.DATA_DIGEST) != digests[cell.dataset]:
        raise UserError(f"{refused}: cell {cell.key} trained on {cell.dataset} data with digest "
                        f"{str(params.get(names.DATA_DIGEST))[:12]}, the campaign's data has "
                        f"{digests[cell.dataset][:12]}; nothing imported")
    return cell


def import_record(c: Campaign, store: TrackingStore, cell: Cell, record: dict[str, Any],
                  digests: dict[str, str]) -> bool:
    """Recreate ``record``'s run unless the store has it already; prints import or skip; True if imported."""
    original = record["run_id"]
    copies = store.search_runs(f"tags.`{names.IMPORTED_FROM_RUN_ID}` = '{original}'")
    for leftover in (r for r in copies if r.info.status != "FINISHED"):  # an import that was killed midway
        store.delete_run(leftover.info.run_id)
    state = cell_states(dataclasses.replace(c, cells=(cell,)), experiment_runs(c, store), digests)[cell.key]
    if state.state == DONE:
        why = ("the very run" if state.run_id == original
               else "an earlier import of it" if state.run.data.tags.get(names.IMPORTED_FROM_RUN_ID) == original
               else "the cell trained here")
        print(f"[campaign] skip   {cell.key}: run {state.run_id} FINISHED here ({why})", flush=True)
        return False
    if state.state == RUNNING:
        print(f"[campaign] skip   {cell.key}: run {state.run_id} is RUNNING here; import again if it does not "
              f"finish", flush=True)
        return False
    run_id = store.import_run(record)
    print(f"[campaign] import {cell.key}: run {original} -> run {run_id}", flush=True)
    return True


def import_cells(c: Campaign, store: TrackingStore, records: list[tuple[Path, dict[str, Any]]],
                 digests: dict[str, str]) -> int:
    """Match every one of read_records' ``records`` to its cell, then import each; returns how many were."""
    checked = [(matching_cell(c, path, record, digests), record) for path, record in records]
    imported = sum(import_record(c, store, cell, record, digests) for cell, record in checked)
    print(f"[campaign] {c.name}: {imported} imported, {len(checked) - imported} skipped, into experiment "
          f"{c.experiment!r} of {c.tracking_uri}", flush=True)
    return imported
