"""How long the commands take to answer, each in a fresh process: `run.py --help`, an argument error, and
`run.py --list` and `python -m zoo` with a cold and a warm cache (of model names, of the FLOP table).

    python -m experiments.cli_timing [--repeat 3] [--root CHECKOUT]

--root times another checkout (a worktree of an older commit, say) with this Python, for before/after
numbers. Prints the median and the fastest of --repeat runs, in seconds. A cold command runs with an empty
$CNN_ZOO_CACHE each time, a warm one after untimed runs have filled it.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.cli import Parser, exit_code
from experiments.errors import UserError

LIST, ZOO = ["experiments/run.py", "--list"], ["-m", "zoo"]
# label: (arguments after the interpreter, expected exit code)
COMMANDS = {
    "run.py --help": (["experiments/run.py", "--help"], 0),
    "run.py argument error": (["experiments/run.py", "--arch", "resnet20", "--bogus"], 2),
    "run.py --list (cold cache)": (LIST, 0),
    "run.py --list (warm cache)": (LIST, 0),
    "python -m zoo (cold cache)": (ZOO, 0),
    "python -m zoo (warm cache)": (ZOO, 0),
}


def time_command(root: Path, args: list[str], expected: int, cache: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(root), "CNN_ZOO_CACHE": cache}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != expected:
        raise UserError(f"`{' '.join(args)}` in {root} exited {proc.returncode}, not {expected}: "
                        f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    return seconds


def time_all(root: Path, repeat: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    with tempfile.TemporaryDirectory() as warm:
        for args in (LIST, ZOO):  # fill the warm cache
            time_command(root, args, 0, warm)
        for _ in range(repeat):
            for label, (args, expected) in COMMANDS.items():
                with tempfile.TemporaryDirectory() as cold:
                    times[label].append(time_command(root, args, expected, cold if "cold" in label else warm))
    return times


def main(argv: list[str] | None = None) -> int:
    p = Parser("cli_timing.py", __doc__)
    p.add_argument("--repeat", type=int, default=3, help="runs of each command (default 3)")
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="the checkout to time (default: this one)")
    args = p.parse_args(argv)

    def body() -> None:
        if args.repeat < 1:
            raise UserError("--repeat must be >= 1")
        if not (args.root / "experiments" / "run.py").is_file():
            raise UserError(f"{args.root} is not a checkout of this project (no experiments/run.py)")
        print(f"{args.root} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start, "
              f"{args.repeat} runs each)")
        print(f"{'command':<30}{'median s':>10}{'fastest s':>11}")
        for label, seconds in time_all(args.root.resolve(), args.repeat).items():
            print(f"{label:<30}{statistics.median(seconds):>10.2f}{min(seconds):>11.2f}")

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
