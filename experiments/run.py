"""Train zoo models under one recipe and record every run in MLflow.

    python experiments/run.py --arch densenet_bc
    python experiments/run.py --arch resnet20,resnet56 --recipe fast --seeds 0,1,2
    python experiments/run.py --arch resnet20,densenet_bc:depth=40,growth_rate=12 --recipe fast
    python experiments/run.py --resume latest

Reads top to bottom: parse -> config -> (data -> model -> fit -> record, inside fit()). torch, MLflow and the
zoo are imported by the functions that need them, so --help, --list and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # `python experiments/run.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from experiments import names
from experiments.cli import Parser, exit_code
from experiments.config import (NUM_CLASSES, TIMM_PREFIX, Recipe, RunConfig, apply_overrides, arch_label,
                                flag_overrides, list_recipes, load_recipe, parse_arch_spec, parse_key_value)
from experiments.errors import UserError
from experiments.zoo_names import registered_names

if TYPE_CHECKING:
    from experiments.tracking import Tracker

# Defaults of the flags that --resume must tell apart from "not given" (a resumed run keeps its own).
DEFAULTS = {"data_dir": "./data", "device": "auto", "compile": None}
IMAGE_SIDE = 32  # the datasets' images are 32x32
MIN_FEATURE_SIDE = 4  # a timm model whose last feature map is smaller than this at 32x32 gets a warning


def build_parser() -> argparse.ArgumentParser:
    p = Parser("run.py", __doc__)
    p.add_argument("--arch", help="zoo model name(s): NAME[:KEY=VALUE,...][,NAME...] (KEY=VALUE after NAME: are "
                                  "that model's arguments), 'all', or timm:<name>")
    p.add_argument("--list", action="store_true", help="print the zoo and the recipes, then exit")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(NUM_CLASSES), default="cifar10")
    g.add_argument("--svhn-extra", action="store_true",
                   help="SVHN: add the 531,131 extra images (extra_32x32.mat) to training, as the DenseNet paper does")
    g.add_argument("--data-dir", help="official release files, an image-folder tree or an archive (default ./data)")
    g.add_argument("--download", action="store_true", help="let torchvision fetch the official release files (needs internet)")
    g.add_argument("--val-size", type=int, help="validation images held out of the training set (recipe default 5000)")
    g.add_argument("--subset", type=int, help="train on the class-balanced first N training images")
    g.add_argument("--shots", type=int, metavar="K", help="few-shot: train on K images per class, drawn from the "
                                                          "training split with the run's seed")
    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", help=f"preset ({', '.join(list_recipes())}) or a .yaml path (default standard)")
    g.add_argument("--epochs", type=int, help="number of epochs (replaces an iteration budget such as resnet-paper's)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe field, e.g. schedule.name=multistep")
    g = p.add_argument_group("model (for every --arch; NAME:KEY=VALUE gives one architecture its own)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="model hyperparameter (repeatable)")
    g.add_argument("--depth", type=int, help="DenseNet family: depth L")
    g.add_argument("--growth-rate", type=int, help="DenseNet family: growth rate k")
    g.add_argument("--compression", type=float, help="DenseNet-BC: compression θ in (0, 1]")
    g.add_argument("--pretrained", metavar="PATH|timm", help="fine-tune from pretrained weights: an official BiT "
                   ".npz for bit_* (ImageNet stem, head zeroed), or timm's own ('timm', from its cache) or a "
                   "weights file for timm:<name>; use with --recipe bit-hyperrule")
    g = p.add_argument_group("seeds")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--seeds", help="comma list: one run per seed, grouped by a seed_group tag")
    g = p.add_argument_group("device")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when available")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA and for CPUs with native bf16, AVX-512 BF16 or AMX)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: on when the run is long enough to repay compiling)")
    g = p.add_argument_group("tracking and checkpoints")
    g.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    g.add_argument("--experiment", default=names.DEFAULT_EXPERIMENT)
    g.add_argument("--run-name")
    g.add_argument("--no-tracking", action="store_true", help="train without MLflow (checkpoints still written)")
    g.add_argument("--verbose", action="store_true", help="show MLflow's own INFO messages (store creation, system metrics)")
    g.add_argument("--output-dir", default="./outputs", help="checkpoints go to OUTPUT_DIR/checkpoints/RUN_ID/")
    g.add_argument("--resume", metavar="RUN_ID|latest", help="continue a run from its last checkpoint")
    g.add_argument("--force-resume", action="store_true", help="resume even if the recipe or architecture differs")
    g.add_argument("--dry-run", action="store_true", help="print the resolved config, the model's arguments and "
                                                          "params/FLOPs, exit")
    g.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return p


@dataclass(frozen=True)
class PlannedRun:
    """One run of the command, its model checked on the meta device before the first run trains."""

    config: RunConfig
    info: dict[str, int]  # params and FLOPs (zoo.variant_info)
    hparams: dict[str, Any]  # what the model is built with: the zoo's defaults updated by the given arguments
    label: str  # the architecture and its non-default arguments: names the run and its seed group
    warning: str | None = None


def resolve_archs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(architecture, model arguments) per --arch entry: its own arguments and the global ones (--model-arg,
    --depth, ...), which every architecture in the list must accept."""
    import zoo

    common = model_args(args)
    entries = [(name, {}) for name in zoo.list_models()] if args.arch == "all" else parse_arch_spec(args.arch)
    for name, own in entries:
        try:
            zoo.model_family(name)  # the "did you mean" error comes now, before any training
        except ValueError as e:
            raise UserError(str(e)) from None
        if both := sorted(own.keys() & common.keys()):
            raise UserError(f"{name}: {', '.join(both)} is given both after '{name}:' in --arch and as a flag "
                            f"for every architecture; give it once")
    return [(name, own | common) for name, own in entries]


