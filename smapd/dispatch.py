"""Which claims run, decided on one thread: stale claims before new files, jobs admitted by capacity.

The daemon's main loop is the only caller of ``Dispatcher.dispatch``; job threads only run a job and
wake the main loop when it ends. Nothing else starts a job, so the count of jobs in flight cannot
pass the limit between a check and a start (issue 9, defect 3: recovery also ran on the scheduler
thread, and two threads could both see the last free place).

Admission. ``MAX_CONCURRENT_JOBS=<n>`` is SMAP's hard cap: at most n jobs. ``auto`` (the default,
issue 8) starts another job while fewer jobs are *waiting* for an engine slot than the pool has
slots, up to ``AUTO_JOBS_PER_WORKER`` jobs per slot. A job waits while it decodes and chunks its
file (no chunk has reached a slot yet) or while it has chunks queued in the pool. Each waiting job
counts once however many chunks it has queued: a long file holds one place, so short files keep
being admitted beside it and the pool's round-robin gives them their turns (they never wait for the
long one to finish), while a stream of one-chunk files keeps a file ready for every slot that frees.
Claiming no more than that leaves the rest of inbox/ to other nodes.
"""
from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Literal, Protocol

from loguru import logger

from smapd.errors import ClaimLost, SmapdError
from smapd.helping import Helper
from smapd.pipeline import Progress
from smapd.spool import Claim, Spool

AUTO_JOBS_PER_WORKER = 4  # auto's upper bound: running + waiting + finishing (publishing) jobs per slot

MaxJobs = Literal["auto"] | int


class PoolView(Protocol):
    """What admission reads from the engine pool (smapd.pool.Pool has it)."""

    workers: int

    def queued(self) -> dict[str, int]: ...

    def busy(self) -> int: ...

    def cancel_job(self, job: str) -> None: ...


@dataclass
class ActiveJob:
    """One claim in flight on this node, as the daemon tracks it."""

    claim: Claim
    future: Future | None = None
    started: float = field(default_factory=time.monotonic)
    chunks_total: int = 0
    chunks_done: int = 0
    on_slot: bool = False  # a chunk of it has reached an engine slot (it no longer waits to start)
    lost: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    outcome: str | None = None  # the runner's, once the job thread is done with it
    audio_total: float = 0.0  # the file's audio seconds, once decoded
    audio_done: float = 0.0  # audio seconds of the chunks finished so far
    audio_resumed: float = 0.0  # of which taken from checkpoints (issue 10)
    progressed: float = field(default_factory=time.monotonic)  # when it last moved (stall flag)
    first_slot: float | None = None  # when its first chunk reached a slot (for the speed and ETA)

    def eta_seconds(self) -> float | None:
        """Seconds left at the speed measured so far, or None before the first chunk finished."""
        made = self.audio_done - self.audio_resumed
        if self.first_slot is None or made <= 0 or not self.audio_total:
            return None
        speed = made / max(1e-3, time.monotonic() - self.first_slot)
        return max(0.0, (self.audio_total - self.audio_done) / speed)


class Waker:
    """What the main loop sleeps on: a non-blocking pipe that any thread, and the C-level signal
    handler (``signal.set_wakeup_fd``), can write to without a lock. A ``threading.Event`` set from a
    Python signal handler can deadlock on the Event's own lock if the signal lands inside ``wait``."""

    def __init__(self) -> None:
        self._r, self.fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        try:
            os.write(self.fd, b"\0")
        except BlockingIOError:  # the pipe is full: a wake-up is pending anyway
            pass

    def wait(self, timeout: float) -> bool:
        """Sleep until ``set`` or ``timeout`` seconds; consumes the wake-ups. True if woken."""
        ready, _, _ = select.select([self._r], [], [], max(0.0, timeout))
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        return bool(ready)

    def close(self) -> None:
        for fd in (self._r, self.fd):
            os.close(fd)


RunJob = Callable[[ActiveJob], str]  # runs one job to its end in a job thread; returns the runner's outcome


