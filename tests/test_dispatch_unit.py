"""Fast unit tests of the daemon's dispatch (smapd/dispatch.py) on a real spool in a temp dir, with a
fake engine pool and fake jobs: claiming, slot accounting (a hard cap and ``auto``), stale claims
before new files, MAX_ATTEMPTS without a free place, lease refresh, and the shutdown hand-back.
The real daemon is proved in test_daemon.py and test_daemon_defects.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import testkit as tk
from smapd.dispatch import ActiveJob, Dispatcher, MaxJobs, Waker
from smapd.pipeline import Progress
from smapd.spool import Spool
from testkit.spoolnode import finish_ok

CLIP = tk.DATA_DIR / "fleurs-en-003.ogg"
LEASE = 0.3


class FakePool:
    """The pool as admission sees it: its slot count and the chunks each job has queued."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.queue: dict[str, int] = {}
        self.cancelled: list[str] = []

    def queued(self) -> dict[str, int]:
        return {k: v for k, v in self.queue.items() if v}

    def cancel_job(self, job: str) -> None:
        self.cancelled.append(job)
        self.queue.pop(job, None)


class FakeJobs:
    """run_job for the dispatcher: each job waits until the test finishes it (or it is cancelled)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.finish: dict[str, threading.Event] = {}
        self.names: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, job: ActiveJob) -> str:
        done = threading.Event()
        with self.lock:
            self.finish[job.claim.original_name] = done
            self.names.append(job.claim.original_name)
        while not done.wait(0.005):
            if job.cancelled.is_set():
                return "cancelled"
        finish_ok(self.spool, job.claim)  # publish and archive the way the runner does
        return "done"

    def end(self, name: str) -> None:
        assert tk.wait_for(lambda: name in self.finish, 5), f"{name} never started"
        self.finish[name].set()


class Rig:
    def __init__(self, root: Path, max_jobs: MaxJobs, workers: int = 2) -> None:
        self.spool = Spool(root, "solo", lease_seconds=LEASE, max_attempts=3, settle_seconds=0.5)
        self.spool.ensure_layout()
        self.pool = FakePool(workers)
        self.jobs = FakeJobs(self.spool)
        self.executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="test-job")
        self.wake = Waker()
        self.d = Dispatcher(self.spool, self.pool, self.jobs, self.executor, max_jobs, self.wake)

    def drop(self, *names: str) -> None:
        """Files renamed into inbox/: the watcher's moved-to hint marks them ready."""
        for i, name in enumerate(names):
            shutil.copyfile(CLIP, self.spool.inbox / name)
            old = time.time() - 60 + i  # oldest first
            os.utime(self.spool.inbox / name, (old, old))
            self.spool.mark_ready(name)

    def stale_claim(self, name: str, node: str = "ghost", attempt: int = 1) -> Path:
        """A claim another node left behind (the on-disk name format of DESIGN §1), stale after LEASE."""
        path = self.spool.processing / f"{name}__{node}_{os.urandom(6).hex()}_a{attempt}_p999999"
        shutil.copyfile(CLIP, path)
        return path

    def running(self) -> list[str]:
        return sorted(j.claim.original_name for j in self.d.active())

    def close(self) -> None:
        self.d.stopping = True
        self.d.cancel(self.d.active())  # a job thread that has not begun yet sees this too
        self.executor.shutdown(wait=True)
        self.wake.close()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator:
    rigs: list[Rig] = []

    def make(max_jobs: MaxJobs, workers: int = 2) -> Rig:
        rigs.append(Rig(tmp_path / f"spool{len(rigs)}", max_jobs, workers))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def test_a_hard_cap_claims_only_what_it_can_run_and_the_next_file_when_a_job_ends(rig_factory) -> None:
    r = rig_factory(1)
    r.drop("a.ogg", "b.ogg", "c.ogg")
    r.d.dispatch()
    assert r.running() == ["a.ogg"]  # oldest first
    assert sorted(os.listdir(r.spool.inbox)) == ["b.ogg", "c.ogg"], "claimed more than MAX_CONCURRENT_JOBS"
    r.d.dispatch()  # nothing changed: still one
    assert len(r.d.active()) == 1
    r.jobs.end("a.ogg")
    assert tk.wait_for(lambda: not r.d.active(), 5)
    r.d.dispatch()  # the last scan left files behind: a free place claims the next without a hint
    assert len(r.d.active()) == 1 and len(os.listdir(r.spool.inbox)) == 1
    assert r.d.completed == 1


