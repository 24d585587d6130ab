"""Fine-tuning from pretrained weights: Big Transfer (Kolesnikov et al. 2020, https://arxiv.org/abs/1912.11370).

fit() calls four things here: ``pin_weights`` (the weights' sha256, checked against a resumed run's),
``few_shot_splits`` (``--shots K``), ``resolve_recipe`` (BiT-HyperRule: schedule, MixUp and resolution from the
training set) and ``load_pretrained`` (into the freshly built model, head zeroed). ``input_stats`` gives the
normalisation the weights were trained with and ``run_params`` what MLflow records. ``input_shape`` is the
resolution params/FLOPs are counted at, ``resolve_like`` lets ``--resume`` name a HyperRule recipe again.

BiT-HyperRule as released in google-research/big_transfer ``bit_hyperrule.py`` (checked against the paper,
section 3.3; where they differ the released code is followed and the difference said here):
- schedule (``get_schedule``): fewer than 20k training images: supports (100, 200, 300, 400, 500); fewer
  than 500k: (500, 3000, 6000, 9000, 10000); otherwise (500, 6000, 12000, 18000, 20000). The first support is
  a linear warm-up from 0, the last the run's length, the others divide the lr by 10 (``get_lr``: after the
  step, ``s < step``). The paper says 30/60/90% for every length; the code's 500-step schedule decays at
  40/60/80% after a 100-step warm-up.
- MixUp (``get_mixup``): alpha 0.1 from 20k training images on, else none.
- resolution (``get_resolution``): images of area < 96x96 are resized to 160x160 and cropped to 128x128;
  larger ones to 512 and 480 (the paper: 448 and 384, and 512/480 only for R152x4).
- optimizer (``bit_pytorch/train.py``): SGD momentum 0.9, lr 0.003, batch 512, no weight decay; inputs
  normalised to [-1, 1]; the head zero-initialised (``zero_head=True``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from experiments import names
from experiments.config import TIMM_PREFIX, Recipe, ResizeConfig, RunConfig, ScheduleConfig
from experiments.data import ArrayDataset, DatasetBundle
from experiments.errors import DataError, UserError
from experiments.trainer import Splits

SMALL_TASK, MEDIUM_TASK = 20_000, 500_000  # training-set sizes where the HyperRule's regimes change
SUPPORTS = {"small": (100, 200, 300, 400, 500), "medium": (500, 3000, 6000, 9000, 10_000),
            "large": (500, 6000, 12_000, 18_000, 20_000)}
MIXUP_ALPHA = 0.1
SMALL_AREA = 96 * 96
SMALL_RESOLUTION, LARGE_RESOLUTION = (160, 128), (512, 480)  # (precrop, crop)
# What resolve_recipe sets from the data (and resolve_like copies from a resumed run's recipe).
HYPERRULE_FIELDS = ("max_steps", "epoch_steps", "schedule", "mixup_alpha", "resize")
EVALUATIONS = 10  # evaluations (epochs) per HyperRule run: an epoch is a tenth of the schedule
BIT_MEAN = BIT_STD = (0.5, 0.5, 0.5)  # BiT's inputs are in [-1, 1]
TIMM = "timm"  # --pretrained timm: timm's own weights for a timm: model
SHOTS_STREAM = 0x5A0757  # separates the --shots draw from the validation split's draw under the same seed
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hugging Face repositories hold


# ----------------------------------------------------------------------------------------------
# BiT-HyperRule
# ----------------------------------------------------------------------------------------------

def hyperrule_supports(train_size: int) -> tuple[int, ...]:
    """``get_schedule``: warm-up end, the lr decays, the run's length, in steps."""
    regime = "small" if train_size < SMALL_TASK else "medium" if train_size < MEDIUM_TASK else "large"
    return SUPPORTS[regime]


def hyperrule_mixup(train_size: int) -> float:
    """``get_mixup``: MixUp's alpha (0: none)."""
    return 0.0 if train_size < SMALL_TASK else MIXUP_ALPHA


def hyperrule_resolution(height: int, width: int) -> tuple[int, int]:
    """``get_resolution``: (precrop, crop) for images of ``height`` x ``width``."""
    return SMALL_RESOLUTION if height * width < SMALL_AREA else LARGE_RESOLUTION


