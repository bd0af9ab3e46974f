"""The spool protocol (DESIGN §1) on real files with real processes: each invariant has a test here
that fails if it breaks (the number is in the test's docstring)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from smapd.errors import ClaimLost
from smapd.spool import REPORT_SUFFIX, Claim, Spool, atomic_write, names
from smapd.spool import claims as claims_mod
from testkit.spoolnode import child, drop, finish_failed, finish_ok, spawn

REPO = Path(__file__).resolve().parent.parent
STATES = ("inbox", "processing", "archive", "failed")

def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def sp(root: Path) -> Spool:
    s = Spool(root, "n1", lease_seconds=60, settle_seconds=0.4)
    s.ensure_layout()
    return s


@pytest.fixture
def logs() -> Iterator[list[Any]]:
    records: list[Any] = []
    sink = logger.add(lambda m: records.append(m.record), level="DEBUG")
    yield records
    logger.remove(sink)


def locations(root: Path, names: list[str]) -> dict[str, list[str]]:
    """Which state directories hold each dropped name (by original name)."""
    where: dict[str, list[str]] = {n: [] for n in names}
    s = Spool(root, "probe")
    for state in STATES:
        for entry in os.listdir(root / state):
            if state == "failed" and entry.endswith(REPORT_SUFFIX):
                continue
            if state == "inbox":
                orig = entry
            elif state == "processing":
                orig = s.parse(entry).original_name  # type: ignore[union-attr]
            else:
                orig = entry.split(".", 1)[1]
            if orig in where:
                where[orig].append(state)
    return where


# --- intake (inv. 8, 9) -------------------------------------------------------------------------------


def test_ensure_layout_creates_every_directory(root: Path) -> None:
    Spool(root, "n1").ensure_layout()
    for d in (*STATES, "outbox", ".smapd/tmp", ".smapd/nodes"):
        assert (root / d).is_dir(), d


def test_node_names_that_would_break_claim_names_are_rejected(root: Path) -> None:
    for bad in ("a_b", "a/b", "", "a b", "x" * 65):
        with pytest.raises(ValueError):
            Spool(root, bad)


def test_temp_and_dot_names_are_ignored(sp: Spool) -> None:
    """Inv. 8: names writers use while a file is incomplete are never ready, waiting or refused."""
    for name in (".hidden.wav", "a.part", "b.PARTIAL", "c.tmp", "d.crdownload", "e.wav~", ".nfs000123",
                 ".syncthing.f.wav.tmp"):
        drop(sp, name)
    os.mkdir(sp.inbox / ".tmpdir")
    drop(sp, "ok.wav")
    result = sp.scan()
    assert result.ready == ("ok.wav",) and not result.waiting and not result.refuse


def test_a_file_being_written_is_not_ready_until_stable_for_settle_seconds(sp: Spool) -> None:
    """Inv. 8: size/mtime must hold still for settle_seconds (read through open+fstat)."""
    path = sp.inbox / "growing.wav"
    with open(path, "wb") as f:
        end = time.monotonic() + 1.2
        while time.monotonic() < end:
            f.write(b"x" * 100)
            f.flush()
            last_write = time.monotonic()
            assert "growing.wav" not in sp.scan().ready
            time.sleep(0.05)
    assert "growing.wav" in sp.scan().waiting
    wait_for(lambda: "growing.wav" in sp.scan().ready, 3, "the finished file to be ready")
    assert time.monotonic() - last_write >= sp.settle_seconds


def test_mark_ready_skips_the_settle_wait_and_a_change_undoes_it(sp: Spool) -> None:
    (sp.inbox / "fresh.wav").write_bytes(b"x")
    assert sp.scan().waiting == ("fresh.wav",)
    sp.mark_ready("fresh.wav")
    assert sp.scan().ready == ("fresh.wav",)
    sp.hint("fresh.wav", False)
    (sp.inbox / "fresh.wav").write_bytes(b"xy")
    assert sp.scan().waiting == ("fresh.wav",)


def test_a_file_that_waited_while_no_node_ran_is_ready_at_first_sight(sp: Spool) -> None:
    drop(sp, "old.wav", age=30)
    assert Spool(sp.root, "n2", settle_seconds=2).scan().ready == ("old.wav",)


@pytest.mark.timeout(30)
def test_non_regular_entries_are_refused_never_followed_or_opened(sp: Spool, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Inv. 9: symlinks (to a file, to a FIFO, dangling), FIFOs, sockets and directories go to failed/
    with a report; the link moves, its target stays; a FIFO is never opened (that would block)."""
    target = tmp_path / "secret.wav"
    target.write_bytes(b"not yours")
    outside_fifo = tmp_path / "outside.fifo"
    os.mkfifo(outside_fifo)
    os.symlink(target, sp.inbox / "link.wav")
    os.symlink(outside_fifo, sp.inbox / "link-to-fifo.wav")
    os.symlink(tmp_path / "nowhere", sp.inbox / "dangling.wav")
    os.mkfifo(sp.inbox / "pipe.wav")
    os.mkdir(sp.inbox / "folder.wav")
    monkeypatch.chdir(sp.inbox)  # AF_UNIX paths are short; bind relative to the inbox
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock.wav")
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    names = {"link.wav", "link-to-fifo.wav", "dangling.wav", "pipe.wav", "folder.wav", "sock.wav"}
    result = sp.scan()
    assert set(result.refuse) == names and not result.ready and not result.waiting
    assert not [p for p in opened if Path(p).parent == sp.inbox]
    for name, reason in result.refuse.items():
        dest = sp.refuse(name, reason)
        assert dest is not None and dest.parent == sp.failed and dest.name.endswith("." + name)
        report = json.loads(Path(f"{dest}{REPORT_SUFFIX}").read_text())
        assert report["outcome"] == "failed" and "regular files" in report["error"]
    sock.close()
    assert os.path.islink(next(sp.failed.glob("*.link.wav")))
    assert target.read_bytes() == b"not yours" and outside_fifo.exists()
    assert "symbolic link" in json.loads(next(sp.failed.glob(f"*.link.wav{REPORT_SUFFIX}")).read_text())["error"]
    assert not os.listdir(sp.inbox)


