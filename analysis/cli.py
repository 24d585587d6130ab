"""What the plots.py and report.py CLIs share: their flags, one-line errors and warnings on stderr."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from analysis.aggregate import AnalysisError
from analysis.mlflow_data import DEFAULT_EXPERIMENT, default_tracking_uri


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse would print the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def fail(self, error: AnalysisError) -> NoReturn:
        self.exit(error.exit_code, f"{self.prog}: error: {error}\n")


def build_parser(prog: str, description: str, out_default: str) -> Parser:
    p = Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name (default: %(default)s)")
    p.add_argument("--tracking-uri", default=default_tracking_uri(),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or %(default)s)")
    p.add_argument("--out", default=out_default, help="output folder (default: %(default)s)")
    p.add_argument("--recipe", metavar="NAME_OR_HASH", help="use only the runs of this recipe (name or hash)")
    p.add_argument("--allow-mixed-recipes", action="store_true",
                   help="accept runs of several recipes: one panel (or table rows) per recipe")
    return p


def warn(line: str) -> None:
    print(line, file=sys.stderr)