def resolve_recipe(recipe: Recipe, train_size: int, image_shape: tuple[int, int]) -> Recipe:
    """A ``hyperrule`` recipe with its schedule, MixUp, resolution and epoch length set from the training set;
    any other recipe unchanged. Idempotent, so a resumed run's saved recipe resolves to itself."""
    if not recipe.hyperrule:
        return recipe
    supports = hyperrule_supports(train_size)
    total = supports[-1]
    # The released get_lr divides after a support s (s < step), i.e. from update s + 1 on; lr_factor divides
    # from update round(m * total) on, so m = (s + 1) / total gives the same lr at every step.
    schedule = ScheduleConfig(name="multistep", milestones=tuple((s + 1) / total for s in supports[1:-1]),
                              gamma=0.1, warmup_fraction=supports[0] / total, warmup_start_factor=0.0)
    precrop, crop = hyperrule_resolution(*image_shape)
    return dataclasses.replace(recipe, max_steps=total, epoch_steps=total // EVALUATIONS, schedule=schedule,
                               mixup_alpha=hyperrule_mixup(train_size), resize=ResizeConfig(precrop, crop))


def resolve_like(recipe: Recipe, saved: Recipe) -> Recipe:
    """``recipe`` resolved as a resumed run's ``saved`` (resolved) recipe was: the fields the HyperRule sets from
    the data copied from it. Before the data is loaded this equals resolving with the run's training set, so
    ``--resume --recipe bit-hyperrule`` names the same recipe; any other difference still shows in the hash."""
    if not (recipe.hyperrule and saved.hyperrule):
        return recipe
    return dataclasses.replace(recipe, **{name: getattr(saved, name) for name in HYPERRULE_FIELDS})


def input_shape(recipe: Recipe, image_shape: tuple[int, int]) -> tuple[int, int]:
    """(height, width) the model sees under ``recipe`` for images of ``image_shape``: the HyperRule's crop
    (known before the data: it depends on the image size only), a recipe's resize crop, or the images' own."""
    if recipe.hyperrule:
        crop = hyperrule_resolution(*image_shape)[1]
        return crop, crop
    crop = recipe.resize.crop
    return (crop, crop) if crop else (int(image_shape[0]), int(image_shape[1]))


# ----------------------------------------------------------------------------------------------
# --shots K
# ----------------------------------------------------------------------------------------------

def draw_shots(ds: ArrayDataset, shots: int, seed: int) -> ArrayDataset:
    """``shots`` images of every class, drawn without replacement with ``seed``; dataset order kept."""
    rng = np.random.default_rng([seed, SHOTS_STREAM])
    picked = []
    for c in np.unique(ds.labels):
        idx = np.flatnonzero(ds.labels == c)
        if len(idx) < shots:
            raise DataError(f"--shots {shots}: class {c} has only {len(idx)} training images (after validation)")
        picked.append(rng.choice(idx, shots, replace=False))
    return ds.take(np.sort(np.concatenate(picked)))


def few_shot_splits(splits: Splits, shots: int | None, seed: int) -> Splits:
    """The K-shot training set of ``splits`` (validation and test untouched); unchanged without --shots."""
    return splits if shots is None else Splits(draw_shots(splits.train, shots, seed), splits.val, splits.test)


# ----------------------------------------------------------------------------------------------
# Pretrained weights
# ----------------------------------------------------------------------------------------------

def pretrained_kind(arch: str, pretrained: str) -> str:
    """``bit`` (an official BiT .npz for a bit_* model) or ``timm`` (a timm: model); anything else exits 2."""
    if arch.startswith(TIMM_PREFIX):
        return "timm"
    if arch.startswith("bit_"):
        if pretrained == TIMM:
            raise UserError(f"--pretrained timm is for timm: models; {arch} takes an official BiT .npz file "
                            f"(e.g. BiT-M-R50x1.npz from https://storage.googleapis.com/bit_models/)")
        return "bit"
    raise UserError(f"{arch} has no pretrained weights: --pretrained works with bit_* models (official BiT .npz "
                    f"files) and timm:<name> models (--pretrained timm or a weights file)")


def model_args(arch: str, model: dict[str, Any], pretrained: str | None) -> dict[str, Any]:
    """A pretrained BiT keeps its ImageNet stem (7x7/2 conv + max-pool) unless the stem is given."""
    if pretrained is not None and pretrained_kind(arch, pretrained) == "bit":
        return {"stem": "imagenet", **model}
    return model


def weights_path(cfg: RunConfig) -> Path:
    """The local file ``cfg.pretrained`` names: the given path, or timm's cached copy."""
    pretrained_kind(cfg.arch, cfg.pretrained)
    if cfg.pretrained != TIMM:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"--pretrained {cfg.pretrained}: no such file")
        return path
    return _timm_cached(cfg.arch[len(TIMM_PREFIX):])


