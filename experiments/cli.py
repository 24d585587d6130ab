"""What every command shares: an argparse parser with one-line errors, and one mapping from the harness's
exceptions to exit codes. Imports nothing heavy, so `--help` and argument errors answer at once."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from experiments.errors import Interrupted, NonFiniteLoss, UserError


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit 2 (argparse prints the whole usage)."""

    def __init__(self, prog: str, description: str | None = None, **kwargs) -> None:
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def exit_code(body: Callable[[], int | None]) -> int:
    """Run a command's body; bad input is one line on stderr and exit 2, a non-finite loss exit 1, a signal
    128 + its number (the run was checkpointed and marked KILLED)."""
    try:
        return body() or 0
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