def test_an_entry_that_cannot_be_moved_gets_one_warning_not_one_per_scan(
        sp: Spool, logs: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    os.mkfifo(sp.inbox / "stuck.fifo")
    real = os.rename

    def rename(a: Any, b: Any) -> None:
        if Path(a).name == "stuck.fifo":
            raise PermissionError(errno.EACCES, "Permission denied")
        real(a, b)
    monkeypatch.setattr(os, "rename", rename)
    for _ in range(3):
        for name, reason in sp.scan().refuse.items():
            assert sp.refuse(name, reason) is None
    assert len([r for r in logs if r["level"].name == "WARNING"]) == 1
    assert (sp.inbox / "stuck.fifo").exists()


# --- claims (inv. 1, 4) ---------------------------------------------------------------------------------

ODD = ["with space.wav", "new\nline.wav", "quo'te\"s `$x`.wav", os.fsdecode(b"caf\xe9-\xff\xfe.wav"),
       "x" * 251 + ".wav", "\u00e9" * 125 + ".flac", "-rf", "talk.mp3.report.json"]

@pytest.mark.parametrize("name", [*ODD, os.fsdecode(b"\xff" * 255), "n" * 255, "a__b_0123456789ab_a1_p1"],
                         ids=lambda n: repr(n)[:20])
def test_claim_and_final_names_format_and_parse_back(name: str) -> None:
    """The public names API (used by tests and bench/chaos.py instead of slicing): every processing/,
    archive/ and failed/ name fits NAME_MAX and parses back to its parts; a shortened one says so."""
    raw = os.fsencode(name)
    c = names.format_claim(name, "web1", "0123456789ab", 3, 4242)
    file = names.claim_filename(c)
    assert len(os.fsencode(file)) <= names.NAME_MAX
    assert names.parse_claim(file) == c
    assert c.truncated == (c.original != name) and (c.truncated or len(raw) + 33 <= names.NAME_MAX)
    if c.truncated:
        assert raw.startswith(os.fsencode(c.original)[:8])
    final = names.final_name("0123456789ab", name)
    assert len(os.fsencode(final)) <= names.FINAL_MAX
    job, orig = names.parse_final(final) or ("", "")
    assert job == "0123456789ab" and (orig == name or len(raw) > names.FINAL_MAX - 13)
    assert names.parse_claim(name + ".wav") is None or "__" in name
    assert names.parse_final("talk.mp3") is None


def test_released_names_and_stems_of_odd_names() -> None:
    assert names.released_names("x.wav", "0123456789ab") == ("x.wav", "x.0123456789ab.wav")
    assert names.stem_base("new\nline.wav") == "new_line" and names.stem_base(os.fsdecode(b"\xff.wav")) == "_"
    assert len(names.stem_base("\u00e9" * 200 + ".wav").encode()) <= names.STEM_MAX
    assert [names.numbered_stem("talk", n) for n in (1, 2, 3)] == ["talk", "talk.2", "talk.3"]



@pytest.mark.parametrize("name", ODD, ids=lambda n: repr(n)[:20])
def test_odd_names_round_trip_through_claim_complete_and_archive(sp: Spool, name: str) -> None:
    assert len(os.fsencode(name)) <= 255
    drop(sp, name)
    assert sp.scan().ready == (name,)
    claim = sp.claim(name)
    assert claim is not None and claim.original_name == name and claim.attempt == 1
    assert len(os.fsencode(claim.path.name)) <= 255
    parsed = Spool(sp.root, "other").parse(claim.path.name)
    assert parsed is not None and (parsed.original_name, parsed.job_id, parsed.node, parsed.pid) == (
        name, claim.job_id, "n1", os.getpid())
    stem = sp.output_stem(claim)
    assert "\n" not in stem and stem.encode("utf-8") and len(stem.encode()) <= 210
    archived = finish_ok(sp, claim)
    assert archived.parent == sp.archive and archived.read_bytes() == b"audio"
    assert archived.name.startswith(claim.job_id + ".")
    if len(os.fsencode(name)) < 200:
        assert archived.name == f"{claim.job_id}.{name}"
    assert (sp.outbox / f"{stem}{REPORT_SUFFIX}").exists() and (sp.outbox / f"{stem}.txt").exists()
    assert not os.listdir(sp.processing) and not os.listdir(sp.inbox) and not os.listdir(sp.jobs)


def test_losing_the_claim_race_is_silent(sp: Spool, logs: list[Any]) -> None:
    """Inv. 4: ENOENT means another node won: None, nothing logged above DEBUG."""
    drop(sp, "a.wav")
    other = Spool(sp.root, "n2")
    assert sp.claim("a.wav") is not None
    assert other.claim("a.wav") is None
    assert not [r for r in logs if r["level"].no >= 20]


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOENT])
def test_a_rename_that_succeeded_despite_an_error_reply_is_a_claim(sp: Spool, monkeypatch: pytest.MonkeyPatch,
                                                                    err: int) -> None:
    """Inv. 4: a lost NFS reply (or ENOENT on the retransmission) for a rename that happened."""
    drop(sp, "a.wav")
    real = os.rename

    def rename(a: Any, b: Any) -> None:
        real(a, b)
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(os, "rename", rename)
    claim = sp.claim("a.wav")
    assert claim is not None and claim.path.exists()


