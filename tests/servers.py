"""A real ``mlflow server`` (or ``mlflow ui``) on a free port of 127.0.0.1, in its own process group that
is stopped whole at the end; shared by the tracking-server and browser tests."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_START_S = 120  # first start on a fresh database runs every schema migration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_group_members(pgid: int) -> list[str]:
    """Processes of group ``pgid`` that are not zombies (PID 1 of a container may never reap those)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(text[: text.rindex(")") + 1])
    return members


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``timeout``; reap the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live_group_members(proc.pid) and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.2)
    if live_group_members(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while live_group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # No huey job-runner processes: this server only tracks runs (and 2 CPU cores go to training).
    return env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def mlflow_server(args: list[str], cwd: Path, log: Path, command: str = "server") -> Iterator[str]:
    """``mlflow COMMAND ARGS --host 127.0.0.1 --port <free>`` (COMMAND ``server`` or ``ui``); yields its URL
    once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", command, *args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=server_env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None:
                pytest.fail(f"mlflow {command} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow {command} did not answer /health in {SERVER_START_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        stop_group(proc)
        assert not live_group_members(proc.pid), f"server processes left over: {live_group_members(proc.pid)}"
