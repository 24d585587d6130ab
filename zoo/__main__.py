"""`python -m zoo [--json] [--num-classes N]`: every registered variant with params and FLOPs."""
from __future__ import annotations

import argparse
import json

import torch

import zoo


def zoo_table(num_classes: int = 10) -> list[dict]:
    rows = []
    for name in zoo.list_models():
        with torch.device("meta"):  # parameter shapes and traced FLOPs need no real memory or init
            model = zoo.create_model(name, num_classes=num_classes)
        info = zoo.model_info(model)
        rows.append({"name": name, "family": zoo.model_family(name), **info})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<22}{'family':<11}{'params':>14}{'params (M)':>12}{'GFLOPs':>10}"]
    for r in rows:
        lines.append(
            f"{r['name']:<22}{r['family']:<11}{r['params']:>14,}{r['params'] / 1e6:>12.3f}{r['flops'] / 1e9:>10.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zoo", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--num-classes", type=int, default=10)
    args = parser.parse_args(argv)
    rows = zoo_table(args.num_classes)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} variants at {args.num_classes} classes, 3x32x32 input. "
              "FLOPs traced with torch.utils.flop_counter (1 MAC = 2 FLOPs). timm models: 'timm:<name>'.")


if __name__ == "__main__":
    main()