def test_claim_race_between_processes_each_file_exactly_once(root: Path) -> None:
    """Inv. 1 and 4: five node processes race for 60 files (many sharing a stem) and finish them;
    every file is claimed and archived exactly once, outputs never collide, and a reader of outbox/
    never sees a temp or half-written file (inv. 3)."""
    sp = Spool(root, "parent")
    sp.ensure_layout()
    names = [f"talk{i % 12}.{ext}" for i, ext in zip(range(60), ["mp3", "wav", "ogg", "flac", "m4a"] * 12)]
    names = sorted(set(names)) + [f"solo {i}.wav" for i in range(60 - len(set(names)))]
    for n in names:
        drop(sp, n)
    seen_bad: list[str] = []
    stop = threading.Event()

    def read_outbox() -> None:  # a consumer polling outbox/ the whole time
        while not stop.is_set():
            for entry in os.listdir(sp.outbox):
                if entry.startswith(".") or not entry.endswith((".txt", REPORT_SUFFIX)):
                    seen_bad.append(entry)
                elif entry.endswith(REPORT_SUFFIX):
                    try:
                        json.loads((sp.outbox / entry).read_bytes())
                    except FileNotFoundError:
                        pass
                    except ValueError:
                        seen_bad.append(entry)
    reader = threading.Thread(target=read_outbox)
    reader.start()
    try:
        procs = [spawn(root, op="race", node=f"node{i}", complete=True) for i in range(5)]
        outs = [json.loads(p.communicate(timeout=60)[0].splitlines()[-1]) for p in procs]
    finally:
        stop.set()
        reader.join()
    claimed = [os.fsdecode(bytes.fromhex(h)) for o in outs for h, _ in o["done"]]
    assert sorted(claimed) == sorted(names), "each file claimed exactly once"
    assert sum(1 for o in outs if o["done"]) >= 2, "the race had more than one winner"
    assert not any(o["warnings"] for o in outs), "losing a race is silent"
    assert all(w == ["archive"] for w in locations(root, names).values())
    reports = [json.loads(p.read_text()) for p in sp.outbox.glob(f"*{REPORT_SUFFIX}")]
    jobs = {job for o in outs for _, job in o["done"]}
    assert len(reports) == 60 and {r["job"]["id"] for r in reports} == jobs
    assert len(list(sp.outbox.glob("*.txt"))) == 60 and not seen_bad
    assert not os.listdir(sp.stems) and not os.listdir(sp.tmp)


