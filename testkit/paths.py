"""Where the test material is: the repository, tests/data, tests/tools and the shared speech clips."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "tests" / "data"
TOOLS_DIR = REPO / "tests" / "tools"
SPEECH_ENV = "TESTKIT_SPEECH_DIR"  # not SMAPD_*: the env builder would scrub it


def speech_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The directory of speech clips with a manifest.tsv, for the benches and the chaos run.

    The first of: ``override`` (a command-line flag), ``$TESTKIT_SPEECH_DIR``, ``shared/data/speech``
    next to the repository or next to any folder above it (a worktree sits deeper than the main
    checkout), and tests/data (fewer clips, always there).

    Raises:
        FileNotFoundError: ``override`` or ``$TESTKIT_SPEECH_DIR`` is given but has no manifest.tsv.
    """
    given = override or os.environ.get(SPEECH_ENV)
    if given:
        path = Path(given).expanduser()
        if not (path / "manifest.tsv").is_file():
            raise FileNotFoundError(f"{path}: no manifest.tsv (from {'the flag' if override else SPEECH_ENV})")
        return path
    for parent in REPO.parents:
        candidate = parent / "shared" / "data" / "speech"
        if (candidate / "manifest.tsv").is_file():
            return candidate
    return DATA_DIR
