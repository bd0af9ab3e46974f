"""``smapd run``: the shell around the spool. Signals, sdnotify, APScheduler jobs, loguru setup.

startup (model loaded, own dead claims recovered, first scan) -> READY=1 -> main loop -> shutdown.

The main thread alone recovers and claims (``smapd.dispatch``). It waits on one Event with a
timeout; watcher hints, the timers, job ends and signals set a flag and that Event. APScheduler's
thread only runs timers that set flags (rescan, recovery) and I/O that starts no job (lease refresh,
node heartbeat, archive pruning); SIGHUP reschedules them when their interval changes. Signal
handlers set flags, nothing else: the main thread does the exit, also on a second signal. The
systemd watchdog ping comes from the main loop, and only while the engine pool makes progress: a
wedged pool stops the pings and systemd restarts us.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from loguru import logger

from smapd import __version__, runner
from smapd.dispatch import ActiveJob, Dispatcher, Waker
from smapd.errors import ConfigError
from smapd.helping import Helper
from smapd.jobevents import JobEvents
from smapd.logs import setup_logging
from smapd.pool import Pool
from smapd.settings import RESTART_REQUIRED, Settings, load_settings
from smapd.spool import Spool
from smapd.status import progress_text
from smapd.watcher import InboxWatcher

EXIT_HARD_STOP = 1  # a second signal: claims left in processing/ for lease recovery


class Notifier:
    """sd_notify(3) messages; silent when not under systemd (no NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        import sdnotify

        self._n = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec and usec.isdigit() else None
        self._status: str | None = None

    def __call__(self, message: str) -> None:
        if self._n is not None:
            self._n.notify(message)

    def status(self, line: str) -> None:
        """STATUS=, only when it changed."""
        if line != self._status:
            self(f"STATUS={line}")
            self._status = line


def intervals(s: Settings) -> dict[str, float]:
    """Seconds between runs of each scheduled job; SIGHUP reschedules the ones that change."""
    return {
        "rescan": s.rescan_seconds,
        "leases": max(0.25, s.lease_seconds / 3),  # three chances to refresh before a lease runs out
        "recover": max(0.25, s.lease_seconds / 4),
        "heartbeat": min(5.0, s.rescan_seconds),
        "prune": 3600.0,
        "hooks": min(30.0, s.lease_seconds),  # hooks a dead node owed (found once its heartbeat is a lease old)
        "metrics": s.metrics_seconds,
    }


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notify = Notifier()
        self.wake = Waker()
        self.stops = 0  # SIGTERM/SIGINT received
        self.reload_requested = False
        self.spool = Spool(settings.spool_dir, settings.node, lease_seconds=settings.lease_seconds,
                           max_attempts=settings.max_attempts, settle_seconds=settings.settle_seconds)

    # --- signals: set flags only -------------------------------------------------------------------

    # The main loop wakes at once anyway: signal.set_wakeup_fd writes to the Waker's pipe.
    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stops += 1

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload_requested = True

    # --- the three phases ----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve the spool until a signal; returns the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.set_wakeup_fd(self.wake.fd, warn_on_full_buffer=False)
        self._prepare()
        try:
            self._startup()
            if not self.stops:
                self.notify("READY=1")
                logger.info("ready: watching {}", self.spool.inbox)
                self._main_loop()
            code = self._shutdown()
        finally:
            self._teardown()
        d = self.dispatch
        logger.info("stopped: {} done, {} failed this run", d.completed, d.failed)
        if any(j.future is not None and not j.future.done() for j in d.jobs.values()):
            # A job thread stuck where it cannot be interrupted (decoding a huge file): its claim is
            # already handed back or left for recovery; waiting would only make systemd kill us anyway.
            logger.warning("a job thread is still busy; exiting without it")
            os._exit(code)
        return code

    def _prepare(self) -> None:
        """Check the spool and the configuration, build the pool and the dispatcher (no process yet)."""
        s = self.settings
        try:
            self.spool.ensure_layout()
        except OSError as e:
            raise ConfigError(f"cannot prepare the spool {s.spool_dir}: {e.strerror or e}") from e
        self.config = c = runner.JobConfig.from_settings(s)
        self.spool.profiles = c.profiles.names  # profiles (issue 11): inbox/<profile>/ drop folders
        self.spool.ensure_layout()
        logger.info("smapd {} node {} on spool {}: engine {}, model {}, {} workers x {} threads ({}), "
                    "MAX_CONCURRENT_JOBS={}, CHUNK_TIMEOUT={:g}s", __version__, s.node, s.spool_dir,
                    c.engine.kind, c.model_label, c.workers, c.engine.cpu_threads, c.plan_reason,
                    s.max_concurrent_jobs, c.chunk_timeout)
        self.executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="smapd-job")
        self.pool: Pool = c.make_pool()
        self.helper = Helper(self.spool, self.pool, c.model_label, self.executor, self.wake.set) \
            if s.share_chunks and s.checkpoints else None  # issue 10: idle slots make other nodes' offered chunks
        self.dispatch = Dispatcher(self.spool, self.pool, self._run_job, self.executor, s.max_concurrent_jobs,
                                   self.wake, self.helper)
        self.events = JobEvents(s, self.spool)  # the completion hook and the metrics file (issue 11)
        self.watcher: InboxWatcher | None = None
        self.scheduler: Any = None

    def _startup(self) -> None:
        """Load the model in the workers, repair and recover the spool, start watching, first scan."""
        self.pool.start(wait=False)
        booted = self.executor.submit(self.pool.wait_ready)
        while not booted.done():  # a signal during a long model load is heard at once
            if self.stops:
                return
            self.wake.wait(0.2)
        booted.result()  # ConfigError: the model does not load
        self.spool.repair()  # reports a crash left unwritten in failed/
        self._publish_heartbeat()  # other nodes see this one (and may offer it chunks) from the start
        self.watcher = InboxWatcher(self.spool.inbox, self._hint, mode=self.settings.watch)
        self.watcher.start()
        self.scheduler = self._start_scheduler()
        self.dispatch.dispatch()  # our claims from a previous life (at once, no lease wait), then inbox/
        self._set_status()

    def _main_loop(self) -> None:
        last_ping = 0.0
        while not self.stops:
            self.wake.wait(self._timeout())
            if self.stops:
                break
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            try:
                self.dispatch.dispatch()
            except OSError as e:  # NFS hiccup, disk full: one line; the next turn tries again
                logger.error("recovering or claiming in {} failed: {}", self.spool.root, e)
            self._set_status()
            stalled = self.pool.stalled_seconds()
            if stalled:
                logger.error("the engine pool is stalled ({:.0f} s past CHUNK_TIMEOUT): no watchdog ping", stalled)
            elif self.notify.watchdog_interval and time.monotonic() - last_ping >= self.notify.watchdog_interval / 2:
                self.notify("WATCHDOG=1")
                last_ping = time.monotonic()

    def _timeout(self) -> float:
        """Sleep until the next settle follow-up, at most 1 s (the watchdog and status tick)."""
        at = self.dispatch.settle_at
        return 1.0 if at is None else min(1.0, max(0.0, at - time.monotonic()))

    def _shutdown(self) -> int:
        """First signal: no new claims, jobs get SHUTDOWN_GRACE_SECONDS, the rest is handed back.
        A second signal: kill the workers now and leave the claims for lease recovery."""
        grace = self.settings.shutdown_grace_seconds
        self.notify("STOPPING=1")
        d = self.dispatch
        d.stopping = True
        if self.helper is not None:
            self.helper.stop()
        logger.info("stopping: no new claims; waiting up to {:g} s for {} job(s)", grace, len(d.active()))
        left = d.wait_idle(time.monotonic() + grace, lambda: self.stops >= 2)
        d.cancel(left)
        self.pool.close()  # running chunks are killed now (never retried); their jobs see `cancelled`
        if self.stops >= 2:
            logger.warning("second signal: stopped at once; {} claim(s) left in processing/ for recovery",
                           len(d.active()))
            return EXIT_HARD_STOP
        d.hand_back(left, 10.0, lambda: self.stops >= 2)
        return 0

    def _teardown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.watcher is not None:
            self.watcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()
        self.events.close()
        signal.set_wakeup_fd(-1)

    # --- what the threads hand to the main loop ------------------------------------------------------

    def _hint(self, name: str, ready: bool) -> None:
        """Watcher thread: a close-write or move marks the file ready; any event asks for a scan."""
        if ready:
            self.spool.mark_ready(name)
        self.dispatch.scan_due = True
        self.wake.set()

    def _run_job(self, job: ActiveJob) -> str:
        self.events.claimed(job.claim)
        return runner.run_claim(job.claim, self.spool, self.pool, self.config, node=self.settings.node,
                                lost=job.lost, cancelled=job.cancelled,
                                on_progress=lambda p: self.dispatch.progress(job, p),
                                on_finished=lambda path, report: self.events.finished(job.claim, path, report))

    def _start_scheduler(self) -> Any:
        from apscheduler.schedulers.background import BackgroundScheduler

        sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30})
        jobs: dict[str, Callable[[], object]] = {
            "rescan": lambda: self._due("scan_due"), "recover": lambda: self._due("recovery_due"),
            "leases": self.dispatch.refresh_leases, "heartbeat": self._publish_heartbeat,
            "prune": lambda: self.spool.prune_archive(self.settings.archive_retention_days),
            "hooks": self.events.sweep, "metrics": self._write_metrics}
        for name, seconds in intervals(self.settings).items():
            if name == "hooks" and self.events.hooks is None or name == "metrics" and not self.settings.metrics_file:
                continue
            sched.add_job(_guard(name, jobs[name]), "interval", seconds=seconds, id=name)
        sched.start()
        return sched

    def _due(self, flag: str) -> None:
        setattr(self.dispatch, flag, True)
        self.wake.set()

    def _jobs(self) -> list[dict[str, Any]]:
        """Each job in flight, JSON-ready, with its progress in audio time (heartbeat, metrics)."""
        now, stall = time.monotonic(), self.config.chunk_timeout
        return [{"job_id": j.claim.job_id, "name": j.claim.original_name, "profile": j.claim.profile,
                 "attempt": j.claim.attempt, "chunks_done": j.chunks_done, "chunks_total": j.chunks_total,
                 "audio_done": round(j.audio_done, 1), "audio_total": round(j.audio_total, 1),
                 "eta": None if (eta := j.eta_seconds()) is None else round(eta),
                 "stalled": now - j.progressed > stall, "seconds": round(now - j.started, 1)}
                for j in self.dispatch.active()]

    def _publish_heartbeat(self) -> None:
        d = self.dispatch
        self.spool.write_heartbeat({
            "node": self.settings.node, "pid": os.getpid(), "version": __version__,
            "workers": self.config.workers, "busy_workers": self.pool.busy(), "stopping": bool(self.stops),
            "completed": d.completed, "failed": d.failed, "jobs": self._jobs(),
            "helping": self.helper.active() if self.helper is not None else [],
            "helped": {"chunks": self.helper.made, "audio_seconds": round(self.helper.audio_seconds, 1),
                       "bytes_read": self.helper.bytes_read} if self.helper is not None else None,
        })

    def _write_metrics(self) -> None:
        self.events.write_metrics(self._jobs(), busy=self.pool.busy(), total=self.config.workers,
                                  restarts=self.pool.restarts, timeouts=self.pool.timeouts,
                                  takeovers=self.dispatch.takeovers,
                                  helped=self.helper.made if self.helper is not None else 0)

    def _set_status(self) -> None:
        d = self.dispatch
        jobs = self._jobs()
        waiting = self.spool.waiting_count()
        if jobs:
            j = min(jobs, key=lambda x: x["seconds"])  # the newest job
            self.notify.status(f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}, {progress_text(j)} of "
                               f"{j['name']}, {waiting} waiting")
        else:
            self.notify.status(f"idle, {waiting} waiting, {d.completed} done, {d.failed} failed")

    # --- reload --------------------------------------------------------------------------------------

    def _reload(self) -> None:
        self.notify("RELOADING=1")
        try:
            new = load_settings()
        except ConfigError as e:
            logger.error("reload: {}; keeping the running configuration", e)
            self.notify("READY=1")
            return
        changed = [k for k in Settings.model_fields if getattr(new, k) != getattr(self.settings, k)]
        for k in changed:
            if k in RESTART_REQUIRED:
                logger.warning("reload: {} changed but needs a restart to take effect", k)
        now = {k: getattr(new, k) for k in changed if k not in RESTART_REQUIRED}
        if now:
            before = intervals(self.settings)
            self.settings = s = self.settings.model_copy(update=now)
            self.config = replace(self.config, **runner.reloadable(s))  # the model stays loaded
            self.pool.chunk_timeout = self.config.chunk_timeout
            self.pool.retries = self.config.chunk_retries
            self.spool.lease_seconds, self.spool.max_attempts = s.lease_seconds, s.max_attempts
            self.spool.settle_seconds = s.settle_seconds
            self.dispatch.max_jobs = s.max_concurrent_jobs
            for name, seconds in intervals(s).items():  # a shorter lease needs faster refreshes (defect 2)
                if seconds != before[name] and self.scheduler.get_job(name) is not None:  # hooks, metrics: optional
                    self.scheduler.reschedule_job(name, trigger="interval", seconds=seconds)
            self.dispatch.recovery_due = self.dispatch.scan_due = True
            setup_logging(s.log_level, s.log_format, timestamps=not _journald())
        try:  # profiles (issue 11): SIGHUP re-reads the profiles file too
            self.config = runner.with_profiles(self.config, new)
            self.spool.profiles = self.config.profiles.names
            self.spool.ensure_layout()
            logger.info("reload: profiles {}", ", ".join(self.config.profiles.names) or "(none)")
        except (ConfigError, OSError) as e:
            logger.error("reload: {}; keeping the running profiles", e)
        logger.info("reloaded configuration: {}", ", ".join(f"{k}={v}" for k, v in now.items()) or "no change")
        self.notify("READY=1")


def _guard(name: str, fn: Callable[[], object]) -> Callable[[], None]:
    """A scheduled job logs its failures and never takes the daemon down."""
    def run() -> None:
        try:
            fn()
        except OSError as e:  # disk full, NFS hiccup: one line, it is retried on the next tick
            logger.error("scheduled job {} failed: {}", name, e)
        except Exception as e:  # noqa: BLE001 - the one boundary for scheduled jobs
            logger.opt(exception=e).error("scheduled job {} failed: {}", name, e)
    run.__name__ = name
    return run


def _journald() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def run() -> int:
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format, timestamps=not _journald())
    return Daemon(settings).run()