def model_args(args: argparse.Namespace) -> dict:
    hp = dict(parse_key_value(s, "--model-arg") for s in args.model_arg)
    for flag, key in (("depth", "depth"), ("growth_rate", "growth_rate"), ("compression", "compression")):
        if getattr(args, flag) is not None:
            hp[key] = getattr(args, flag)
    return hp


def recipe_given(args: argparse.Namespace) -> bool:
    return any(v not in (None, []) for v in (args.recipe, args.epochs, args.batch_size, args.lr, args.weight_decay,
                                              args.val_size, args.subset, args.set))


def build_recipe(args: argparse.Namespace, base: Recipe | None = None) -> Recipe:
    recipe = base or load_recipe(args.recipe or "standard")
    shortcuts = {"batch_size": args.batch_size, "optimizer.lr": args.lr, "optimizer.weight_decay": args.weight_decay,
                 "val_size": args.val_size, "subset": args.subset}
    overrides = flag_overrides(shortcuts, args.epochs, args.set)
    recipe = apply_overrides(recipe, overrides) if overrides else recipe
    if recipe.hyperrule:  # fit() would replace these from the training set: say so instead of ignoring them
        from experiments.transfer import HYPERRULE_FIELDS

        ruled = sorted({k.split(".")[0] for k in overrides} & {*HYPERRULE_FIELDS, "epochs"})
        if ruled:
            raise UserError(f"recipe {recipe.name} sets {', '.join(ruled)} from the training set (BiT-HyperRule); "
                            f"drop the override, or add --set hyperrule=false to set them all yourself")
    return recipe


def build_configs(args: argparse.Namespace) -> list[PlannedRun]:
    """One run per (architecture, seed), each model checked now, so invalid hyperparameters fail before the
    first model trains."""
    if not args.arch:
        raise UserError("--arch is required (or --resume RUN_ID|latest, or --list)")
    recipe = build_recipe(args)
    seeds = [args.seed] if not args.seeds else [_int(s, "--seeds") for s in args.seeds.split(",")]
    if args.svhn_extra and args.dataset not in ("svhn", "svhn-extra"):
        raise UserError("--svhn-extra adds SVHN's extra images to training: use it with --dataset svhn")
    dataset = "svhn-extra" if args.svhn_extra else args.dataset
    common = dict(dataset=dataset, download=args.download, amp=args.amp, channels_last=args.channels_last,
                  output_dir=args.output_dir, **explicit_device_flags(args, DEFAULTS))
    from experiments import transfer

    configs = [RunConfig(arch=arch, recipe=recipe, model=transfer.model_args(arch, hp, args.pretrained), seed=s,
                         pretrained=args.pretrained, shots=args.shots, **common)
               for arch, hp in resolve_archs(args) for s in seeds]
    for cfg in configs[:: len(seeds)] if args.pretrained else ():
        transfer.weights_path(cfg)  # a missing file or cache answers now, before the first run trains
    return [plan_run(cfg) for cfg in configs]


