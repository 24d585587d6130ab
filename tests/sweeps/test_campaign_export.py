"""sweeps/campaign.py export/import: a tiny campaign's FINISHED cells exported from store A and imported into
a fresh store B are done there (status, a rerun that trains nothing, the report), byte-stable exports,
idempotent imports, and files of another recipe or malformed ones refused before anything is imported."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
import pytest
import yaml

from experiments import names
from experiments.tracking import SYSTEM_METRICS_PREFIX
from sweeps.campaign import main
from sweeps.campaign_export import cell_file_name

CELLS = ("resnet20/cifar10/seed0", "resnet20/cifar10/seed1")
FILES = sorted(cell_file_name(k) for k in CELLS)


def _spec(tmp: Path, data_dir: str, experiment: str) -> dict:
    """A 2-cell campaign on tiny data whose store, checkpoints and report live in ``tmp``."""
    return {"name": "tiny", "experiment": experiment, "architectures": ["resnet20"], "datasets": ["cifar10"],
            "seeds": [0, 1], "recipe": "smoke", "recipe_overrides": {"subset": 160}, "data_dir": data_dir,
            "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "output_dir": str(tmp / "outputs"),
            "report_dir": str(tmp / "report"), "device": "cpu", "log_model": False}


def _write(tmp: Path, spec: dict, name: str = "campaign.yaml") -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_text(yaml.safe_dump(spec))
    return str(tmp / name)


def runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


@pytest.fixture(scope="module")
def trained(tiny_image_folder_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One tiny campaign trained once into store A, for every test of this module."""
    root = tmp_path_factory.mktemp("campaign_export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNN_ZOO_CACHE", str(tmp_path_factory.getbasetemp() / "campaign_cache"))
        data_dir = str(tiny_image_folder_archive.parent)
        experiment = f"campaign-{uuid.uuid4().hex[:8]}"
        spec = _spec(root / "a", data_dir, experiment)
        path = _write(root / "a", spec)
        assert main([path, "--storage", str(root / "a" / "optuna.journal")]) == 0
        yield {"root": root, "spec": spec, "a": path, "uri_a": spec["tracking_uri"], "experiment": experiment,
               "store": lambda name: _spec(root / name, data_dir, experiment)}


def _cell_lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith(CELLS[0].split("/")[0] + "/"))


def _histories(uri: str, run: mlflow.entities.Run) -> dict[str, list[tuple[int, int, float]]]:
    client = mlflow.MlflowClient(uri)
    return {key: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics if not key.startswith(SYSTEM_METRICS_PREFIX)}