# --- leases (inv. 5, 6, 7) ------------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [600.0, -600.0])
def test_lease_expiry_uses_the_spool_clock_never_the_local_clock(root: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 skew: float) -> None:
    """Inv. 5: a node whose clock is ten minutes off neither steals a live claim nor misses a stale one."""
    a = Spool(root, "a", lease_seconds=0.6, settle_seconds=0)
    a.ensure_layout()
    drop(a, "live.wav")
    drop(a, "dead.wav")
    live, dead = a.claim("live.wav"), a.claim("dead.wav")
    assert live and dead
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    monkeypatch.setattr(time, "time_ns", lambda: int((real_time() + skew) * 1e9))
    skewed = Spool(root, "skewed", lease_seconds=0.6, settle_seconds=0)
    assert skewed.recoverable() == [] and skewed.recover(live) is None and skewed.recover(dead) is None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not skewed.recoverable():
        a.heartbeat(live)  # the live owner keeps refreshing
        time.sleep(0.1)
    assert [c.original_name for c in skewed.recoverable()] == ["dead.wav"]
    taken = skewed.recover(dead)
    assert taken is not None and taken.attempt == 2 and taken.node == "skewed" and taken.job_id == dead.job_id
    a.heartbeat(live)


def test_a_node_whose_claim_was_taken_over_publishes_nothing(root: Path) -> None:
    """Inv. 6: its heartbeat raises ClaimLost; complete() and fail() publish nothing."""
    a = Spool(root, "a", lease_seconds=0.3, settle_seconds=0)
    a.ensure_layout()
    drop(a, "x.wav")
    mine = a.claim("x.wav")
    assert mine
    # a is hung from here on: no heartbeats. b is another node (its own Spool, its own lease table).
    b = Spool(root, "b", lease_seconds=0.3)
    stale = wait_for(b.recoverable, 5, "the lease to expire")
    assert b.recover(stale[0]) is not None
    with pytest.raises(ClaimLost):
        a.heartbeat(mine)
    with pytest.raises(ClaimLost):
        finish_ok(a, mine)
    with pytest.raises(ClaimLost):
        finish_failed(a, mine, "x")
    assert not os.listdir(a.outbox) and not os.listdir(a.failed) and not os.listdir(a.archive)