def explicit_device_flags(args: argparse.Namespace, fallback: dict) -> dict:
    """--data-dir, --device and --compile as given, else from ``fallback``."""
    return {k: getattr(args, k) if getattr(args, k) is not None else fallback[k] for k in DEFAULTS}


def plan_run(cfg: RunConfig) -> PlannedRun:
    import zoo
    from experiments.transfer import input_shape

    timm = cfg.arch.startswith(TIMM_PREFIX)
    side = input_shape(cfg.recipe, (IMAGE_SIDE, IMAGE_SIDE))[0]  # FLOPs at what the run trains on (BiT: 128)
    try:
        info = zoo.variant_info(cfg.arch, NUM_CLASSES[cfg.dataset], input_size=(3, side, side), **cfg.model)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    except AssertionError as e:  # timm's fixed-size models (ViTs) assert the input size
        if not timm:
            raise
        raise UserError(f"{cfg.arch} does not take {side}x{side} images ({e}); if it has an img_size "
                        f"argument, give it: --arch {cfg.arch}:img_size={side}") from None
    defaults = {} if timm else zoo.model_defaults(cfg.arch)  # timm keeps its defaults inside its constructors
    return PlannedRun(cfg, info, defaults | cfg.model, arch_label(cfg.arch, cfg.model, defaults),
                      timm_stem_warning(cfg, side) if timm else None)