def test_inbox_is_not_listed_without_a_reason(rig_factory) -> None:
    """Only a hint, the rescan, the settle follow-up or a file left for lack of room lists inbox/."""
    r = rig_factory(1)
    r.d.dispatch()  # the first scan at start
    r.drop("late.ogg")  # no hint, no rescan tick: not seen yet
    r.d.dispatch()
    assert not r.d.active()
    r.d.scan_due = True  # what the rescan timer (or a watcher hint) sets
    r.d.dispatch()
    assert r.running() == ["late.ogg"]


def test_a_fresh_file_is_looked_at_again_after_settle_seconds(rig_factory) -> None:
    r = rig_factory(1)
    shutil.copyfile(CLIP, r.spool.inbox / "fresh.ogg")  # mtime now: it must settle first
    r.d.dispatch()
    assert not r.d.active() and r.d.settle_at is not None
    assert r.d.settle_at - time.monotonic() <= r.spool.settle_seconds
    assert tk.wait_for(lambda: time.monotonic() >= (r.d.settle_at or 0), 2)
    r.d.dispatch()
    assert r.running() == ["fresh.ogg"] and r.d.settle_at is None


def test_stale_claims_are_recovered_before_new_files(rig_factory) -> None:
    r = rig_factory(1)
    r.stale_claim("old.ogg")
    r.drop("new.ogg")
    tk.wait_for(lambda: False, LEASE + 0.1)  # let the stale claim's lease run out
    r.d.dispatch()
    assert r.running() == ["old.ogg"]
    job = r.d.active()[0]
    assert (job.claim.node, job.claim.attempt) == ("solo", 2)
    assert os.listdir(r.spool.inbox) == ["new.ogg"]


def test_a_second_stale_claim_waits_for_room_and_still_goes_before_new_files(rig_factory) -> None:
    r = rig_factory(1)
    r.stale_claim("old1.ogg")
    r.stale_claim("old2.ogg")
    r.drop("new.ogg")
    tk.wait_for(lambda: False, LEASE + 0.1)
    r.d.dispatch()
    first = r.running()
    assert len(first) == 1 and first[0].startswith("old")
    r.jobs.end(first[0])
    assert tk.wait_for(lambda: not r.d.active(), 5)
    r.d.scan_due = True  # even with a rescan due, the waiting stale claim goes first
    r.d.dispatch()
    assert r.running() == [{"old1.ogg": "old2.ogg", "old2.ogg": "old1.ogg"}[first[0]]]
    assert os.listdir(r.spool.inbox) == ["new.ogg"]


def test_a_claim_at_max_attempts_goes_to_failed_without_a_free_place(rig_factory) -> None:
    r = rig_factory(1)
    r.drop("busy.ogg")
    r.d.dispatch()
    assert r.running() == ["busy.ogg"]  # the only place is taken
    r.stale_claim("poison.ogg", attempt=3)
    r.stale_claim("waits.ogg", attempt=1)
    tk.wait_for(lambda: False, LEASE + 0.1)
    r.d.recovery_due = True  # the recovery timer
    r.d.dispatch()
    failed = [n for n in os.listdir(r.spool.failed) if n.endswith(".report.json")]
    assert len(failed) == 1 and "poison.ogg" in failed[0]
    report = json.loads((r.spool.failed / failed[0]).read_bytes())
    assert "3 attempts" in report["error"]
    assert r.running() == ["busy.ogg"]
    assert [n for n in os.listdir(r.spool.processing) if n.startswith("waits.ogg__ghost_")], \
        "a claim below MAX_ATTEMPTS must wait for room, not be taken"


def progress(r: Rig, name: str) -> None:
    """What the pipeline reports when a chunk of ``name`` reaches a slot."""
    job = next(j for j in r.d.active() if j.claim.original_name == name)
    r.d.progress(job, Progress("started", 1, 0))


def test_auto_keeps_one_file_ready_per_slot_and_admits_more_as_chunks_reach_slots(rig_factory) -> None:
    r = rig_factory("auto", workers=2)
    names = [f"s{i:02d}.ogg" for i in range(12)]
    r.drop(*names)
    r.d.dispatch()
    assert len(r.d.active()) == 2, "two jobs still decoding are two files waiting: enough for two slots"
    for name in r.running():
        progress(r, name)  # both on a slot now: nothing waits
    r.d.dispatch()
    assert len(r.d.active()) == 4
    for name in r.running():
        progress(r, name)
    r.d.dispatch()
    r.d.dispatch()
    assert len(r.d.active()) <= r.d.limit() == 8, "auto has an upper bound"