def _timm_cached(name: str) -> Path:
    """timm's weights for ``name`` from the Hugging Face cache (downloaded into it when online)."""
    import huggingface_hub
    import timm
    from huggingface_hub import constants

    hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    if not hub_id:
        raise UserError(f"timm has no pretrained weights for {name} on the Hugging Face hub; pass a weights file "
                        f"with --pretrained PATH")
    for filename in WEIGHT_FILES:
        try:
            return Path(huggingface_hub.hf_hub_download(hub_id, filename))
        except (OSError, ValueError, huggingface_hub.errors.HfHubHTTPError):
            continue
    raise UserError(f"--pretrained timm: no copy of {hub_id} in timm's Hugging Face cache {constants.HF_HUB_CACHE} "
                    f"(set by HF_HOME / HF_HUB_CACHE) and no download (offline?); on a machine with internet run "
                    f"`hf download {hub_id}` and copy {constants.HF_HUB_CACHE}/models--{hub_id.replace('/', '--')} "
                    f"into the cache here, or download https://huggingface.co/{hub_id}/resolve/main/{WEIGHT_FILES[0]} "
                    f"and pass --pretrained PATH")


def pin_weights(cfg: RunConfig, force: bool) -> tuple[RunConfig, list[str]]:
    """``cfg`` with the weights' sha256; a run that recorded another digest (a resumed run) is refused unless
    ``force`` (then returns what was let through, as check_same_data does)."""
    if cfg.pretrained is None:
        return cfg, []
    path = weights_path(cfg)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    forced = []
    if cfg.pretrained_sha256 not in (None, digest):
        problem = (f"weights {path.name} (sha256 {digest[:12]}) are not the weights the run was fine-tuned from "
                   f"(sha256 {cfg.pretrained_sha256[:12]})")
        if not force:
            raise UserError(f"refusing to resume: {problem} (add --force-resume to override)")
        forced.append(problem)
    return dataclasses.replace(cfg, pretrained_sha256=digest), forced


def load_pretrained(model: nn.Module, cfg: RunConfig) -> None:
    """Load ``cfg.pretrained`` into ``model`` (built for the task's classes) and zero its head, as BiT does."""
    if cfg.pretrained is None:
        return
    path = weights_path(cfg)
    try:
        if pretrained_kind(cfg.arch, cfg.pretrained) == "bit":
            from zoo.bit import load_bit_weights

            load_bit_weights(model, path, zero_head=True)
            return
        _load_timm(model, path)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise UserError(f"--pretrained {path} does not fit {cfg.arch}: {str(e).splitlines()[0]}") from None


def _load_timm(model: nn.Module, path: Path) -> None:
    """timm's own loader, pointed at the local file (so it never downloads); the classifier is zeroed."""
    from timm.models import load_pretrained as timm_load

    overlay = {**model.pretrained_cfg, "file": str(path), "source": "", "custom_load": path.suffix == ".npz"}
    timm_load(model, pretrained_cfg=overlay, num_classes=model.num_classes)
    for param in model.get_classifier().parameters():
        nn.init.zeros_(param)


def input_stats(cfg: RunConfig, bundle: DatasetBundle) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the inputs are normalised with: the dataset's, or those the pretrained weights expect."""
    if cfg.pretrained is None:
        return bundle.mean, bundle.std
    if pretrained_kind(cfg.arch, cfg.pretrained) == "bit":
        return BIT_MEAN, BIT_STD
    import timm

    pretrained = timm.models.get_pretrained_cfg(cfg.arch[len(TIMM_PREFIX):])
    return tuple(pretrained.mean), tuple(pretrained.std)


def weights_name(cfg: RunConfig) -> str:
    """How records and figure titles name the weights: the file's name (timm's: its hub id and file)."""
    return f"{cfg.arch}/{weights_path(cfg).name}" if cfg.pretrained == TIMM else Path(cfg.pretrained).name


def run_params(cfg: RunConfig) -> dict[str, Any]:
    """MLflow params of a fine-tuning or few-shot run (none for a run from scratch on the full data)."""
    params: dict[str, Any] = {}
    if cfg.pretrained is not None:
        params |= {names.PRETRAINED: weights_name(cfg), names.PRETRAINED_SHA256: cfg.pretrained_sha256}
    if cfg.shots is not None:
        params[names.SHOTS] = cfg.shots
    return params