def timm_stem_warning(cfg: RunConfig, side: int = IMAGE_SIDE) -> str | None:
    """A warning when a timm model, designed for ImageNet's 224x224 images, shrinks a ``side`` x ``side`` input
    to a tiny feature map (its stem alone typically downsamples 2-4x), read from the model's feature_info on meta."""
    import torch
    import zoo

    with torch.device("meta"):
        model = zoo.create_model(cfg.arch, num_classes=NUM_CLASSES[cfg.dataset], **cfg.model)
    reductions = [f["reduction"] for f in getattr(model, "feature_info", None) or [] if "reduction" in f]
    if not reductions or side // max(reductions) >= MIN_FEATURE_SIDE:
        return None
    designed = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[1:]
    first, last = (max(side // r, 1) for r in (reductions[0], max(reductions)))
    return (f"warning: {cfg.arch} was designed for {designed[0]}x{designed[1]} ImageNet images: its stem downsamples "
            f"a {side}x{side} input to {first}x{first} and its last stage sees {last}x{last}, which "
            f"costs accuracy; the zoo's variants are built for {IMAGE_SIDE}x{IMAGE_SIDE}")


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} expects integers, got {text!r}") from None


def resume_config(args: argparse.Namespace, ckpt: dict) -> RunConfig:
    """The checkpoint's config, with only what the command line states explicitly replaced. Device, data
    location and the math-preserving speed flags may change; fit() refuses another arch, recipe, model
    or dataset content unless --force-resume."""
    from experiments import transfer
    from experiments.resume import saved_config

    saved = saved_config(ckpt)
    changes = {"output_dir": args.output_dir, **explicit_device_flags(args, saved.__dict__)}
    changes |= {k: getattr(args, k) for k in ("amp", "channels_last", "pretrained") if getattr(args, k) is not None}
    if args.shots not in (None, saved.shots):
        raise UserError(f"run {ckpt['run_id']} trains on --shots {saved.shots}; --resume cannot change it")
    if args.arch is not None or recipe_given(args) or args.model_arg:
        entries = resolve_archs(args) if args.arch is not None else [(saved.arch, model_args(args))]
        if len(entries) != 1:
            raise UserError(f"--resume continues one run, but --arch names {len(entries)} architectures")
        ((arch, model),) = entries
        # A HyperRule recipe named again is resolved as the saved one was (fit() resolves it from the data
        # only after the recipe check); a pretrained BiT keeps its ImageNet stem, as build_configs gives it.
        recipe = transfer.resolve_like(build_recipe(args, base=None if args.recipe else saved.recipe), saved.recipe)
        pretrained = changes.get("pretrained", saved.pretrained)
        changes |= {"arch": arch, "recipe": recipe,
                    "model": transfer.model_args(arch, model or saved.model, pretrained)}
    return RunConfig(**{**saved.__dict__, **changes})


def make_tracker(args: argparse.Namespace, uri: str | None = None) -> Tracker:
    from experiments.tracking import MlflowTracker, Tracker, default_tracking_uri, mlflow_logging
    from experiments.runtime import DistEnv

    if args.no_tracking or not DistEnv.from_environ().main:  # under torchrun only rank 0 records
        return Tracker()
    mlflow_logging(verbose=args.verbose)
    return MlflowTracker(uri or args.tracking_uri or default_tracking_uri(), args.experiment)


def print_list() -> None:
    print("models:", ", ".join(registered_names()), "(and timm:<name>; `python -m zoo` shows params/FLOPs)")
    for name in list_recipes():
        print(f"recipe {name:<15} {load_recipe(name).description}")


def print_dry_run(planned: list[PlannedRun]) -> None:
    from experiments.transfer import input_shape

    for run in planned:
        cfg, info = run.config, run.info
        side = input_shape(cfg.recipe, (IMAGE_SIDE, IMAGE_SIDE))[0]
        print(yaml.safe_dump(cfg.to_dict() | {"recipe_hash": cfg.recipe.hash()}, sort_keys=False))
        given = "timm's own defaults, updated by" if cfg.arch.startswith(TIMM_PREFIX) else "defaults and"
        arguments = yaml.safe_dump(run.hparams, default_flow_style=True, sort_keys=False).strip()
        print(f"# {cfg.arch} is built with ({given} the given arguments): {arguments}")
        print(f"# {cfg.arch}: {info['params']:,} trainable params, {info['flops']:,} FLOPs per {side}x{side} "
              f"image ({info['flops'] / 1e9:.3f} GFLOPs; 1 MAC = 2 FLOPs)\n")


def resume(args: argparse.Namespace) -> None:
    """Continue one run where its checkpoint left off, recorded in the store it started in."""
    from experiments import checkpoint as ckpt_io
    from experiments.tracking import Tracker, normalize_uri
    from experiments.fit import FitOptions, fit

    ckpt = ckpt_io.load(ckpt_io.find_resume(args.output_dir, args.resume))
    cfg = resume_config(args, ckpt)
    recorded = ckpt.get("tracking_uri")
    if args.tracking_uri and normalize_uri(args.tracking_uri) != recorded:
        raise UserError(f"run {ckpt['run_id']} is recorded in {recorded or 'no tracking store (--no-tracking)'}; "
                        f"resume it without --tracking-uri")
    tracker = Tracker() if recorded is None else make_tracker(args, recorded)
    fit(cfg, tracker, options=FitOptions(resume=ckpt, force_resume=args.force_resume, progress=_progress(args)))


def train(args: argparse.Namespace, planned: list[PlannedRun], command: str) -> None:
    """data -> model -> fit -> record, once per planned run (inside fit())."""
    from experiments.fit import FitOptions, fit

    group = uuid.uuid4().hex[:8] if args.seeds else None
    for run in planned:
        cfg = run.config
        tags = {names.KIND: names.KIND_TRAIN, names.COMMAND: command}
        tags |= {names.SEED_GROUP: f"{run.label}-{cfg.recipe.hash()}-{group}"} if group else {}
        fit(cfg, make_tracker(args), options=FitOptions(
            run_name=args.run_name or f"{run.label}-{cfg.recipe.name}-s{cfg.seed}", tags=tags,
            progress=_progress(args)))


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None  # None: a bar when stderr is a terminal


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(["run.py", *(sys.argv[1:] if argv is None else argv)])
    return exit_code(lambda: run_command(args, command))


def run_command(args: argparse.Namespace, command: str) -> None:
    if args.list:
        print_list()
    elif args.resume:
        resume(args)
    else:
        planned = build_configs(args)
        for warning in dict.fromkeys(run.warning for run in planned if run.warning):
            print(warning, file=sys.stderr)
        if args.dry_run:
            print_dry_run(planned)
        else:
            train(args, planned, command)


if __name__ == "__main__":
    sys.exit(main())
