"""The analysis CLIs' errors: each is one line on stderr and an exit code (2 for bad input)."""
from __future__ import annotations

from experiments.errors import UserError


class AnalysisError(UserError):
    """A problem the CLIs report as one line on stderr, exiting with ``exit_code`` (1 when the store fails)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MixedRecipesError(AnalysisError):
    """Runs of different recipes were about to share a figure or table."""


class EmptyFigureError(AnalysisError):
    """A figure would have no points (e.g. every run lacks the metric on its x axis)."""
