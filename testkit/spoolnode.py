"""Spool nodes for the protocol tests: a node operation in its own process (claim, race, recover,
crash at the k-th rename), safe drops, and finishing a claim the way the runner does.

This module drives smapd's own Spool (unlike the rest of testkit, which looks at a spool from
outside): the protocol tests need a second node that is a real second process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from smapd import report
from smapd.models import AudioInfo, Transcript
from smapd.spool import Claim, Spool
from testkit.paths import REPO

# A node in its own process: claim or recover, optionally complete; may die (os._exit) at the k-th
# rename to simulate a crash at any point. Prints what it did as one JSON line.
CHILD = r"""
import json, os, sys, time
from pathlib import Path
from loguru import logger
from testkit.spoolnode import finish_ok
from smapd.spool import Spool
args = json.loads(sys.argv[1])
warnings = []
logger.remove(); logger.add(lambda m: warnings.append(str(m)), level="WARNING")
sp = Spool(Path(args["root"]), args["node"], lease_seconds=args.get("lease", 60), settle_seconds=0,
           max_attempts=args.get("max_attempts", 3))
if "die_at_rename" in args:
    real, calls = os.rename, [0]
    def rename(a, b):
        if calls[0] == args["die_at_rename"]:
            os._exit(9)
        calls[0] += 1
        real(a, b)
    os.rename = rename
done = []
if args["op"] == "race":
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = sp.scan()
        if not result.ready and not result.waiting:
            break
        for name in result.ready:
            c = sp.claim(name)
            if c is not None:
                done.append([os.fsencode(c.original_name).hex(), c.job_id])
                if args.get("complete"):
                    finish_ok(sp, c, b"text of " + os.fsencode(c.original_name))
elif args["op"] == "claim":
    c = sp.claim(args["name"])
    done.append(c.path.name)
    if args.get("complete"):
        finish_ok(sp, c, b"text of " + os.fsencode(c.original_name))
elif args["op"] == "recover":
    deadline = time.monotonic() + 20
    while not done and time.monotonic() < deadline:
        for c in sp.recoverable():
            new = sp.recover(c)
            if new is not None:
                done.append(new.path.name)
                break
        time.sleep(0.05)
print(json.dumps({"done": done, "warnings": warnings}))
"""


def child(root: Path, **args: Any) -> dict[str, Any]:
    """Run one node operation in a fresh process; returns its JSON line (or rc when it died)."""
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"root": str(root), **args})],
                       check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if p.returncode:
        return {"rc": p.returncode, "stderr": p.stderr}
    return json.loads(p.stdout.splitlines()[-1])


def spawn(root: Path, **args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps({"root": str(root), **args})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def drop(sp: Spool, name: str | bytes, data: bytes = b"audio", age: float = 30.0) -> str:
    """Drop a file the safe way (temp name, then rename) with an mtime ``age`` seconds old."""
    name = os.fsdecode(name)
    tmp = sp.inbox / ".dropping.part"
    tmp.write_bytes(data)
    t = time.time() - age  # setting a test file's mtime; the spool never reads the local clock
    os.utime(tmp, (t, t))
    os.rename(tmp, sp.inbox / name)
    return name


SILENCE = Transcript(segments=(), chunks=(), language=None, language_probability=None,
                     audio=AudioInfo(duration=1.0, sample_rate=16000, channels=1, codec="pcm_s16le", container="wav"))


def job_of(claim: Claim) -> report.JobInfo:
    return report.JobInfo(id=claim.job_id, attempt=claim.attempt, node=claim.node, claimed_as=claim.path.name,
                          original_name=claim.original_name, attempts=claim.history)


def finish_ok(sp: Spool, claim: Claim, text: bytes = b"words") -> Path:
    """What the runner does for a success: reserve the stem, name the outputs, finish."""
    stem = sp.output_stem(claim)
    done = report.build(SILENCE, input=report.input_info(claim.original_name), job=job_of(claim), error=None)
    return sp.finish(claim, {".txt": text}, done.published_as(stem, [".txt"]))


def finish_failed(sp: Spool, claim: Claim, error: str = "not audio") -> Path:
    """What the runner does for a failure."""
    return sp.finish(claim, {}, report.failure(claim.original_name, job_of(claim), error))
