"""What the plots.py and report.py CLIs share: their flags, one-line errors, warnings on stderr and the
folder each experiment and recipe writes into."""
from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn

from analysis.errors import AnalysisError
from analysis.mlflow_data import default_tracking_uri
from experiments import cli
from experiments.names import DEFAULT_EXPERIMENT

OUT_ROOT = "analysis/figures"
MIXED = "mixed"  # the folder of figures and tables that facet several recipes (--allow-mixed-recipes)


class Parser(cli.Parser):
    def fail(self, error: AnalysisError) -> NoReturn:
        self.exit(error.exit_code, f"{self.prog}: error: {error}\n")


def build_parser(prog: str, description: str | None) -> Parser:
    p = Parser(prog, description)
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name (default: %(default)s)")
    p.add_argument("--tracking-uri", default=default_tracking_uri(),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or %(default)s)")
    p.add_argument("--out", default=OUT_ROOT,
                   help="root folder: files go to OUT/<experiment>/<recipe hash, or 'mixed'>/ (default: %(default)s)")
    p.add_argument("--recipe", metavar="NAME_OR_HASH",
                   help="use only the runs of this recipe: its hash, or its name when one hash carries it")
    p.add_argument("--allow-mixed-recipes", action="store_true",
                   help="accept runs of several recipes: one panel (or table rows) per recipe")
    return p


def slug(name: str) -> str:
    """``name`` as one safe path component."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "unnamed"


def output_dir(root: Path, experiment: str, recipe_hashes: Iterable[str]) -> Path:
    """``root/<experiment>/<recipe hash>/``, or ``.../mixed/`` for several recipes: one experiment's or recipe's
    files never overwrite another's."""
    hashes = sorted(set(recipe_hashes))
    return root / slug(experiment) / (slug(hashes[0]) if len(hashes) == 1 else MIXED)


def warn(line: str) -> None:
    print(line, file=sys.stderr)


def run_cli(prog: str, description: str | None, write: Callable[..., list[Path]], argv: list[str] | None) -> int:
    """Parse the shared flags, call ``write(uri, experiment, out, recipe, allow_mixed)`` and print the files it
    wrote; an AnalysisError is one line and its exit code."""
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    try:
        written = write(args.tracking_uri, args.experiment, Path(args.out), args.recipe, args.allow_mixed_recipes)
    except AnalysisError as e:
        parser.fail(e)
    for path in written:
        print(path)
    return 0
