"""run.py's command line: per-architecture model arguments, run names, --dry-run, the torch-free fast paths,
MLflow's quiet logging, and a fresh clone that a run leaves clean. (Timings: experiments/cli_timing.py.)"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import zoo
from experiments import cli_timing, names, zoo_names
from experiments.config import TIMM_PREFIX, RunConfig, arch_label, load_recipe, parse_arch_spec
from experiments.errors import UserError
from experiments.run import build_parser, main, resume_config
from experiments.tracking import mlflow_logging
from experiments.zoo_names import CACHE_FOLDER, registered_names, zoo_source_hash
from sweeps.study import SweepStorage
from tests.helpers import REPO


def test_cached_names_are_the_registry_and_follow_the_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CNN_ZOO_CACHE", str(tmp_path))
    assert registered_names() == zoo.list_models()  # listed, then cached
    (cached,) = (tmp_path / CACHE_FOLDER).iterdir()
    assert cached.name == f"{zoo_source_hash()}.json"
    cached.write_text('["resnet20", "from-the-cache"]')
    assert registered_names() == ["resnet20", "from-the-cache"]
    cached.write_text('["resnet20", "half-writ')  # damaged: listed again
    assert registered_names() == zoo.list_models()
    assert TIMM_PREFIX == zoo._registry.TIMM_PREFIX


def test_the_source_hash_covers_every_zoo_file(tmp_path, monkeypatch) -> None:
    copy = shutil.copytree(Path(zoo.__file__).parent, tmp_path / "zoo", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(zoo_names, "zoo_dir", lambda: copy)
    before = zoo_source_hash()
    with open(copy / "densenet.py", "a") as f:
        f.write("# an edit\n")
    assert zoo_source_hash() != before


@pytest.mark.parametrize("spec, expected", [
    ("resnet20", [("resnet20", {})]),
    ("resnet20, resnet56,", [("resnet20", {}), ("resnet56", {})]),
    ("resnet20,densenet_bc:depth=40,growth_rate=12",
     [("resnet20", {}), ("densenet_bc", {"depth": 40, "growth_rate": 12})]),
    ("densenet_bc:depth=40,densenet_bc:depth=100,compression=5e-1",
     [("densenet_bc", {"depth": 40}), ("densenet_bc", {"depth": 100, "compression": 0.5})]),
    ("timm:resnet18,timm:vit_tiny_patch16_224:img_size=32,vgg16_bn:head=fc4096",
     [("timm:resnet18", {}), ("timm:vit_tiny_patch16_224", {"img_size": 32}), ("vgg16_bn", {"head": "fc4096"})]),
])
def test_arch_spec_grammar(spec: str, expected: list) -> None:
    assert parse_arch_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("depth=40,densenet_bc", "'depth=40' follows no architecture; write NAME:depth=40"),
    (":depth=40", "':depth=40' names no architecture"),
    ("densenet_bc:depth", "--arch densenet_bc: expects KEY=VALUE, got 'depth'"),
    ("densenet_bc:depth=40,depth=100", "--arch densenet_bc: depth is given twice"),
    (" , ", "names no architecture"),
])
def test_arch_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(UserError) as e:
        parse_arch_spec(spec)
    assert message in str(e.value)


def test_arch_label_names_only_non_default_arguments() -> None:
    defaults = zoo.model_defaults("densenet_bc")
    assert arch_label("densenet_bc", {}, defaults) == "densenet_bc"
    assert arch_label("densenet_bc", {"growth_rate": 12, "depth": 40}, defaults) == "densenet_bc-depth=40"
    assert arch_label("timm:resnet18", {"drop_rate": 0.1}, {}) == "timm:resnet18-drop_rate=0.1"


def test_each_architecture_gets_its_own_arguments_and_dry_run_shows_what_is_built(capsys) -> None:
    assert main(["--arch", "resnet20,densenet_bc:depth=40,growth_rate=24", "--compression", "0.75",
                 "--dry-run"]) == 2  # --compression applies to resnet20 too, which has none
    assert capsys.readouterr().err.strip() == "error: resnet20 has no hyperparameter 'compression'; accepted: shortcut"

    assert main(["--arch", "resnet20,densenet_bc:depth=40,growth_rate=24", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "arch: resnet20\nrecipe:" in out and "model: {}" in out  # the saved config keeps what was given
    assert "model:\n  depth: 40\n  growth_rate: 24\ndataset:" in out
    assert "# resnet20 is built with (defaults and the given arguments): {shortcut: A}" in out
    assert ("# densenet_bc is built with (defaults and the given arguments): {depth: 40, growth_rate: 24, "
            "compression: 0.5, ") in out
    assert "# resnet20: 269,722 trainable params" in out and "# densenet_bc: " in out


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet20,densenet_bc", "--depth", "40"], "error: resnet20 has no hyperparameter 'depth'"),
    (["--arch", "densenet_bc:depth=40", "--depth", "100"],
     "error: densenet_bc: depth is given both after 'densenet_bc:' in --arch and as a flag for every architecture"),
    (["--arch", "densenet_bc:depth=101"], "error: DenseNet-BC depth must satisfy (depth - 4) % 6 == 0"),
    (["--arch", "resnet21:shortcut=B"], "error: unknown model 'resnet21'. Did you mean"),
    (["--arch", "timm:vit_tiny_patch16_224"],
     "error: timm:vit_tiny_patch16_224 does not take 32x32 images (Input height (32) doesn't match model (224).); "
     "if it has an img_size argument, give it: --arch timm:vit_tiny_patch16_224:img_size=32"),
])
def test_bad_arch_arguments_are_one_line_exit_2(capsys, argv: list[str], message: str) -> None:
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err


def test_timm_imagenet_stem_is_warned_about(capsys) -> None:
    assert main(["--arch", "timm:resnet18", "--seeds", "0,1", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [  # once per model, not per seed
        "warning: timm:resnet18 was designed for 224x224 ImageNet images: its stem downsamples a 32x32 input to "
        "16x16 and its last stage sees 1x1, which costs accuracy; the zoo's variants are built for 32x32"]
    assert "# timm:resnet18 is built with (timm's own defaults, updated by the given arguments): {}" in captured.out
    assert main(["--arch", "resnet20", "--dry-run"]) == 0
    assert capsys.readouterr().err == ""


def test_epochs_replaces_an_iteration_budget(capsys) -> None:
    assert main(["--arch", "resnet20", "--recipe", "resnet-paper", "--epochs", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  epochs: 3\n  max_steps: null\n" in out


def test_run_names_and_seed_groups_carry_model_arguments(monkeypatch) -> None:
    import experiments.fit

    started = []
    monkeypatch.setattr(experiments.fit, "fit", lambda cfg, tracker, options: started.append((cfg, options)))
    argv = ["--arch", "resnet20,densenet_bc:depth=40,growth_rate=12", "--recipe", "smoke", "--seeds", "0,1",
            "--no-tracking"]
    assert main(argv) == 0
    assert [o.run_name for _, o in started] == ["resnet20-smoke-s0", "resnet20-smoke-s1",
                                                "densenet_bc-depth=40-smoke-s0", "densenet_bc-depth=40-smoke-s1"]
    densenet = {"depth": 40, "growth_rate": 12}
    assert [cfg.model for cfg, _ in started] == [{}, {}, densenet, densenet]
    groups = [o.tags[names.SEED_GROUP] for _, o in started]
    recipe_hash = load_recipe("smoke").hash()
    assert groups[0] == groups[1] != groups[2] == groups[3]
    assert groups[0].startswith(f"resnet20-{recipe_hash}-")
    assert groups[2].startswith(f"densenet_bc-depth=40-{recipe_hash}-")
    assert {o.tags[names.KIND] for _, o in started} == {names.KIND_TRAIN}


def test_resume_takes_one_architecture_with_its_arguments() -> None:
    ckpt = {"config": RunConfig(arch="densenet_bc", recipe=load_recipe("smoke"), model={"depth": 40}).to_dict()}
    parse = build_parser().parse_args
    cfg = resume_config(parse(["--resume", "x", "--arch", "densenet_bc:depth=100"]), ckpt)
    assert (cfg.arch, cfg.model) == ("densenet_bc", {"depth": 100})
    assert resume_config(parse(["--resume", "x", "--recipe", "smoke"]), ckpt).model == {"depth": 40}
    with pytest.raises(UserError, match="--resume continues one run, but --arch names 2 architectures"):
        resume_config(parse(["--resume", "x", "--arch", "densenet_bc,resnet20"]), ckpt)


def test_mlflow_logs_info_only_when_verbose(monkeypatch) -> None:
    logger = logging.getLogger("mlflow")
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    mlflow_logging(verbose=False)
    assert logger.getEffectiveLevel() == logging.WARNING
    assert not logging.getLogger("mlflow.system_metrics.system_metrics_monitor").isEnabledFor(logging.INFO)
    mlflow_logging(verbose=True)
    assert logger.getEffectiveLevel() == logging.INFO
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")  # an explicit request wins
    mlflow_logging(verbose=False)
    assert logger.getEffectiveLevel() == logging.DEBUG


@pytest.mark.parametrize("argv, message", [(["--repeat", "0"], "error: --repeat must be >= 1"),
                                           (["--root", "/nonexistent"], "error: /nonexistent is not a checkout")])
def test_timing_script_rejects_bad_input(capsys, argv: list[str], message: str) -> None:
    assert cli_timing.main(argv) == 2
    assert capsys.readouterr().err.startswith(message)


HEAVY = ("torch", "mlflow", "optuna", "timm", "zoo")
_PROBE = f"""
import sys
from experiments.run import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("heavy modules:", sorted(set({HEAVY!r}) & set(sys.modules)), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--list"], 0), (["--arch", "resnet20", "--bogus"], 2),
                                         (["--dataset", "imagenet"], 2), (["--seeds", "0,1"], 2)])