def test_a_file_that_keeps_killing_its_node_goes_to_failed_after_max_attempts(root: Path) -> None:
    """Inv. 7: three node processes die holding the claim; the next recovery moves it to failed/ with a
    report listing every attempt."""
    sp = Spool(root, "n0", lease_seconds=0.3, max_attempts=3)
    sp.ensure_layout()
    drop(sp, "poison.wav")
    assert child(root, op="claim", node="n1", name="poison.wav", lease=0.3)["done"]
    for n in (2, 3):
        out = child(root, op="recover", node=f"n{n}", lease=0.3)
        assert out["done"] and f"_a{n}_" in out["done"][0], out
    stale = wait_for(sp.recoverable, 5, "the third lease to expire")
    assert sp.recover(stale[0]) is None
    [failed] = [p for p in sp.failed.iterdir() if not p.name.endswith(REPORT_SUFFIX)]
    report = json.loads(Path(f"{failed}{REPORT_SUFFIX}").read_text())
    assert [(a["attempt"], a["node"]) for a in report["job"]["attempts"]] == [(1, "n1"), (2, "n2"), (3, "n3")]
    assert "3 attempts" in report["error"] and report["input"]["name"] == "poison.wav"
    assert locations(root, ["poison.wav"]) == {"poison.wav": ["failed"]}


def test_an_abandoned_claim_waits_for_its_lease_and_leaves_the_lease_table_once_taken_over(root: Path) -> None:
    """Inv. 5, 7: a claim this node gave up (transient error) is not "own dead" at once; another node
    takes it over after the lease; the table then forgets it (it never grows past processing/)."""
    a = Spool(root, "a", lease_seconds=0.3)
    a.ensure_layout()
    drop(a, "x.wav")
    mine = a.claim("x.wav")
    assert mine and a._leases.tracked() == 1
    a.abandon(mine)
    assert a.recoverable() == [] and a._leases.tracked() == 1
    b = Spool(root, "b", lease_seconds=0.3)
    [stale] = wait_for(b.recoverable, 5, "the abandoned lease to expire")
    theirs = b.recover(stale)
    assert theirs is not None and theirs.attempt == 2
    assert a.recoverable() == [] and a._leases.tracked() == 0
    finish_ok(b, theirs)
    assert b._leases.tracked() == 0


