"""The one environment builder for smapd processes started by tests and benches.

A test must see only the settings it sets: nothing from the shell that runs it (an operator's
``MAX_CONCURRENT_JOBS``, a ``SMAPD_LANGUAGE`` in CI), and no ``NOTIFY_SOCKET`` of a systemd unit the
test runner itself happens to run under.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from testkit.paths import REPO

# smapd reads every SMAPD_* setting, and SMAP's names without the prefix; pydantic-settings matches
# names case-insensitively, so the scrub does too. systemd's two variables make a child send
# READY=1/WATCHDOG=1 to whoever started the test.
SCRUB_PREFIXES = ("SMAPD_",)
SCRUB_NAMES = frozenset({"MAX_PARALLEL_WORKERS", "USE_PARALLEL_TRANSCRIPTION", "MAX_CONCURRENT_JOBS",
                         "CHUNK_TIMEOUT", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})

# What a test daemon runs with unless a test says otherwise: one worker, English, a quick rescan.
DAEMON_DEFAULTS: Mapping[str, str] = {
    "MAX_PARALLEL_WORKERS": "1",
    "SMAPD_LANGUAGE": "en",
    "SMAPD_RESCAN_SECONDS": "1",
}


def scrubbed(name: str) -> bool:
    """Whether the environment variable ``name`` is a smapd setting (or systemd's) that tests drop."""
    upper = name.upper()
    return upper.startswith(SCRUB_PREFIXES) or upper in SCRUB_NAMES


def smapd_env(model_cache: Path | str | None = None, *, path: Sequence[Path | str] = (),
              base: Mapping[str, str] | None = None, **settings: object) -> dict[str, str]:
    """The environment for a smapd subprocess: ``base`` (default: ours) without any smapd setting, this
    checkout first on PYTHONPATH, then ``settings``.

    Args:
        model_cache: SMAPD_MODEL_CACHE, so a child does not assemble the embedded model again.
        path: directories put on PYTHONPATH before the checkout (e.g. one with a sitecustomize.py).
        base: the environment to start from.
        **settings: NAME=value, each value passed through ``str``.

    Returns:
        A new dict; ``os.environ`` is not changed.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if not scrubbed(k)}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, path), str(REPO)])
    if model_cache is not None:
        env["SMAPD_MODEL_CACHE"] = str(model_cache)
    env.update({k: str(v) for k, v in settings.items()})
    return env


def daemon_env(model_cache: Path | str | None = None, *, path: Sequence[Path | str] = (),
               **settings: object) -> dict[str, str]:
    """:func:`smapd_env` for a `smapd run` test node: DAEMON_DEFAULTS, then ``settings``."""
    env = smapd_env(model_cache, path=path)
    env.update(DAEMON_DEFAULTS)
    env.update({k: str(v) for k, v in settings.items()})
    return env
