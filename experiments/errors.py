"""The one exception type the CLI turns into a single line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user (flags, recipes, data, checkpoints): say what is wrong and how to fix it."""


class DataError(UserError):
    """Missing, unreadable or corrupt data; the message names the path it concerns."""