def test_two_threads_recovering_one_claim_take_it_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inv. 4: within one process both takeovers would pick the same name, and a rename whose target
    exists counts as done; recover() must still hand the claim to one thread only."""
    sp = Spool(root, "n1", lease_seconds=600)
    sp.ensure_layout()
    drop(sp, "a.wav")
    assert child(root, op="claim", node="n1", name="a.wav")["done"]  # that process has exited
    [dead] = sp.recoverable()
    both_judged = threading.Barrier(2)
    real = claims_mod.Claims.rejudge

    def rejudge(self: claims_mod.Claims, claim: Claim) -> str | None:
        why = real(self, claim)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_judged.wait(timeout=1)  # both threads past the check before either renames
        return why
    monkeypatch.setattr(claims_mod.Claims, "rejudge", rejudge)
    got: list[Claim | None] = []
    threads = [threading.Thread(target=lambda: got.append(sp.recover(dead))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c is not None for c in got) == [False, True], got
    assert len(os.listdir(sp.processing)) == 1


def test_own_dead_claims_are_recovered_at_once_without_waiting_for_the_lease(root: Path) -> None:
    sp = Spool(root, "n1", lease_seconds=600)
    sp.ensure_layout()
    drop(sp, "a.wav")
    drop(sp, "b.wav")
    assert child(root, op="claim", node="n1", name="a.wav")["done"]  # that process has exited
    mine = sp.claim("b.wav")
    assert Spool(root, "n2", lease_seconds=600).recoverable() == []
    [dead] = sp.recoverable()
    assert dead.original_name == "a.wav" and mine not in sp.recoverable()
    again = sp.recover(dead)
    assert again is not None and again.attempt == 2 and again.pid == os.getpid()
    assert [a["node"] for a in again.history] == ["n1", "n1"]


# --- finishing (inv. 1, 2, 3) -----------------------------------------------------------------------------


@pytest.mark.parametrize("die_at", range(5))
def test_a_crash_at_any_point_of_complete_loses_nothing_and_duplicates_nothing(root: Path, die_at: int) -> None:
    """Inv. 1, 2: the node dies at the k-th rename (claim, output, report, archive); after a restart
    the file ends in archive/ with exactly one report and one set of outputs."""
    sp = Spool(root, "n1", lease_seconds=600)
    sp.ensure_layout()
    drop(sp, "talk.mp3")
    out = child(root, op="claim", node="n1", name="talk.mp3", complete=True, die_at_rename=die_at)
    for claim in sp.recoverable():
        again = sp.recover(claim)
        assert again is not None
        if sp.finish_published(again) is None:
            finish_ok(sp, again)
    if "rc" in out:
        assert out["rc"] == 9
    for c in sp.scan().ready:  # died before the claim: an ordinary file still waiting
        claim = sp.claim(c)
        assert claim is not None
        finish_ok(sp, claim)
    assert locations(root, ["talk.mp3"]) == {"talk.mp3": ["archive"]}
    assert sorted(os.listdir(sp.outbox)) == ["talk.report.json", "talk.txt"]
    assert not os.listdir(sp.stems) and not os.listdir(sp.processing)


@pytest.mark.parametrize("retry", ["fail", "complete"])
@pytest.mark.parametrize("die_at", range(4))
def test_a_crash_at_any_point_of_fail_leaves_exactly_one_report(sp: Spool, monkeypatch: pytest.MonkeyPatch,
                                                                 die_at: int, retry: str) -> None:
    """Inv. 1, 2: report stash -> original to failed/ -> report; ``repair`` finishes what a crash left,
    and a retry that succeeds leaves no stray failure report behind."""
    drop(sp, "bad.wav")
    claim = sp.claim("bad.wav")
    assert claim
    real, calls = os.rename, [0]

    class Died(BaseException):
        pass

    def rename(a: Any, b: Any) -> None:
        if calls[0] == die_at:
            raise Died
        calls[0] += 1
        real(a, b)
    monkeypatch.setattr(os, "rename", rename)
    try:
        finish_failed(sp, claim)
    except Died:
        pass
    monkeypatch.setattr(os, "rename", real)
    after = Spool(sp.root, "n1", lease_seconds=0.2)
    for c in after.recoverable():  # died before the move: the job is retried
        again = after.recover(c)
        assert again is not None
        if retry == "fail":
            finish_failed(after, again)
        else:
            finish_ok(after, again)
    time.sleep(0.3)
    after.repair()
    reports = [*sp.failed.glob(f"*{REPORT_SUFFIX}"), *sp.outbox.glob(f"*{REPORT_SUFFIX}")]
    assert len(reports) == 1
    [where] = locations(sp.root, ["bad.wav"])["bad.wav"]
    assert (where == "failed") == (reports[0].parent == sp.failed)
    if where == "failed":
        assert json.loads(reports[0].read_text())["error"] == "not audio"


def test_output_and_archive_names_never_overwrite(sp: Spool) -> None:
    """talk.mp3 twice and talk.wav: three archived originals, stems talk, talk.2, talk.3; a stem whose
    outputs were consumed (moved away) is free again."""
    archived, stems = [], []
    for name in ("talk.mp3", "talk.mp3", "talk.wav"):
        drop(sp, name, data=name.encode() + str(len(archived)).encode())
        claim = sp.claim(sp.scan().ready[0])
        assert claim
        stems.append(sp.output_stem(claim))
        archived.append(finish_ok(sp, claim))
    assert stems == ["talk", "talk.2", "talk.3"]
    assert len({p.name for p in archived}) == 3 and all(p.exists() for p in archived)
    for p in sp.outbox.glob("talk.*"):
        p.unlink()
    drop(sp, "talk.ogg")
    claim = sp.claim("talk.ogg")
    assert claim and sp.output_stem(claim) == "talk"


def test_a_stem_held_by_a_job_in_flight_is_not_given_to_another(sp: Spool) -> None:
    drop(sp, "a.mp3")
    drop(sp, "a.wav")
    one, two = sp.claim("a.mp3"), sp.claim("a.wav")
    assert one and two
    assert sp.output_stem(one) == "a" and sp.output_stem(two) == "a.2" and sp.output_stem(one) == "a"


def test_release_hands_the_file_back_under_its_name_attempt_not_counted(sp: Spool) -> None:
    drop(sp, "x.wav")
    claim = sp.claim("x.wav")
    assert claim
    sp.output_stem(claim)
    assert sp.release(claim) == sp.inbox / "x.wav"
    assert not os.listdir(sp.processing) and not os.listdir(sp.stems) and not os.listdir(sp.jobs)
    again = sp.claim("x.wav")
    assert again and again.attempt == 1
    drop(sp, "x.wav", data=b"a new file with the same name")
    back = sp.release(again)
    assert back != sp.inbox / "x.wav" and back.read_bytes() == b"audio"
    assert (sp.inbox / "x.wav").read_bytes() == b"a new file with the same name"


def test_atomic_write_never_leaves_a_partial_file(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inv. 3: a failure before the rename leaves neither the target nor a temp file."""
    def boom(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        atomic_write(sp.outbox / "t.txt", b"x" * 10000, sp.tmp)
    assert not os.listdir(sp.outbox) and not os.listdir(sp.tmp)


def test_status_and_node_heartbeats(sp: Spool) -> None:
    drop(sp, "wait.wav", age=0)
    drop(sp, "run.wav")
    claim = sp.claim("run.wav")
    assert claim
    sp.write_heartbeat({"jobs": [{"job_id": claim.job_id, "chunks_done": 1, "chunks_total": 4}]})
    os.mkfifo(sp.inbox / "p")
    sp.refuse("p")
    state = sp.list_state()
    assert state["clock"] == "spool" and [w["name"] for w in state["waiting"]] == ["wait.wav"]
    [c] = state["processing"]
    assert (c["name"], c["node"], c["attempt"], c["stale"]) == ("run.wav", "n1", 1, False) and c["age"] < 5
    assert state["failures"][0]["name"] == "p" and "FIFO" in state["failures"][0]["error"]
    [n] = state["nodes"]
    assert n["node"] == "n1" and n["age"] < 5 and n["jobs"][0]["chunks_total"] == 4
    json.dumps(state)


def test_prune_archive_deletes_only_old_originals(sp: Spool) -> None:
    for name in ("old.wav", "new.wav"):
        drop(sp, name)
        claim = sp.claim(name)
        assert claim
        finish_ok(sp, claim)
    old = next(sp.archive.glob("*.old.wav"))
    t = time.time() - 3 * 86400
    os.utime(old, (t, t))
    assert sp.prune_archive(0) == 0 and old.exists()
    assert sp.prune_archive(2) == 1 and not old.exists() and len(os.listdir(sp.archive)) == 1
