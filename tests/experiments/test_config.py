"""Recipes, overrides, hashing and the lr schedule: pure functions, no training."""
import math

import pytest

from experiments.config import (Recipe, ScheduleConfig, apply_overrides, list_recipes, load_recipe,
                                recipe_from_dict)
from experiments.errors import UserError
from experiments.trainer import lr_factor


def test_presets_exist_and_match_their_papers():
    assert {"standard", "densenet-paper", "resnet-paper", "fast", "smoke"} <= set(list_recipes())
    std = load_recipe("standard")
    assert (std.optimizer.name, std.optimizer.lr, std.optimizer.momentum, std.optimizer.nesterov) == ("sgd", 0.1, 0.9, True)
    assert (std.batch_size, std.optimizer.weight_decay, std.schedule.name, std.epochs) == (128, 5e-4, "cosine", 200)
    assert std.augment.random_crop and std.augment.crop_padding == 4 and std.augment.hflip
    dn = load_recipe("densenet-paper")
    assert (dn.batch_size, dn.epochs, dn.optimizer.weight_decay, dn.optimizer.nesterov) == (64, 300, 1e-4, True)
    assert dn.schedule.name == "multistep" and dn.schedule.milestones == (0.5, 0.75) and dn.schedule.gamma == 0.1
    rn = load_recipe("resnet-paper")
    assert (rn.batch_size, rn.max_steps, rn.optimizer.weight_decay, rn.val_size) == (128, 64000, 1e-4, 5000)
    # milestones at 32k and 48k of 64k iterations
    assert [m * rn.max_steps for m in rn.schedule.milestones] == [32000, 48000]


def test_hash_is_content_and_stable():
    a, b = load_recipe("standard"), load_recipe("standard")
    assert a.hash() == b.hash() and len(a.hash()) == 12
    assert apply_overrides(a, ["epochs=3"]).hash() != a.hash()
    # a saved recipe rebuilt from its dict hashes the same
    import dataclasses
    assert recipe_from_dict(dataclasses.asdict(a)).hash() == a.hash()


@pytest.mark.parametrize("override, message", [
    ("nope=1", "unknown recipe key 'nope'"),
    ("optimizer.nope=1", "unknown recipe key 'optimizer.nope'"),
    ("optimizer.lr=fast", "must be a number"),
    ("epochs=2.5", "must be an integer"),
    ("augment.hflip=2", "must be true or false"),
    ("schedule.milestones=0.5", "must be a list"),
    ("schedule.name=step", "schedule.name must be"),
    ("epochs", "expects KEY=VALUE"),
])
def test_bad_overrides_are_rejected(override, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(load_recipe("standard"), [override])


def test_overrides_coerce_types():
    r = apply_overrides(load_recipe("standard"), ["optimizer.lr=1", "schedule.milestones=[0.3, 0.6]", "subset=100"])
    assert r.optimizer.lr == 1.0 and isinstance(r.optimizer.lr, float)
    assert r.schedule.milestones == (0.3, 0.6) and r.subset == 100
    # YAML 1.1 reads 1e-4 as a string; overrides and recipe files take it as a number (int fields stay strict).
    assert apply_overrides(r, ["optimizer.weight_decay=1e-4"]).optimizer.weight_decay == 1e-4
    with pytest.raises(UserError, match="must be an integer"):
        apply_overrides(r, ["epochs=1e2"])


def test_recipe_file_scientific_notation(tmp_path):
    path = tmp_path / "sci.yaml"
    path.write_text("optimizer: {weight_decay: 5e-4, lr: 1E-1}\n")
    recipe = load_recipe(str(path))
    assert (recipe.optimizer.weight_decay, recipe.optimizer.lr) == (5e-4, 0.1)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(UserError, match="unknown recipe 'nosuch'"):
        load_recipe("nosuch")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nmomentum: 0.9\n")
    with pytest.raises(UserError, match="unknown key 'momentum'"):
        load_recipe(str(bad))
    ok = tmp_path / "mine.yaml"
    ok.write_text("epochs: 3\nbatch_size: 32\n")
    assert load_recipe(str(ok)).name == "mine" and load_recipe(str(ok)).epochs == 3


def test_lr_schedules():
    total = 100
    cos = ScheduleConfig(name="cosine")
    assert lr_factor(cos, 0, total) == 1.0 and math.isclose(lr_factor(cos, 50, total), 0.5)
    multi = ScheduleConfig(name="multistep", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(multi, s, total) for s in (49, 50, 74, 75)] == pytest.approx([1, 0.1, 0.1, 0.01])
    one = ScheduleConfig(name="onecycle", warmup_fraction=0.25, warmup_start_factor=0.04)
    assert lr_factor(one, 0, total) == pytest.approx(0.04)
    assert lr_factor(one, 25, total) == pytest.approx(1.0)
    assert lr_factor(one, 99, total) < 0.01
    assert lr_factor(ScheduleConfig(name="constant"), 77, total) == 1.0


def test_recipe_validation():
    with pytest.raises(UserError, match="val_size must be >= 0"):
        Recipe(name="x", val_size=-1).validate()