def _export(campaign: str, out: Path, capsys: pytest.CaptureFixture) -> dict[str, bytes]:
    assert main(["export", campaign, str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[campaign] exported ") == len(CELLS), printed
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.slow  # trains (the module's campaign)
def test_exported_cells_imported_into_a_fresh_store_are_done_there(trained: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    files = _export(trained["a"], tmp_path / "cells", capsys)
    assert sorted(files) == FILES
    assert _export(trained["a"], tmp_path / "cells", capsys) == files  # byte-identical when repeated
    record = json.loads(files[FILES[0]])
    assert record["status"] == "FINISHED" and record["experiment"] == trained["experiment"]
    assert record["tags"][names.CELL] == CELLS[0] and record["tags"]["mlflow.runName"] == record["run_name"]
    assert [p["step"] for p in record["metrics"][names.VAL_ACC]] == [1, 2]
    assert not any(k.startswith(SYSTEM_METRICS_PREFIX) for k in record["metrics"])
    # A cell not FINISHED is not exported.
    wider = _write(trained["root"] / "a", trained["spec"] | {"seeds": [0, 1, 2]}, "wider.yaml")
    assert _export(wider, tmp_path / "wider", capsys).keys() == files.keys()

    spec_b = trained["store"]("b")
    b = _write(trained["root"] / "b", spec_b)
    assert main(["import", b, str(tmp_path / "cells")]) == 0
    out = capsys.readouterr().out
    assert out.count("[campaign] import ") == 2 and "2 imported, 0 skipped" in out, out
    by_id = {r.info.run_id: r for r in runs(trained["uri_a"], trained["experiment"])}
    copies = runs(spec_b["tracking_uri"], trained["experiment"])
    assert len(copies) == 2
    for copy in copies:
        original = by_id[copy.data.tags[names.IMPORTED_FROM_RUN_ID]]
        assert copy.info.status == "FINISHED" and copy.info.run_name == original.info.run_name
        assert (copy.info.start_time, copy.info.end_time) == (original.info.start_time, original.info.end_time)
        assert copy.data.params == original.data.params
        assert copy.data.tags == original.data.tags | {names.IMPORTED_FROM_RUN_ID: original.info.run_id}
        assert _histories(spec_b["tracking_uri"], copy) == _histories(trained["uri_a"], original)

    assert main(["status", trained["a"]]) == 0
    status_a = capsys.readouterr().out
    assert main(["status", b]) == 0
    status_b = capsys.readouterr().out
    assert "2 done, 0 running" in status_b and _cell_lines(status_b) == _cell_lines(status_a), status_b
    assert all("test acc " in line for line in _cell_lines(status_b))

    assert main(["import", b, str(tmp_path / "cells")]) == 0  # twice: nothing more
    out = capsys.readouterr().out
    assert out.count("[campaign] skip ") == 2 and "0 imported, 2 skipped" in out, out
    assert len(runs(spec_b["tracking_uri"], trained["experiment"])) == 2

    assert main([b, "--storage", str(trained["root"] / "b" / "optuna.journal")]) == 0  # the campaign on B
    out = capsys.readouterr().out
    assert "[campaign] 2 skipped, 0 resumed, 0 to start" in out and "starting" not in out, out
    assert len(runs(spec_b["tracking_uri"], trained["experiment"])) == 2
    (table,) = (Path(spec_b["report_dir"]) / trained["experiment"]).glob("*/results.csv")
    assert pd.read_csv(table)["seeds"].tolist() == [2]  # the report counts both imported cells...
    (table_a,) = (Path(trained["spec"]["report_dir"]) / trained["experiment"]).glob("*/results.csv")
    assert table.read_bytes() == table_a.read_bytes()  # ...as the report of store A does


@pytest.mark.slow  # trains (the module's campaign)
@pytest.mark.parametrize("field, key, value, said", [
    ("params", names.RECIPE_HASH, "0123456789ab", "recipe hash '0123456789ab'"),
    ("params", names.DATA_DIGEST, "f" * 64, "data with digest ffffffffffff"),
    ("params", names.SEED, "7", "no cell has its architecture"),
    ("tags", names.KIND, names.KIND_TRIAL, f"tag {names.KIND} is 'trial'"),
])
def test_a_file_of_another_cell_is_refused_before_anything_is_imported(
        trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture, field: str, key: str, value: str,
        said: str) -> None:
    _export(trained["a"], tmp_path / "cells", capsys)
    edited = tmp_path / "cells" / FILES[-1]  # the last file read: the first would be imported if checks came late
    record = json.loads(edited.read_text())
    record[field][key] = value
    edited.write_text(json.dumps(record))
    spec_c = trained["store"](f"c-{uuid.uuid4().hex[:6]}")
    assert main(["import", _write(Path(spec_c["output_dir"]).parent, spec_c), str(tmp_path / "cells")]) == 2
    err = capsys.readouterr().err
    assert said in err and str(edited) in err and err.count("\n") == 1, err
    assert not Path(spec_c["tracking_uri"].removeprefix("sqlite:///")).exists()  # no store, so nothing imported


def test_cell_file_names_are_safe() -> None:
    assert cell_file_name("densenet_bc-depth=10-growth_rate=4/cifar10/seed0") == (
        "densenet_bc-depth=10-growth_rate=4__cifar10__seed0.json")
    assert cell_file_name("x:a b/cifar10/seed1") == "x_a_b__cifar10__seed1.json"


GOOD = {"format": "cnn-zoo.cell-run/1", "run_id": "a" * 32, "run_name": "r", "experiment": "e",
        "status": "FINISHED", "start_time": 1, "end_time": 2, "params": {}, "tags": {}, "metrics": {}}


@pytest.mark.parametrize("text, said", [
    ("{", "not a readable JSON file"),
    ("[]", "not a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "end_time"}), "field 'end_time' missing"),
    (json.dumps(GOOD | {"format": "other/9"}), "format 'other/9'"),
    (json.dumps(GOOD | {"status": "KILLED"}), "only FINISHED runs"),
    (json.dumps(GOOD | {"run_id": "a' or '1"}), "not an MLflow run id"),
    (json.dumps(GOOD | {"params": {"seed": 0}}), "params must map names to strings"),
    (json.dumps(GOOD | {"metrics": {"val_acc": [{"step": 1, "value": 2.0}]}}), "metric 'val_acc'"),
])
def test_malformed_files_are_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, text: str,
                                                   said: str) -> None:
    campaign = _write(tmp_path, _spec(tmp_path, str(tmp_path / "no-data"), "campaign-x"))
    cells = tmp_path / "cells"
    cells.mkdir()
    (cells / "a.json").write_text(json.dumps(GOOD))
    (cells / "b.json").write_text(text)
    assert main(["import", campaign, str(cells)]) == 2
    err = capsys.readouterr().err
    assert said in err and "b.json" in err and err.count("\n") == 1, err
    assert not (tmp_path / "mlflow.db").exists()


def test_import_of_an_empty_or_missing_folder_fails_with_one_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    campaign = _write(tmp_path, _spec(tmp_path, str(tmp_path / "no-data"), "campaign-x"))
    (tmp_path / "empty").mkdir()
    for folder, said in (("empty", "holds no .json files"), ("missing", "is not a directory")):
        assert main(["import", campaign, str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
