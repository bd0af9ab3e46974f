"""The chaos run (issue 5), short: bench/chaos.py with 3 nodes, 36 files and at least 6 faults, of
which at least one kill -9 and one SIGSTOP past the lease hit a node holding claims.

The long run (300 files, 20+ faults) is `python bench/chaos.py`; README "Reliability" has its figures.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import testkit as tk

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

REPO = tk.REPO
PUBLISHED = re.compile(
    r"^chaos: published once, by the last claim of their job \(from the spool\): (\d+) of (\d+) transcribed; "
    r"faults that hit a node holding claims: kill (\d+), stop (\d+)$",
    re.MULTILINE,
)
SUMMARY = re.compile(
    r"^files (\d+) · transcribed (\d+) · failed-as-expected (\d+) · lost (\d+) · duplicated (\d+) · "
    r"orphaned claims (\d+) · faults (\d+) · max recovery (\d+) s · throughput ([\d.]+) files/s$",
    re.MULTILINE,
)


def test_short_chaos_run_loses_and_duplicates_nothing(model_dir: Path, model_cache_dir: Path) -> None:
    seed = int(os.environ.get("SMAPD_CHAOS_SEED", "5"))
    env = tk.smapd_env(model_cache_dir)
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
            "--require",
            "kill,stop",
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
    p = PUBLISHED.search(proc.stdout)
    assert p, out[-4000:]
    published, of, kills, stops = (int(x) for x in p.groups())
    assert published == of == transcribed, out[-4000:]  # judged from the spool: reports, claims, archive/
    assert kills >= 1 and stops >= 1, out[-4000:]  # the fault mix did hit nodes in the middle of jobs
