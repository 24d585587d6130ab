"""The exceptions the commands turn into exit codes (experiments.cli.exit_code); importing this is cheap."""
from __future__ import annotations

import signal


class UserError(Exception):
    """Bad input from the user (flags, recipes, data, checkpoints): say what is wrong and how to fix it."""


class DataError(UserError):
    """Missing, unreadable or corrupt data; the message names the path it concerns."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run ends FAILED."""


class Interrupted(BaseException):
    """SIGTERM or Ctrl-C arrived; raised at the next step boundary so the state is consistent."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
