"""Processes from the outside: polling waits, liveness that sees zombies, a daemon's children, the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from testkit.paths import REPO


def wait_for(condition: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it is truthy or ``timeout`` seconds pass; True if it came true."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        threading.Event().wait(interval)


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a killed child whose parent has not reaped it yet
    stays in the table as a zombie, and in a container PID 1 may never reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is dead (or a zombie); True if it died within ``timeout`` seconds."""
    return wait_for(lambda: not pid_alive(pid), timeout)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the engine workers of a daemon), from /proc."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def smapd(*args: str, env: Mapping[str, str] | None = None, timeout: float = 600,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m smapd.cli ARGS`` to the end and capture its output (text)."""
    return subprocess.run([sys.executable, "-m", "smapd.cli", *args], capture_output=True, text=True,
                          env=None if env is None else dict(env), timeout=timeout, cwd=cwd or REPO,
                          check=False)
