"""`python -m zoo [--json] [--num-classes N]`: every registered variant with params and FLOPs.

Tracing every variant's FLOPs takes seconds, so the table is cached under $CNN_ZOO_CACHE (default
~/.cache/cnn-zoo, as for the datasets), keyed by the zoo's source files, the versions of the libraries its
models are built from and the class count: any edit to the zoo computes it afresh.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path

import zoo

CACHE_FOLDER = "zoo-table-v1"  # bump when the rows' meaning changes
LIBRARIES = ("torch", "torchvision", "timm")  # the zoo's models are built from their layers


def zoo_table(num_classes: int = 10, cache_dir: str | Path | None = None) -> list[dict]:
    """One row per variant: name, family, params, total_params, flops, macs (counted on the meta device)."""
    path = _cache_root(cache_dir) / f"{source_key(num_classes)}.json"
    try:
        rows = json.loads(path.read_text())
        if [r["name"] for r in rows] == zoo.list_models():
            return rows
    except (OSError, ValueError, TypeError, KeyError):  # no cache yet, or a damaged one: count again
        pass
    rows = [{"name": name, "family": zoo.model_family(name), **zoo.variant_info(name, num_classes)}
            for name in zoo.list_models()]
    try:  # no rename needed: a reader that meets a half-written file counts again
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    except OSError:  # a read-only cache: count again next time
        pass
    return rows


def source_key(num_classes: int) -> str:
    """A hash of what the table depends on: every zoo source file, the libraries' versions, the class count."""
    digest = hashlib.sha256(json.dumps([num_classes, [version(lib) for lib in LIBRARIES]]).encode())
    for path in sorted(Path(zoo.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _cache_root(cache_dir: str | Path | None) -> Path:
    root = cache_dir or os.environ.get("CNN_ZOO_CACHE") or Path.home() / ".cache" / "cnn-zoo"
    return Path(root).expanduser() / CACHE_FOLDER


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<22}{'family':<11}{'params':>14}{'params (M)':>12}{'GFLOPs':>10}"]
    for r in rows:
        lines.append(
            f"{r['name']:<22}{r['family']:<11}{r['params']:>14,}{r['params'] / 1e6:>12.3f}{r['flops'] / 1e9:>10.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
