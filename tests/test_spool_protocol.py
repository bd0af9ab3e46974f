"""Fast protocol checks that tests/test_spool.py leaves out: the edges where two nodes meet on one claim.

Each test names the DESIGN.md §1 invariant it guards. No model, no daemon: spool.py on tmp dirs, with
real processes where a race needs them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smapd.errors import ClaimLost
from smapd.spool import REPORT_SUFFIX, Claim, Spool
from smapd.spool import claims as claims_mod
from testkit import wait_for
from testkit.spoolnode import drop, finish_failed, spawn

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def root(tmp_path: Path) -> Path:
    Spool(tmp_path / "spool", "setup").ensure_layout()
    return tmp_path / "spool"


def hung_claim(root: Path, name: str, lease: float) -> tuple[Spool, Claim, Spool]:
    """Node a claims ``name`` and hangs; node b (its own lease table) sees the claim go stale."""
    a = Spool(root, "a", lease_seconds=lease)
    drop(a, name)
    mine = a.claim(name)
    assert mine
    b = Spool(root, "b", lease_seconds=lease)
    assert wait_for(b.recoverable, 5)
    return a, mine, b


def test_a_claim_refreshed_after_it_was_listed_as_stale_is_not_taken(root: Path) -> None:
    """Inv. 5, 6: recover() re-reads the lease right before its rename; an owner that woke up and
    refreshed in between keeps its claim."""
    a, mine, b = hung_claim(root, "slow.wav", 0.4)
    [listed] = b.recoverable()
    a.heartbeat(mine)  # the owner wakes up
    assert b.recover(listed) is None
    assert mine.path.exists() and [c.node for c, _ in b.claims()] == ["a"]


def test_a_claim_of_a_file_with_an_old_mtime_is_live_at_once(root: Path) -> None:
    """Inv. 5: the user's mtime (a day old) must not make a fresh claim look expired to other nodes."""
    a = Spool(root, "a", lease_seconds=30)
    drop(a, "old.wav", age=86400)
    assert a.claim("old.wav")
    other = Spool(root, "b", lease_seconds=30)
    assert other.recoverable() == []
    state = other.list_state()
    assert [(c["name"], c["stale"]) for c in state["processing"]] == [("old.wav", False)]
    assert state["processing"][0]["age"] < 5


def test_a_claim_not_yet_refreshed_is_live_by_its_rename_not_by_the_files_mtime(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inv. 5: between the claim rename and the first lease refresh (or when the refresh fails, e.g.
    .smapd/jobs/ not writable) the lease is the rename's ctime; the dropped file's own mtime (a day
    old) must not make it look expired to another node."""
    def cannot_touch(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    a = Spool(root, "a", lease_seconds=30)
    drop(a, "old.wav", age=86400)
    monkeypatch.setattr(claims_mod, "touch", cannot_touch)
    mine = a.claim("old.wav")
    assert mine and not (root / ".smapd" / "jobs" / f"{mine.job_id}.lease").exists()
    other = Spool(root, "b", lease_seconds=30)
    assert other.recoverable() == [] and other.recover(mine) is None
    assert [c["stale"] for c in other.list_state()["processing"]] == [False]


@pytest.mark.parametrize("name", ["a__n9_0123456789ab_a1_p1.wav", "__", "x__y_z", "b_0123456789ab_a7_p99"])
def test_names_that_look_like_claim_names_parse_back_whole(root: Path, name: str) -> None:
    """Inv. 4: claim names are parsed from the right, so an original that imitates one survives."""
    a = Spool(root, "n1", lease_seconds=30)
    drop(a, name)
    claim = a.claim(name)
    assert claim
    parsed = Spool(root, "other").parse(claim.path.name)
    assert parsed and (parsed.original_name, parsed.node, parsed.job_id, parsed.attempt) == (
        name, "n1", claim.job_id, 1)


RECOVER = r"""
import json, sys, time
from pathlib import Path
from smapd.spool import Spool
root, node, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
sp = Spool(Path(root), node, lease_seconds=0.3)
stale = sp.recoverable()
while time.time() < start:  # line up with the other processes (a test clock, not a lease judgement)
    pass
got = [sp.recover(c) for c in stale]
print(json.dumps([c.path.name for c in got if c is not None]))
"""


def test_many_nodes_recovering_one_stale_claim_exactly_one_wins(root: Path) -> None:
    """Inv. 4, 5: the takeover is one rename; losers get None, and the claim exists exactly once."""
    a = Spool(root, "a", lease_seconds=0.3)
    drop(a, "contested.wav")
    mine = a.claim("contested.wav")
    assert mine
    assert wait_for(lambda: Spool(root, "probe", lease_seconds=0.3).recoverable(), 5)
    start = time.time() + 1.5  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", RECOVER, str(root), f"r{i}", str(start)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
             for i in range(4)]
    won = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(len(w) for w in won) == 1, won
    assert os.listdir(root / "processing") == [n for w in won for n in w]
    assert "_a2_" in os.listdir(root / "processing")[0]
    with pytest.raises(ClaimLost):
        a.heartbeat(mine)


def test_fail_after_a_takeover_writes_no_report_and_keeps_the_new_owners_claim(root: Path) -> None:
    """Inv. 2, 6: the old owner's fail() raises ClaimLost; failed/ stays empty, the new claim is intact."""
    a, mine, b = hung_claim(root, "f.wav", 0.3)
    theirs = b.recover(b.recoverable()[0])
    assert theirs
    with pytest.raises(ClaimLost):
        finish_failed(a, mine, "x")
    with pytest.raises(ClaimLost):
        a.release(mine)
    assert not os.listdir(root / "failed") and not os.listdir(root / "inbox")
    assert theirs.path.exists()
    finish_failed(b, theirs, "bad audio.")
    reports = [n for n in os.listdir(root / "failed") if n.endswith(REPORT_SUFFIX)]
    assert len(reports) == 1
    report = json.loads((root / "failed" / reports[0]).read_bytes())
    assert [x["node"] for x in report["job"]["attempts"]] == ["a", "b"]


def test_a_fifo_in_inbox_never_blocks_a_scan(root: Path) -> None:
    """Inv. 9: scan() must not open a FIFO (an open for reading blocks until a writer comes)."""
    sp = Spool(root, "n1")
    os.mkfifo(sp.inbox / "pipe.wav")
    p = spawn(root, op="race", node="n2")  # a scan+claim loop in its own process: a hang would show
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    result = sp.scan()
    assert "pipe.wav" in result.refuse and not result.ready
    assert sp.refuse("pipe.wav") is not None
    assert not os.listdir(sp.inbox)