def test_auto_counts_a_long_file_once_so_short_files_are_admitted_beside_it(rig_factory) -> None:
    r = rig_factory("auto", workers=2)
    r.drop("long.wav")
    r.d.dispatch()
    progress(r, "long.wav")
    r.pool.queue[r.d.active()[0].claim.job_id] = 40  # 40 chunks queued
    r.drop("short1.ogg", "short2.ogg", "short3.ogg")
    r.d.scan_due = True
    r.d.dispatch()
    assert r.running() == ["long.wav", "short1.ogg"], "the long file holds one place, not forty"
    progress(r, "short1.ogg")  # its one chunk reached a slot: the next short file may come
    r.d.dispatch()
    assert r.running() == ["long.wav", "short1.ogg", "short2.ogg"]


def test_an_explicit_cap_ignores_the_queue(rig_factory) -> None:
    r = rig_factory(3, workers=1)
    r.drop("a.ogg", "b.ogg", "c.ogg", "d.ogg")
    r.d.dispatch()
    assert len(r.d.active()) == 3  # SMAP's MAX_CONCURRENT_JOBS=3: three at once, whatever waits


def test_a_crashed_job_frees_its_place_and_leaves_its_claim_for_recovery(rig_factory) -> None:
    r = rig_factory(1)

    def crash(job: ActiveJob) -> str:
        raise RuntimeError("boom")

    r.d.run_job = crash
    r.drop("x.ogg")
    r.d.dispatch()
    assert tk.wait_for(lambda: not r.d.active(), 5)
    assert [n for n in os.listdir(r.spool.processing) if n.startswith("x.ogg__solo_")]
    tk.wait_for(lambda: False, LEASE + 0.1)
    r.d.run_job = r.jobs
    r.d.recovery_due = True
    r.d.dispatch()  # abandoned: recovered once its lease ran out, as the next attempt
    assert r.running() == ["x.ogg"] and r.d.active()[0].claim.attempt == 2


def test_lease_refresh_keeps_claims_fresh_and_a_lost_claim_is_cancelled(rig_factory) -> None:
    r = rig_factory(2)
    r.drop("kept.ogg", "lost.ogg")
    r.d.dispatch()
    stop = threading.Event()

    def refresh() -> None:  # what the scheduler's lease job does, every lease/3
        while not stop.wait(LEASE / 3):
            r.d.refresh_leases()

    refresher = threading.Thread(target=refresh, name="test-leases")
    refresher.start()
    try:
        assert stale_seen_by_another_process(r.spool.root) == 0
    finally:
        stop.set()
        refresher.join(5)
    tk.wait_for(lambda: False, LEASE + 0.1)  # the control: without refreshes the leases run out
    assert stale_seen_by_another_process(r.spool.root) == 2
    lost = next(j for j in r.d.active() if j.claim.original_name == "lost.ogg")
    lost.claim.path.rename(r.spool.processing / "taken-over")  # another node renamed it away
    r.d.refresh_leases()
    assert lost.lost.is_set() and lost.claim.job_id in r.pool.cancelled


def stale_seen_by_another_process(root: Path) -> int:
    """How many claims another node (another process: this one's own claims are hidden from it) sees stale."""
    code = f"from smapd.spool import Spool; print(len(Spool({str(root)!r}, 'other', lease_seconds={LEASE}).recoverable()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                         env=dict(os.environ, PYTHONPATH=str(tk.REPO)))
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_shutdown_hands_unfinished_claims_back_under_their_names(rig_factory) -> None:
    r = rig_factory(2)
    r.drop("slow.ogg", "quick.ogg")
    r.d.dispatch()
    r.jobs.end("quick.ogg")
    left = r.d.wait_idle(time.monotonic() + 0.5, lambda: False)
    assert [j.claim.original_name for j in left] == ["slow.ogg"]
    r.drop("too-late.ogg")
    r.d.scan_due = True
    r.d.dispatch()
    assert "too-late.ogg" in os.listdir(r.spool.inbox), "no new claims while stopping"
    r.d.cancel(left)
    r.d.hand_back(left, 5.0, lambda: False)
    assert sorted(os.listdir(r.spool.inbox)) == ["slow.ogg", "too-late.ogg"]
    assert not os.listdir(r.spool.processing)
    assert r.d.completed == 1


def test_the_waker_wakes_a_sleeper_and_consumes_its_wake_ups() -> None:
    w = Waker()
    try:
        assert not w.wait(0.01)
        for _ in range(100_000):  # far more than the pipe holds: set never blocks
            w.set()
        assert w.wait(1.0) and not w.wait(0.01)
        threading.Timer(0.05, w.set).start()
        t0 = time.monotonic()
        assert w.wait(5.0) and time.monotonic() - t0 < 2
    finally:
        w.close()
