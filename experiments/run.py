"""Train zoo models under one recipe and record every run in MLflow.

    python experiments/run.py --arch densenet_bc
    python experiments/run.py --arch resnet20,resnet56 --recipe fast --seeds 0,1,2
    python experiments/run.py --resume latest

Reads top to bottom: parse -> config -> (data -> model -> fit -> record, inside fit()).
"""
from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/run.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

import zoo
from experiments import checkpoint as ckpt_io
from experiments.config import Recipe, RunConfig, apply_overrides, list_recipes, load_recipe, parse_key_value
from experiments.data import NUM_CLASSES
from experiments.errors import UserError
from experiments.tracking import DEFAULT_EXPERIMENT, MlflowTracker, Tracker, default_tracking_uri, normalize_uri
from experiments.train import DistEnv, FitOptions, Interrupted, NonFiniteLoss, fit, saved_config

# Defaults of the flags that --resume must tell apart from "not given" (a resumed run keeps its own).
DEFAULTS = {"data_dir": "./data", "device": "auto", "compile": False}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", help="zoo model name(s): NAME[,NAME...], 'all', or timm:<name>")
    p.add_argument("--list", action="store_true", help="print the zoo and the recipes, then exit")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(NUM_CLASSES), default="cifar10")
    g.add_argument("--data-dir", help="official CIFAR folders, an image-folder tree or an archive (default ./data)")
    g.add_argument("--download", action="store_true", help="let torchvision fetch the official CIFAR files (needs internet)")
    g.add_argument("--val-size", type=int, help="validation images held out of the training set (recipe default 5000)")
    g.add_argument("--subset", type=int, help="train on the class-balanced first N training images")
    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", help=f"preset ({', '.join(list_recipes())}) or a .yaml path (default standard)")
    g.add_argument("--epochs", type=int, help="number of epochs (replaces an iteration budget such as resnet-paper's)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe field, e.g. schedule.name=multistep")
    g = p.add_argument_group("model")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="model hyperparameter (repeatable)")
    g.add_argument("--depth", type=int, help="DenseNet family: depth L")
    g.add_argument("--growth-rate", type=int, help="DenseNet family: growth rate k")
    g.add_argument("--compression", type=float, help="DenseNet-BC: compression θ in (0, 1]")
    g = p.add_argument_group("seeds")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--seeds", help="comma list: one run per seed, grouped by a seed_group tag")
    g = p.add_argument_group("device")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when available")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default off)")
    g = p.add_argument_group("tracking and checkpoints")
    g.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    g.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    g.add_argument("--run-name")
    g.add_argument("--no-tracking", action="store_true", help="train without MLflow (checkpoints still written)")
    g.add_argument("--output-dir", default="./outputs", help="checkpoints go to OUTPUT_DIR/checkpoints/RUN_ID/")
    g.add_argument("--resume", metavar="RUN_ID|latest", help="continue a run from its last checkpoint")
    g.add_argument("--force-resume", action="store_true", help="resume even if the recipe or architecture differs")
    g.add_argument("--dry-run", action="store_true", help="print the resolved config and the model's params/FLOPs, exit")
    g.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return p


def resolve_archs(spec: str) -> list[str]:
    names = zoo.list_models() if spec == "all" else [a.strip() for a in spec.split(",") if a.strip()]
    for name in names:
        try:
            zoo.model_family(name)  # the "did you mean" error comes now, before any training
        except ValueError as e:
            raise UserError(str(e)) from None
    return names


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
    if args.epochs is not None:
        shortcuts |= {"epochs": args.epochs, "max_steps": None}
    overrides = {k: v for k, v in shortcuts.items() if v is not None}
    overrides |= dict(parse_key_value(s, "--set") for s in args.set)
    return apply_overrides(recipe, overrides) if overrides else recipe


def build_configs(args: argparse.Namespace) -> list[tuple[RunConfig, dict]]:
    """One RunConfig per (architecture, seed), each with its model's params/FLOPs (checked now, so invalid
    hyperparameters fail before the first model trains)."""
    if not args.arch:
        raise UserError("--arch is required (or --resume RUN_ID|latest, or --list)")
    recipe = build_recipe(args)
    seeds = [args.seed] if not args.seeds else [_int(s, "--seeds") for s in args.seeds.split(",")]
    common = dict(dataset=args.dataset, download=args.download, amp=args.amp, channels_last=args.channels_last,
                  output_dir=args.output_dir, **explicit_device_flags(args, DEFAULTS))
    hp = model_args(args)
    configs = [RunConfig(arch=a, recipe=recipe, model=hp, seed=s, **common) for a in resolve_archs(args.arch) for s in seeds]
    return [(cfg, _check_model(cfg)) for cfg in configs]


