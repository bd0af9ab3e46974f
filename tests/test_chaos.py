"""The chaos run (issues 5 and 10), short: bench/chaos.py with 3 nodes, 36 files (two of them big, shared
between the nodes) and at least 6 faults, of which at least one kill -9 and one SIGSTOP past the lease hit
a node holding claims, and one of each hit the owner or a helper of a shared job in the middle of it.

The long run (300 files, 20+ faults) is `python bench/chaos.py`; README "Reliability" has its figures.
The checks the run ends with (testkit.invariants) are shown to catch what they are for first, on a spool
written by hand.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import testkit as tk
from testkit.invariants import chunk_problems

REPO = tk.REPO
PUBLISHED = re.compile(
    r"^chaos: published once, by the last claim of their job \(from the spool\): (\d+) of (\d+) transcribed; "
    r"faults that hit a node holding claims: kill (\d+), stop (\d+)$",
    re.MULTILINE,
)
SUMMARY = re.compile(
    r"^files (\d+) · transcribed (\d+) · failed-as-expected (\d+) · lost (\d+) · duplicated (\d+) · "
    r"orphaned claims (\d+) · faults (\d+) · max recovery (\d+) s · throughput ([\d.]+) files/s · "
    r"chunks redone (\d+) · resumed jobs (\d+)$",
    re.MULTILINE,
)
SHARED = re.compile(
    r"^chaos: shared jobs: (\d+) of (\d+) big files published once with every chunk ok; chunks helped (\d+), "
    r"resumed (\d+), redone (\d+); faults that hit an owner or helper of a shared job mid-job: kill (\d+) "
    r"\(owner (\d+), helper (\d+)\), stop (\d+) \(owner (\d+), helper (\d+)\); during a shared job: "
    r"disk full (\d+), read-only outbox (\d+)$",
    re.MULTILINE,
)
BIG = re.compile(
    r"^chaos: big file ok (\S+): outbox success, ([\d.]+) s, (\d+) chunks \(helped (\d+), resumed (\d+), "
    r"redone (\d+);.*attempt (\d+)$",
    re.MULTILINE,
)
BIG_FILES = 2


@pytest.mark.chaos
@pytest.mark.timeout(420)
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
            "--big",
            str(BIG_FILES),
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
            "--require-shared",
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
    redone, resumed_jobs = int(m.group(10)), int(m.group(11))
    assert proc.returncode == 0, out[-4000:]
    assert files == 36 and transcribed + failed_ok == 36, out[-4000:]
    assert failed_ok >= 9, out[-4000:]  # one of each hostile kind
    assert (lost, duplicated, orphaned) == (0, 0, 0), out[-4000:]
    assert faults >= 5, out[-4000:]
    assert redone >= 0 and resumed_jobs >= 0, out[-4000:]
    assert f"seed {seed}" in proc.stdout
    p = PUBLISHED.search(proc.stdout)
    assert p, out[-4000:]
    published, of, kills, stops = (int(x) for x in p.groups())
    assert published == of == transcribed, out[-4000:]  # judged from the spool: reports, claims, archive/
    assert kills >= 1 and stops >= 1, out[-4000:]  # the fault mix did hit nodes in the middle of jobs
    # the big files: each published once, success, every chunk ok (the run checked it from the spool)
    bigs = BIG.findall(proc.stdout)
    assert len(bigs) == BIG_FILES and len({b[0] for b in bigs}) == BIG_FILES, out[-4000:]
    assert all(float(b[1]) >= 180 and int(b[2]) >= 2 for b in bigs), out[-4000:]
    s = SHARED.search(proc.stdout)
    assert s, out[-4000:]
    big_ok, big_n, helped = (int(x) for x in s.groups()[:3])
    assert big_ok == big_n == BIG_FILES, out[-4000:]
    assert helped >= 1, out[-4000:]  # the chunks were shared: idle nodes made some of them
    shared_kills, shared_stops = int(s.group(6)), int(s.group(9))
    assert shared_kills >= 1 and shared_stops >= 1, out[-4000:]  # faults hit owners/helpers mid-job


# --------------------------------------------------------------------------------------------
# The chunk checks the run ends with catch what they are for (a spool written by hand)
# --------------------------------------------------------------------------------------------

JOB = "0123456789ab"


def _chunk(i: int, status: str = "ok", **extra: Any) -> dict[str, Any]:
    return {"index": i, "start": 30.0 * (i - 1), "end": 30.0 * i, "status": status,
            "error": None if status == "ok" else "timed out after 30 s", "resumed": False, "redone": False,
            "made_by": {"node": "n1", "attempt": 1, "helper": False}, **extra}


def _spool(root: Path, chunks: list[dict[str, Any]], outcome: str = "success", txt: str = "words\n") -> tk.SpoolView:
    """A finished spool with one published job of ``chunks``, its .txt ``txt``."""
    for d in ("inbox", "processing", "outbox", "archive", "failed", ".smapd/chunks"):
        (root / d).mkdir(parents=True)
    (root / "outbox" / "talk.txt").write_text(txt)
    gaps = [c for c in chunks if c["status"] != "ok"]
    totals = {"chunks_ok": len(chunks) - len(gaps), "chunks_failed": len(gaps),
              "chunks_resumed": sum(c["resumed"] for c in chunks),
              "chunks_helped": sum(bool(c["made_by"]["helper"]) for c in chunks),
              "chunks_redone": sum(c["redone"] for c in chunks)}
    report = {"outcome": outcome, "outputs": {".txt": "talk.txt"}, "input": {"name": "talk.wav"},
              "chunks": chunks, "totals": totals,
              "job": {"id": JOB, "attempt": 1, "node": "n1", "original_name": "talk.wav",
                      "claimed_as": f"talk.wav__n1_{JOB}_a1_p9", "attempts": [{"attempt": 1, "node": "n1"}]}}
    (root / "outbox" / "talk.report.json").write_text(json.dumps(report))
    (root / "archive" / f"{JOB}.talk.wav").write_bytes(b"RIFF")
    return tk.SpoolView(root)


def test_chunk_checks_pass_a_job_with_a_marked_gap(tmp_path: Path) -> None:
    chunks = [_chunk(1), _chunk(2, "failed"), _chunk(3, made_by={"node": "n2", "attempt": None, "helper": True},
                                                     resumed=True)]
    sp = _spool(tmp_path / "s", chunks, "partial",
                "words\n[untranscribed 30.0-60.0 s: chunk 2: timed out after 30 s]\nmore words\n")
    found = tk.check_spool(sp, ["talk.wav"])
    assert found, str(found)


@pytest.mark.parametrize(("what", "chunks", "outcome", "txt", "caught"), [
    ("a hole in the indexes", [_chunk(1), _chunk(3)], "success", "w\n", "not 1..2"),
    ("a repeated index", [_chunk(1), _chunk(1)], "success", "w\n", "not 1..2"),
    ("a gap not marked in the .txt", [_chunk(1), _chunk(2, "failed")], "partial", "w\n", "not marked as gaps"),
    ("a failed chunk in a success", [_chunk(1), _chunk(2, "failed")], "success",
     "[untranscribed 30.0-60.0 s: chunk 2: x]\n", "outcome success with 1 failed"),
    ("a chunk resumed that its own attempt made", [_chunk(1), _chunk(2, resumed=True)], "success", "w\n",
     "is resumed, but the publishing attempt made it"),
    ("a chunk of an earlier attempt not resumed", [_chunk(1, made_by={"node": "n2", "attempt": 0, "helper": False})],
     "success", "w\n", "is not resumed, but another attempt made it"),
    ("a chunk neither ok nor failed", [_chunk(1), _chunk(2, "running")], "partial",
     "[untranscribed 30.0-60.0 s: chunk 2: x]\n", "neither ok nor a failed chunk"),
])
def test_chunk_checks_catch_a_broken_job(tmp_path: Path, what: str, chunks: list[dict[str, Any]], outcome: str,
                                         txt: str, caught: str) -> None:
    sp = _spool(tmp_path / "s", chunks, outcome, txt)
    found = tk.check_spool(sp, ["talk.wav"])
    assert not found and caught in str(found), f"{what}: {found}"


def test_chunk_checks_catch_totals_that_disagree_and_leftover_checkpoints(tmp_path: Path) -> None:
    sp = _spool(tmp_path / "s", [_chunk(1), _chunk(2, redone=True)])
    report = json.loads((sp.outbox / "talk.report.json").read_text())
    assert chunk_problems(report, sp) == []
    report["totals"]["chunks_redone"] = 0
    assert "totals disagree" in " ".join(chunk_problems(report, sp))
    # a checkpoint folder left behind for a finished job, a checkpoint record in outbox/
    (sp.root / ".smapd" / "chunks" / JOB / "done").mkdir(parents=True)
    (sp.root / ".smapd" / "chunks" / JOB / "job.json").write_text("{}")
    (sp.outbox / "2.json").write_text("{}")
    found = str(tk.check_spool(sp, ["talk.wav"]))
    assert f"checkpoint folders left in .smapd/chunks for finished jobs: ['{JOB}']" in found, found
    assert "checkpoints in outbox/ (a record or a job's folder): ['2.json']" in found, found
