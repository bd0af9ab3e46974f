"""The chaos run (issue 5), short: bench/chaos.py with 3 nodes, ~36 files and at least 5 faults.

The long run (300 files, 20+ faults) is `python bench/chaos.py`; README "Reliability" has its figures.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(
    r"^files (\d+) · transcribed (\d+) · failed-as-expected (\d+) · lost (\d+) · duplicated (\d+) · "
    r"orphaned claims (\d+) · faults (\d+) · max recovery (\d+) s · throughput ([\d.]+) files/s$",
    re.MULTILINE,
)


def test_short_chaos_run_loses_and_duplicates_nothing(model_dir: Path, model_cache_dir: Path) -> None:
    seed = int(os.environ.get("SMAPD_CHAOS_SEED", "5"))
    env = dict(
        os.environ,
        SMAPD_MODEL_CACHE=str(model_cache_dir),
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "chaos.py"),
            "--seed",
            str(seed),
            "--files",
            "36",
            "--nodes",
            "3",
            "--minutes",
            "5",
            "--min-faults",
            "6",
            "--gap-min",
            "2",
            "--gap-max",
            "5",
            "--drop-gap",
            "1.2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    out = proc.stdout + proc.stderr
    m = SUMMARY.search(proc.stdout)
    assert m, out[-4000:]
    files, transcribed, failed_ok, lost, duplicated, orphaned, faults = (int(x) for x in m.groups()[:7])
    assert proc.returncode == 0, out[-4000:]
    assert files == 36 and transcribed + failed_ok == 36, out[-4000:]
    assert failed_ok >= 9, out[-4000:]  # one of each hostile kind
    assert (lost, duplicated, orphaned) == (0, 0, 0), out[-4000:]
    assert faults >= 5, out[-4000:]
    assert f"seed {seed}" in proc.stdout
