"""``smapd run``: the shell around the spool. Signals, sdnotify, APScheduler jobs, loguru setup.

startup (model loaded, own dead claims recovered, first scan) -> READY=1 -> main loop -> shutdown.
The main loop waits on an Event with a timeout; watcher events and the periodic rescan only set
that Event (the rescan is the truth, events are hints for latency). Signal handlers set flags.
The systemd watchdog ping comes from the main loop, and only while the engine pool makes
progress: a wedged pool stops the pings and systemd restarts us.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from loguru import logger

from smapd import runner
from smapd.errors import ClaimLost, ConfigError, SmapdError
from smapd.logs import setup_logging
from smapd.pipeline import Progress
from smapd.settings import RESTART_REQUIRED, Settings, load_settings
from smapd.spool import Claim, Spool
from smapd.watcher import InboxWatcher


class Notifier:
    """sd_notify(3) messages; silent when not under systemd (no NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        import sdnotify

        self._n = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec and usec.isdigit() else None

    def __call__(self, message: str) -> None:
        if self._n is not None:
            self._n.notify(message)


@dataclass
class ActiveJob:
    claim: Claim
    future: Future | None = None
    started: float = field(default_factory=time.monotonic)
    chunks_total: int = 0
    chunks_done: int = 0
    lost: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notify = Notifier()
        self.wake = threading.Event()
        self.stop_requested = 0  # signals received
        self.reload_requested = False
        self.jobs: dict[str, ActiveJob] = {}
        self.lock = threading.Lock()
        self.spool = Spool(settings.spool_dir, settings.node, lease_seconds=settings.lease_seconds,
                           max_attempts=settings.max_attempts, settle_seconds=settings.settle_seconds)
        self.config: runner.JobConfig | None = None
        self.completed = 0
        self.failed = 0

    # --- signals: set flags only ---
    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested += 1
        if self.stop_requested >= 2:
            # Second signal: exit now; our claims stay in processing/ for lease recovery.
            self._hard_exit()
        self.wake.set()

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload_requested = True
        self.wake.set()

    def _hard_exit(self) -> None:
        pool = getattr(self, "pool", None)
        for slot in getattr(pool, "slots", []):
            try:
                slot.terminate()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(1)

    # --- startup ---
    def run(self) -> int:
        s = self.settings
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            self.spool.ensure_layout()
        except OSError as e:
            raise ConfigError(f"cannot prepare the spool {s.spool_dir}: {e.strerror or e}") from e
        self.config = runner.JobConfig.from_settings(s)
        c = self.config
        self.spool.profiles = c.profiles.names  # profiles (issue 11): inbox/<profile>/ drop folders
        self.spool.ensure_layout()
        logger.info("smapd {} node {} on spool {}: engine {}, model {}, {} workers x {} threads ({}), "
                    "MAX_CONCURRENT_JOBS={}, CHUNK_TIMEOUT={:g}s", __import__("smapd").__version__, s.node,
                    s.spool_dir, c.engine.kind, c.model_label, c.workers, c.engine.cpu_threads, c.plan_reason,
                    s.max_concurrent_jobs, c.chunk_timeout)
        self.pool = c.make_pool()
        self.pool.start()
        self.executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="smapd-job")
        self.spool.repair()  # reports a crash left unwritten in failed/
        self._recover_stale()  # our claims from a previous life: at once, no lease wait
        self.watcher = InboxWatcher(self.spool.inbox, self._hint, mode=s.watch)
        self.watcher.start()
        self.scheduler = self._start_scheduler()
        try:
            self._claim_ready()
            self.notify("READY=1")
            self._set_status()
            logger.info("ready: watching {}", self.spool.inbox)
            self._main_loop()
            self._shutdown()
        finally:
            self.scheduler.shutdown(wait=False)
            self.watcher.stop()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.pool.close()
        logger.info("stopped: {} done, {} failed this run", self.completed, self.failed)
        if any(j.future is not None and not j.future.done() for j in self.jobs.values()):
            # A job thread stuck where it cannot be interrupted (decoding a huge file): its claim is
            # already handed back, and waiting for it would only make systemd kill us anyway.
            logger.warning("a job thread is still busy; exiting without it")
            os._exit(0)
        return 0

    def _start_scheduler(self) -> Any:
        from apscheduler.schedulers.background import BackgroundScheduler

        s = self.settings
        sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        sched.add_job(self._guard(self.wake.set), "interval", seconds=s.rescan_seconds, id="rescan")
        sched.add_job(self._guard(self._refresh_leases), "interval", seconds=max(1.0, s.lease_seconds / 3),
                      id="leases")
        sched.add_job(self._guard(self._recover_stale), "interval", seconds=max(1.0, s.lease_seconds / 4),
                      id="recover")
        sched.add_job(self._guard(self._publish_heartbeat), "interval", seconds=min(5.0, s.rescan_seconds),
                      id="heartbeat")
        sched.add_job(self._guard(lambda: self.spool.prune_archive(self.settings.archive_retention_days)),
                      "interval", hours=1, id="prune")
        sched.start()
        return sched

    @staticmethod
    def _guard(fn: Any) -> Any:
        """A scheduled job logs its failures and never takes the daemon down."""
        def run() -> None:
            try:
                fn()
            except OSError as e:  # disk full, NFS hiccup: one line, it is retried on the next tick
                logger.error("scheduled job {} failed: {}", getattr(fn, "__name__", fn), e)
            except Exception as e:  # noqa: BLE001 - the one boundary for scheduled jobs
                logger.opt(exception=e).error("scheduled job {} failed: {}", getattr(fn, "__name__", fn), e)
        run.__name__ = getattr(fn, "__name__", "job")
        return run

    def _hint(self, name: str, ready: bool) -> None:
        if ready:
            self.spool.mark_ready(name)
        self.wake.set()

    # --- the main loop ---
    def _main_loop(self) -> None:
        last_ping = 0.0
        while not self.stop_requested:
            self.wake.wait(timeout=1.0)
            self.wake.clear()
            if self.stop_requested:
                break
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            try:
                self._recover_stale()  # stale claims first: they have waited longest
                self._claim_ready()
            except OSError as e:
                logger.error("scanning {} failed: {}", self.spool.inbox, e)
            self._set_status()
            stalled = self.pool.stalled_seconds()
            if stalled:
                logger.error("the engine pool is stalled ({:.0f} s past CHUNK_TIMEOUT): no watchdog ping", stalled)
            elif self.notify.watchdog_interval and time.monotonic() - last_ping >= self.notify.watchdog_interval / 2:
                self.notify("WATCHDOG=1")
                last_ping = time.monotonic()

    def _free_slots(self) -> int:
        with self.lock:
            return self.settings.max_concurrent_jobs - len(self.jobs)

    def _claim_ready(self) -> None:
        if self._free_slots() <= 0:
            self.spool.scan()  # keep settle observations and refusals current
            return
        result = self.spool.scan()
        for name in result.refuse:
            self.spool.refuse(name)
        for name in result.ready:
            if self._free_slots() <= 0 or self.stop_requested:
                break
            claim = self.spool.claim(name)
            if claim is not None:
                self._start(claim)

    def _start(self, claim: Claim) -> None:
        job = ActiveJob(claim)
        with self.lock:
            self.jobs[claim.job_id] = job
        job.future = self.executor.submit(self._run_job, job)

    def _run_job(self, job: ActiveJob) -> None:
        assert self.config is not None
        claim = job.claim

        def progress(p: Progress) -> None:
            job.chunks_total, job.chunks_done = p.total, p.done

        try:
            outcome = runner.run_claim(claim, self.spool, self.pool, self.config, node=self.settings.node,
                                       lost=job.lost, cancelled=job.cancelled, on_progress=progress)
            if outcome == "done":
                self.completed += 1
            elif outcome == "failed":
                self.failed += 1
        except (OSError, SmapdError) as e:  # disk full, unwritable outbox, ...: retried as the next attempt
            self.spool.abandon(claim)
            logger.error("{}: job {} could not finish: {}; its claim stays in processing/ and is retried when "
                         "its lease runs out (attempt {} of {})", claim.original_name, claim.job_id, e,
                         claim.attempt, self.settings.max_attempts)
        except Exception as e:  # noqa: BLE001 - the job boundary: log, leave the claim for recovery
            logger.opt(exception=e).error("{}: job {} crashed: {}; its claim stays for recovery",
                                          claim.original_name, claim.job_id, e)
        finally:
            with self.lock:
                self.jobs.pop(claim.job_id, None)
            self.wake.set()

    # --- scheduled jobs ---
    def _refresh_leases(self) -> None:
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            try:
                self.spool.heartbeat(job.claim)
            except ClaimLost:
                if not job.lost.is_set():
                    logger.warning("{}: our claim was taken over by another node; we will publish nothing",
                                   job.claim.original_name)
                job.lost.set()
                self.pool.cancel_job(job.claim.job_id)

    def _recover_stale(self) -> None:
        """Take over stale claims (and our own dead ones), but only as many as we can run now:
        a recovered claim is never handed back, so its attempt count keeps counting."""
        if self.stop_requested:
            return
        with self.lock:
            mine = {j.claim.path.name for j in self.jobs.values()}
        for claim in self.spool.recoverable():
            if claim.path.name in mine:
                continue
            last = claim.attempt >= self.spool.max_attempts  # goes to failed/: needs no job slot
            if not last and self._free_slots() <= 0:
                break
            recovered = self.spool.recover(claim)
            if recovered is None:
                continue
            if self.spool.finish_published(recovered):  # published before a crash: just archive it
                logger.info("{}: was published before its node died; archived", recovered.original_name)
                continue
            logger.warning("{}: took over the claim of node {} pid {} (attempt {})", recovered.original_name,
                           claim.node, claim.pid, recovered.attempt)
            self._start(recovered)

    def _publish_heartbeat(self) -> None:
        self.spool.write_heartbeat(self._status_dict())

    def _status_dict(self) -> dict[str, Any]:
        with self.lock:
            jobs = list(self.jobs.values())
        return {
            "node": self.settings.node, "pid": os.getpid(), "version": __import__("smapd").__version__,
            "workers": self.config.workers if self.config else None, "busy_workers": self.pool.busy(),
            "stopping": bool(self.stop_requested), "completed": self.completed, "failed": self.failed,
            "jobs": [{"job_id": j.claim.job_id, "name": j.claim.original_name, "attempt": j.claim.attempt,
                      "chunks_done": j.chunks_done, "chunks_total": j.chunks_total,
                      "seconds": round(time.monotonic() - j.started, 1)} for j in jobs],
        }

    def _set_status(self) -> None:
        with self.lock:
            jobs = list(self.jobs.values())
        waiting = self.spool.waiting_count()
        if jobs:
            j = max(jobs, key=lambda x: x.started)
            line = (f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}, chunk {j.chunks_done}/{j.chunks_total} of "
                    f"{j.claim.original_name}, {waiting} waiting")
        else:
            line = f"idle, {waiting} waiting, {self.completed} done, {self.failed} failed"
        if line != getattr(self, "_last_status", None):
            self.notify(f"STATUS={line}")
            self._last_status = line

    # --- reload and shutdown ---
    def _reload(self) -> None:
        self.notify("RELOADING=1")
        try:
            new = load_settings()
        except ConfigError as e:
            logger.error("reload: {}; keeping the running configuration", e)
            self.notify("READY=1")
            return
        changed = [k for k in Settings.model_fields if getattr(new, k) != getattr(self.settings, k)]
        later = [k for k in changed if k in RESTART_REQUIRED]
        for k in later:
            logger.warning("reload: {} changed but needs a restart to take effect", k)
        now = {k: getattr(new, k) for k in changed if k not in RESTART_REQUIRED}
        if now:
            self.settings = self.settings.model_copy(update=now)
            assert self.config is not None
            self.config = replace(self.config, **runner.reloadable(self.settings))  # model stays loaded
            self.pool.chunk_timeout = self.config.chunk_timeout
            self.pool.retries = self.config.chunk_retries
            self.spool.lease_seconds = self.settings.lease_seconds
            self.spool.max_attempts = self.settings.max_attempts
            self.spool.settle_seconds = self.settings.settle_seconds
            setup_logging(self.settings.log_level, self.settings.log_format, timestamps=not _journald())
        try:  # profiles (issue 11): SIGHUP re-reads the profiles file too
            assert self.config is not None
            self.config = runner.with_profiles(self.config, new)
            self.spool.profiles = self.config.profiles.names
            self.spool.ensure_layout()
            logger.info("reload: profiles {}", ", ".join(self.config.profiles.names) or "(none)")
        except (ConfigError, OSError) as e:
            logger.error("reload: {}; keeping the running profiles", e)
        logger.info("reloaded configuration: {}", ", ".join(f"{k}={v}" for k, v in now.items()) or "no change")
        self.notify("READY=1")

    def _shutdown(self) -> None:
        grace = self.settings.shutdown_grace_seconds
        self.notify("STOPPING=1")
        with self.lock:
            jobs = list(self.jobs.values())
        logger.info("stopping: no new claims; waiting up to {:g} s for {} job(s)", grace, len(jobs))
        deadline = time.monotonic() + grace
        for job in jobs:
            if job.future is not None:
                try:
                    job.future.result(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - timeouts and job errors alike: handled below
                    pass
        with self.lock:
            left = list(self.jobs.values())
        for job in left:
            job.cancelled.set()
            self.pool.cancel_job(job.claim.job_id)
        self.pool.close()  # running chunks are killed now (never retried); their jobs see `cancelled`
        for job in left:
            if job.future is not None:
                try:
                    job.future.result(timeout=10)
                except Exception:  # noqa: BLE001 - a job still decoding: its claim is handed back below
                    pass
        for job in left:
            if not job.lost.is_set():
                try:
                    self.spool.release(job.claim)
                    logger.info("{}: handed back to inbox/ (not finished within the grace)", job.claim.original_name)
                except (OSError, SmapdError) as e:
                    logger.warning("{}: could not hand back ({}); it will be recovered", job.claim.original_name, e)


def _journald() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def run() -> int:
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format, timestamps=not _journald())
    return Daemon(settings).run()