class Dispatcher:
    """The node's jobs: recovery, intake and admission (main thread), lease refresh (any thread).

    Args:
        spool: This node's spool.
        pool: The engine pool (its slot count and queue, for ``auto``).
        run_job: Runs a job to its end; called in a thread of ``executor``.
        executor: Where job threads run.
        max_jobs: MAX_CONCURRENT_JOBS: ``auto`` or a hard cap.
        wake: Set whenever something the main loop should look at happened (a job ended, a chunk
            reached a slot).
    """

    def __init__(self, spool: Spool, pool: PoolView, run_job: RunJob, executor: Executor, max_jobs: MaxJobs,
                 wake: Waker, helper: Helper | None = None) -> None:
        self.spool, self.pool, self.run_job, self.executor = spool, pool, run_job, executor
        self.max_jobs: MaxJobs = max_jobs
        self.wake = wake
        self.helper = helper  # issue 10: idle slots make other nodes' offered chunks
        self.jobs: dict[str, ActiveJob] = {}
        self.lock = threading.Lock()  # guards ``jobs``: job threads remove themselves
        self.stopping = False
        self.completed = self.failed = 0
        self.takeovers = 0  # stale claims of other nodes (or of our previous life) taken over
        self.recovery_due = True  # set by the recovery timer; the first pass runs at start
        self.scan_due = True  # set by watcher hints and the rescan timer
        self.settle_at: float | None = None  # when the files still settling should be looked at again
        self._recovery_backlog = False  # recoverable claims were left for lack of room: they go first
        self._files_waiting = False  # the last scan left ready files unclaimed for lack of room

    # --- admission ---------------------------------------------------------------------------------

    def limit(self) -> int:
        """The most jobs this node may hold now."""
        return self.max_jobs if isinstance(self.max_jobs, int) else AUTO_JOBS_PER_WORKER * self.pool.workers

    def has_room(self) -> bool:
        """Whether one more job may start now (see the module docstring)."""
        with self.lock:
            jobs = list(self.jobs.values())
        if len(jobs) >= self.limit():
            return False
        if isinstance(self.max_jobs, int):
            return True
        queued = self.pool.queued()
        waiting = sum(1 for j in jobs if not j.on_slot or queued.get(j.claim.job_id))
        return waiting < self.pool.workers

    # --- one turn of the main loop -----------------------------------------------------------------

    def dispatch(self) -> None:
        """Recover stale claims, then look at inbox/ and claim what there is room for.

        inbox/ is listed only when something asked for it: a watcher hint, the rescan timer, the
        settle follow-up, or room for a file the last scan had to leave (issue 9, defect 1).
        """
        if self.stopping:
            return
        if self.recovery_due or (self._recovery_backlog and self.has_room()):
            self.recovery_due = False  # before the pass: a timer tick during it asks for another one
            self.recover()
        now = time.monotonic()
        settle = self.settle_at is not None and now >= self.settle_at
        if self.scan_due or settle or (self._files_waiting and self.has_room()):
            self.scan_due, self.settle_at = False, None  # a failed scan waits for the next hint or rescan
            self.claim_ready(now)
        if self.helper is not None and not self._files_waiting and not self._recovery_backlog:
            with self.lock:
                mine = set(self.jobs)
            self.helper.help(self.pool.workers - self.pool.busy() - sum(self.pool.queued().values()), mine)

    def recover(self) -> None:
        """Take over stale claims (and this node's dead ones) while there is room; a claim at
        MAX_ATTEMPTS goes to failed/ without needing any. A recovered claim is never handed back
        (its attempt counts), so only as many are taken as can start now."""
        with self.lock:
            mine = {j.claim.path.name for j in self.jobs.values()}
        backlog = False
        for claim in self.spool.recoverable():
            if self.stopping:
                return
            if claim.path.name in mine:
                continue
            if claim.attempt < self.spool.max_attempts and not self.has_room():
                backlog = True  # later ones may still be at MAX_ATTEMPTS: look at them too
                continue
            recovered = self.spool.recover(claim)
            if recovered is None:
                continue
            if self.spool.finish_published(recovered):  # published before a crash: just archive it
                logger.info("{}: was published before its node died; archived", recovered.original_name)
                continue
            self.takeovers += 1
            logger.warning("{}: took over the claim of node {} pid {} (attempt {})", recovered.original_name,
                           claim.node, claim.pid, recovered.attempt)
            self.start(recovered)
        self._recovery_backlog = backlog

    def claim_ready(self, now: float) -> None:
        """List inbox/ once: refuse what must be refused, claim ready files while there is room."""
        result = self.spool.scan()
        for name in result.refuse:
            self.spool.refuse(name)
        self.settle_at = now + self.spool.settle_seconds if result.waiting else None
        left = False
        for name in result.ready:
            if self.stopping or self._recovery_backlog or not self.has_room():
                left = True
                break
            claim = self.spool.claim(name)
            if claim is not None:
                self.start(claim)
        self._files_waiting = left

    # --- jobs --------------------------------------------------------------------------------------

    def start(self, claim: Claim) -> ActiveJob:
        """Run ``claim`` in a job thread (main thread only)."""
        job = ActiveJob(claim)
        with self.lock:
            self.jobs[claim.job_id] = job
        job.future = self.executor.submit(self._run, job)
        return job

    def progress(self, job: ActiveJob, p: Progress) -> None:
        """The pipeline's progress callback for ``job`` (job thread)."""
        job.chunks_total, job.chunks_done = p.total, p.done
        job.audio_total = p.duration or job.audio_total
        job.progressed = time.monotonic()
        if p.kind == "planned" and p.resumed:
            job.audio_resumed = p.resumed  # from checkpoints: done, but not at this attempt's speed
            job.audio_done = max(job.audio_done, p.resumed)
        if p.kind == "finished" and p.chunk is not None:
            job.audio_done = min(job.audio_total or float("inf"), job.audio_done + p.chunk.duration)
        if p.kind == "started":
            job.on_slot = True
            if job.first_slot is None:
                job.first_slot = job.progressed
            self.wake.set()  # a chunk left the queue: maybe room for the next file

    def _run(self, job: ActiveJob) -> None:
        claim = job.claim
        try:
            outcome = job.outcome = self.run_job(job)
            if outcome == "done":
                self.completed += 1
            elif outcome == "failed":
                self.failed += 1
        except (OSError, SmapdError) as e:  # disk full, unwritable outbox, ...: retried as the next attempt
            self.spool.abandon(claim)
            logger.error("{}: job {} could not finish: {}; its claim stays in processing/ and is retried when "
                         "its lease runs out (attempt {} of {})", claim.original_name, claim.job_id, e,
                         claim.attempt, self.spool.max_attempts)
        except Exception as e:  # noqa: BLE001 - the job boundary: log, leave the claim for recovery
            self.spool.abandon(claim)
            logger.opt(exception=e).error("{}: job {} crashed: {}; its claim stays for recovery",
                                          claim.original_name, claim.job_id, e)
        finally:
            with self.lock:
                self.jobs.pop(claim.job_id, None)
            self.wake.set()

    def active(self) -> list[ActiveJob]:
        with self.lock:
            return list(self.jobs.values())

    def refresh_leases(self) -> None:
        """Keep every claim in flight fresh, and the chunks this node makes for others; a claim another
        node took over is cancelled (any thread)."""
        if self.helper is not None:
            self.helper.refresh()
        for job in self.active():
            try:
                self.spool.heartbeat(job.claim)
            except ClaimLost:
                if not job.lost.is_set():
                    logger.warning("{}: our claim was taken over by another node; we will publish nothing",
                                   job.claim.original_name)
                job.lost.set()
                self.pool.cancel_job(job.claim.job_id)

    # --- shutdown ----------------------------------------------------------------------------------

    def wait_idle(self, deadline: float, interrupted: Callable[[], bool]) -> list[ActiveJob]:
        """Wait until every job ended, ``deadline`` (monotonic) passed or ``interrupted()``.

        Returns:
            The jobs still in flight.
        """
        self.stopping = True
        while True:
            left = self.active()
            if not left or interrupted() or time.monotonic() >= deadline:
                return left
            self.wake.wait(min(0.2, deadline - time.monotonic()))

    def cancel(self, jobs: list[ActiveJob]) -> None:
        """Tell ``jobs`` to publish nothing and drop their queued chunks."""
        for job in jobs:
            job.cancelled.set()
            self.pool.cancel_job(job.claim.job_id)

    def hand_back(self, jobs: list[ActiveJob], timeout: float, interrupted: Callable[[], bool]) -> None:
        """Once their chunks are stopped, wait up to ``timeout`` s for ``jobs`` to end (a job still
        decoding is not waited for longer), then put every claim still ours back into inbox/ (the
        attempt does not count)."""
        deadline = time.monotonic() + timeout
        while any(j.future is not None and not j.future.done() for j in jobs) and not interrupted() \
                and time.monotonic() < deadline:
            self.wake.wait(min(0.2, deadline - time.monotonic()))
        for job in jobs:
            if job.lost.is_set() or job.outcome not in (None, "cancelled"):  # taken over, or it finished
                continue
            try:
                self.spool.release(job.claim)
                logger.info("{}: handed back to inbox/ (not finished within the grace)", job.claim.original_name)
            except (OSError, SmapdError) as e:
                logger.warning("{}: could not hand back ({}); it will be recovered", job.claim.original_name, e)