def explicit_device_flags(args: argparse.Namespace, fallback: dict) -> dict:
    """--data-dir, --device and --compile as given, else from ``fallback``."""
    return {k: getattr(args, k) if getattr(args, k) is not None else fallback[k] for k in DEFAULTS}


def _check_model(cfg: RunConfig) -> dict:
    import torch

    with torch.device("meta"):  # shapes only: no memory, no init cost
        try:
            model = zoo.create_model(cfg.arch, num_classes=NUM_CLASSES[cfg.dataset], **cfg.model)
        except (ValueError, TypeError) as e:
            raise UserError(str(e)) from None
    return zoo.model_info(model)


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} expects integers, got {text!r}") from None


def resume_config(args: argparse.Namespace, ckpt: dict) -> RunConfig:
    """The checkpoint's config, with only what the command line states explicitly replaced. Device, data
    location and the math-preserving speed flags may change; fit() refuses another arch, recipe, model
    or dataset content unless --force-resume."""
    saved = saved_config(ckpt)
    changes = {"output_dir": args.output_dir, **explicit_device_flags(args, saved.__dict__)}
    changes |= {k: getattr(args, k) for k in ("amp", "channels_last") if getattr(args, k) is not None}
    if args.arch is not None or recipe_given(args) or args.model_arg:
        changes |= {"arch": args.arch or saved.arch, "recipe": build_recipe(args, base=None if args.recipe else saved.recipe),
                    "model": model_args(args) or saved.model}
    return RunConfig(**{**saved.__dict__, **changes})


def make_tracker(args: argparse.Namespace, uri: str | None = None) -> Tracker:
    if args.no_tracking or not DistEnv.from_environ().main:  # under torchrun only rank 0 records
        return Tracker()
    return MlflowTracker(uri or args.tracking_uri or default_tracking_uri(), args.experiment)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list:
            print("models:", ", ".join(zoo.list_models()), "(and timm:<name>; `python -m zoo` shows params/FLOPs)")
            for name in list_recipes():
                print(f"recipe {name:<15} {load_recipe(name).description}")
            return 0

        if args.resume:  # --- resume one run where its checkpoint left off ---
            ckpt = ckpt_io.load(ckpt_io.find_resume(args.output_dir, args.resume))
            cfg = resume_config(args, ckpt)
            recorded = ckpt.get("tracking_uri")
            if args.tracking_uri and normalize_uri(args.tracking_uri) != recorded:
                raise UserError(f"run {ckpt['run_id']} is recorded in {recorded or 'no tracking store (--no-tracking)'}; "
                                f"resume it without --tracking-uri")
            tracker = Tracker() if recorded is None else make_tracker(args, recorded)
            fit(cfg, tracker, options=FitOptions(resume=ckpt, force_resume=args.force_resume,
                                                  progress=False if args.no_progress else None))
            return 0

        configs = build_configs(args)  # --- config ---
        if args.dry_run:
            for cfg, info in configs:
                print(yaml.safe_dump(cfg.to_dict() | {"recipe_hash": cfg.recipe.hash()}, sort_keys=False))
                print(f"# {cfg.arch}: {info['params']:,} trainable params, {info['flops']:,} FLOPs/image "
                      f"({info['flops'] / 1e9:.3f} GFLOPs; 1 MAC = 2 FLOPs)\n")
            return 0

        group = uuid.uuid4().hex[:8] if args.seeds else None
        command = " ".join(["run.py", *(sys.argv[1:] if argv is None else argv)])
        for cfg, _ in configs:  # --- data -> model -> fit -> record, once per run ---
            tags = {"cnn_zoo.kind": "train", "command": command}
            tags |= {"seed_group": f"{cfg.arch}-{cfg.recipe.hash()}-{group}"} if group else {}
            fit(cfg, make_tracker(args), options=FitOptions(
                run_name=args.run_name or f"{cfg.arch}-{cfg.recipe.name}-s{cfg.seed}", tags=tags,
                progress=False if args.no_progress else None))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e} (run marked FAILED)", file=sys.stderr)
        return 1
    except Interrupted as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted (run marked KILLED)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