def test_help_list_and_argument_errors_import_no_heavy_module(tmp_path, argv: list[str], code: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CNN_ZOO_CACHE": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=REPO, capture_output=True, text=True, env=env)
            for _ in range(2)]  # the first --list fills the cache of model names
    assert [r.returncode for r in runs] == [code, code], runs[1].stderr
    assert runs[1].stderr.strip().splitlines()[-1] == "heavy modules: []"


def _fresh_clone(dest: Path) -> Path:
    """The working tree as a commit would hold it (tracked and new, not ignored files), committed in a new repo."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():  # a tracked file deleted in the working tree is not part of it
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clone"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)
    return dest


@pytest.mark.slow
def test_a_run_leaves_a_fresh_clone_clean(tmp_path, tiny_image_folder_archive) -> None:
    """The default store (sqlite mlflow.db in the working dir), its lock, artifacts and checkpoints are all
    ignored, so git_dirty records the code's state, not the run's own files."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = _fresh_clone(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"PYTHONPATH": str(clone), "CNN_ZOO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "experiments/run.py", "--arch", "resnet20", "--recipe", "smoke",
                           "--epochs", "1", "--no-progress", "--data-dir", str(tiny_image_folder_archive.parent)],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (clone / "mlflow.db").is_file() and (clone / "mlflow.db.lock").is_file()
    # A sweep's or campaign's default journal and the lock its workers take beside it, made by the code itself.
    SweepStorage(spec=str(clone / "optuna.journal"), optuna=None, postgres=False, stale_callback=None).lock("s").acquire()
    (clone / "optuna.journal").touch()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout
    assert status == ""
    with sqlite3.connect(clone / "mlflow.db") as db:
        assert db.execute("SELECT value FROM tags WHERE key = 'git_dirty'").fetchall() == [("False",)]
    assert " INFO mlflow" not in proc.stderr  # MLflow's own chatter is hidden without --verbose
