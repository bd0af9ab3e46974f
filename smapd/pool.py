"""The bounded engine pool: MAX_PARALLEL_WORKERS slots shared by every job, fair between jobs.

Each slot is stoppable, because a thread cannot be killed and a timeout that only stops waiting
leaves the chunk burning a core (DESIGN.md §4): a ``ProcessSlot`` is a long-lived worker process
holding the model (killed with its process group and replaced on timeout or crash); a
``CommandSlot`` runs an external program per chunk in its own process group. One thread of a
bounded ThreadPoolExecutor drives each slot, pulling tasks from a queue that takes jobs in turn
(round-robin), so a huge file never starves a small one: each job gets every n-th free slot.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
from loguru import logger

from smapd import worker as wire
from smapd.engine import CommandEngine, DecodeOptions, EngineSpec, kill_group
from smapd.errors import ChunkError, ChunkTimeout, ConfigError, WorkerDied
from smapd.models import Chunk, ChunkResult, ChunkStatus

_LOAD_TIMEOUT = 600.0  # loading a large model from a slow disk can take minutes


class Slot(Protocol):
    name: str

    def start(self) -> None: ...

    def run(self, kind: str, payload: dict, timeout: float) -> tuple[Any, dict]: ...

    def kill(self) -> None: ...

    def terminate(self) -> None: ...

    def close(self) -> None: ...


class ProcessSlot:
    """A worker process that loads the engine once and serves chunks until killed."""

    def __init__(self, name: str, spec: EngineSpec) -> None:
        self.name = name
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.chunks_served = 0
        self.rss_mb = 0.0
        self.max_rss_mb = 0.0
        self._rfd = self._wfd = -1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ, SMAPD_WORKER_FDS=f"{to_child_r},{from_child_w}", OMP_NUM_THREADS=str(self.spec.cpu_threads))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smapd.worker"], pass_fds=(to_child_r, from_child_w), env=env,
                stdin=subprocess.DEVNULL, start_new_session=True)  # own process group: killpg reaches all
        except OSError as e:
            os.close(from_child_r)
            os.close(to_child_w)
            raise ConfigError(f"cannot start worker {self.name} ({sys.executable}): {e.strerror}") from e
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._rfd, self._wfd = from_child_r, to_child_w
        self.chunks_served = 0
        deadline = time.monotonic() + _LOAD_TIMEOUT
        try:
            wire.send(self._wfd, self.spec, deadline)
            reply = wire.recv(self._rfd, deadline)
        except (TimeoutError, OSError) as e:
            self.kill()
            raise ConfigError(f"worker {self.name} did not load the model within {_LOAD_TIMEOUT:g} s") from e
        if reply is None:
            code = self.proc.wait()
            self._close_fds()
            raise ConfigError(f"worker {self.name} died while loading the model ({_exit_text(code)})")
        if reply[0] == "error":
            self.kill()
            raise ConfigError(reply[1])

    def run(self, kind: str, payload: dict, timeout: float) -> tuple[Any, dict]:
        """Send one request and wait at most ``timeout`` seconds for the answer.

        Raises:
            ChunkTimeout: the worker was killed at the deadline.
            WorkerDied: the worker exited (crash, OOM kill, signal) before answering.
            ChunkError: the engine reported an error for this chunk (the worker lives on).
        """
        if self.proc is None or self.proc.poll() is not None:
            self.restart()
        deadline = time.monotonic() + timeout
        try:
            wire.send(self._wfd, (kind, payload), deadline)
            reply = wire.recv(self._rfd, deadline)
        except TimeoutError:
            self.kill()
            raise ChunkTimeout(f"no answer within CHUNK_TIMEOUT={timeout:g} s; worker {self.name} killed") from None
        except OSError:  # EPIPE: the worker died before reading the request
            reply = None
        if reply is None:
            assert self.proc is not None
            code = self.proc.wait()
            self._close_fds()
            self.proc = None
            raise WorkerDied(f"worker {self.name} {_exit_text(code)}")
        status, result, stats = reply
        self.chunks_served += 1
        self.rss_mb = stats.get("rss_mb", 0.0)
        self.max_rss_mb = max(self.max_rss_mb, stats.get("max_rss_mb", 0.0))
        if status == "error":
            raise ChunkError(result)
        return result, stats

    def restart(self) -> None:
        self.kill()
        self.start()

    def terminate(self) -> None:
        """SIGKILL the worker's process group from any thread; the slot's own thread sees EOF."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._close_fds()  # EOF tells the worker to exit
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


class CommandSlot:
    """Runs the command engine: one external process per chunk, killed at the timeout."""

    def __init__(self, name: str, spec: EngineSpec) -> None:
        self.name = name
        self.engine = CommandEngine(spec)
        self.pid = None
        self.chunks_served = 0
        self.rss_mb = self.max_rss_mb = 0.0

    def start(self) -> None:
        pass

    def run(self, kind: str, payload: dict, timeout: float) -> tuple[Any, dict]:
        if kind == "detect":
            raise ChunkError("the command engine cannot detect the language")
        t0 = os.times()
        result = self.engine.run(payload["audio"], payload["options"], timeout)
        t1 = os.times()
        self.chunks_served += 1
        return result, {"cpu": (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)}

    def kill(self) -> None:
        pass

    def terminate(self) -> None:
        self.engine.terminate()

    def restart(self) -> None:
        pass

    def close(self) -> None:
        pass


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        import signal

        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def make_slot(name: str, spec: EngineSpec) -> Slot:
    return CommandSlot(name, spec) if spec.kind == "command" else ProcessSlot(name, spec)


@dataclass
class _Task:
    job: str
    kind: str
    payload: Callable[[], dict]  # built when a slot takes the task: audio is converted lazily
    future: Future
    chunk: Chunk | None = None
    on_start: Callable[[Chunk, str], None] | None = None
    started: float = 0.0
    attempts: int = 0


@dataclass
class _FairQueue:
    """Tasks per job, served round-robin across jobs; detection tasks jump the queue."""

    queues: dict[str, deque] = field(default_factory=dict)
    order: deque = field(default_factory=deque)
    cond: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False

    def put(self, task: _Task, urgent: bool = False) -> None:
        with self.cond:
            q = self.queues.get(task.job)
            if q is None:
                q = self.queues[task.job] = deque()
                self.order.append(task.job)
            q.appendleft(task) if urgent else q.append(task)
            self.cond.notify()

    def get(self) -> _Task | None:
        with self.cond:
            while not self.closed:
                while self.order:
                    job = self.order.popleft()
                    q = self.queues[job]
                    task = q.popleft()
                    if q:
                        self.order.append(job)
                    else:
                        del self.queues[job]
                    return task
                self.cond.wait()
            return None

    def close(self) -> list[_Task]:
        with self.cond:
            self.closed = True
            left = [t for q in self.queues.values() for t in q]
            self.queues.clear()
            self.order.clear()
            self.cond.notify_all()
            return left


class Pool:
    """``workers`` engine slots behind a bounded thread pool, shared by all jobs."""

    def __init__(self, spec: EngineSpec, workers: int, *, chunk_timeout: float, retries: int = 1,
                 max_chunks: int = 0, max_rss_mb: int = 0) -> None:
        self.spec = spec
        self.workers = workers
        self.chunk_timeout = chunk_timeout
        self.retries = retries
        self.max_chunks = max_chunks
        self.max_rss_mb = max_rss_mb
        self.slots: list[Slot] = [make_slot(f"w{i + 1}", spec) for i in range(workers)]
        self._queue = _FairQueue()
        self._executor: ThreadPoolExecutor | None = None
        self._running: dict[str, _Task] = {}
        self._lock = threading.Lock()
        self.last_progress = time.monotonic()
        self.max_worker_rss_mb = 0.0
        self._closing = False
        self._booted = threading.Event()
        self._boot_errors: list[BaseException] = []
        self._boots_left = workers

    def start(self, wait: bool = True) -> None:
        """Start the serving threads; each boots its slot (loads the model) in parallel.

        With ``wait=False`` the caller goes on (decoding and VAD overlap the model load) and the
        first ``detect_language``/``transcribe`` waits for the slots instead.

        Raises:
            ConfigError: (with ``wait``) a slot could not start, e.g. the model does not load.
        """
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="smapd-slot")
        for slot in self.slots:
            self._executor.submit(self._serve, slot)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every slot has booted; raise the first boot error (and stop the pool)."""
        self._booted.wait()
        if self._boot_errors:
            self.close()
            raise self._boot_errors[0]

    def __enter__(self) -> Pool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop now: queued chunks are cancelled, running ones killed (not retried), workers ended."""
        self._closing = True
        for task in self._queue.close():
            _cancel(task.future)
        for slot in self.slots:
            slot.terminate()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for slot in self.slots:
            slot.close()

    # --- submitting ---
    def detect_language(self, job: str, audio: np.ndarray) -> Future:
        """Future of (language, probability) for up to 30 s of speech."""
        self.wait_ready()
        fut: Future = Future()
        self._queue.put(_Task(job, "detect", lambda: {"audio": audio}, fut), urgent=True)
        return fut

    def transcribe(self, job: str, chunk: Chunk, audio: Callable[[], np.ndarray], options: DecodeOptions,
                   on_start: Callable[[Chunk, str], None] | None = None) -> Future:
        """Future of a ChunkResult (never raises: failures are results with status FAILED)."""
        self.wait_ready()
        fut: Future = Future()
        speech = tuple((round(s - chunk.start, 3), round(e - chunk.start, 3)) for s, e in chunk.speech)
        self._queue.put(_Task(job, "transcribe", lambda: {"audio": audio(), "options": options, "speech": speech},
                              fut, chunk=chunk, on_start=on_start))
        return fut

    def cancel_job(self, job: str) -> None:
        """Drop a job's queued chunks (running ones finish or time out)."""
        with self._queue.cond:
            q = self._queue.queues.pop(job, None)
            if job in self._queue.order:
                self._queue.order.remove(job)
        for task in q or ():
            _cancel(task.future)

    # --- health, for the daemon's watchdog and status ---
    def stalled_seconds(self) -> float:
        """How far the longest-running task is past CHUNK_TIMEOUT (+ a load allowance); 0 = healthy."""
        now = time.monotonic()
        with self._lock:
            ages = [now - t.started for t in self._running.values()]
        allowance = self.chunk_timeout + 60.0
        return max([a - allowance for a in ages if a > allowance], default=0.0)

    def busy(self) -> int:
        with self._lock:
            return len(self._running)

    def queued(self) -> dict[str, int]:
        """Tasks waiting for a slot, per job (read-only: the daemon's MAX_CONCURRENT_JOBS=auto reads it)."""
        with self._queue.cond:
            return {job: len(q) for job, q in self._queue.queues.items() if q}

    # --- serving ---
    def _serve(self, slot: Slot) -> None:
        try:
            slot.start()
        except BaseException as e:  # noqa: BLE001 - handed to wait_ready() in the caller's thread
            self._boot_errors.append(e)
        finally:
            with self._lock:
                self._boots_left -= 1
                if self._boots_left == 0:
                    self._booted.set()
        if self._boot_errors:
            return
        while True:
            task = self._queue.get()
            if task is None:
                return
            if not task.future.set_running_or_notify_cancel():
                continue
            task.started = time.monotonic()
            with self._lock:
                self._running[slot.name] = task
            try:
                self._run_task(slot, task)
            except BaseException as e:  # noqa: BLE001 - never let a slot thread die silently
                logger.exception("slot {} failed unexpectedly", slot.name)
                if not task.future.done():
                    task.future.set_exception(e)
            finally:
                with self._lock:
                    self._running.pop(slot.name, None)
                self.last_progress = time.monotonic()
                self._recycle_if_needed(slot)

    def _run_task(self, slot: Slot, task: _Task) -> None:
        started = time.monotonic()
        cpu = 0.0
        last_error = ""
        for attempt in range(1, self.retries + 2):
            task.attempts = attempt
            task.started = time.monotonic()
            if task.chunk is not None and task.on_start is not None:
                task.on_start(task.chunk, slot.name)
            try:
                result, stats = slot.run(task.kind, task.payload(), self.chunk_timeout)
            except (ChunkTimeout, WorkerDied) as e:
                last_error = str(e)
                if self._closing:
                    last_error = "the pool was shut down while this chunk ran"
                    break
                logger.warning("{}: {} (attempt {}/{})", _label(task), e, attempt, self.retries + 1)
                try:
                    slot.restart()
                except ConfigError as boot_error:
                    logger.error("worker {} could not be restarted: {}", slot.name, boot_error)
                continue
            except ChunkError as e:
                last_error = str(e)
                if self._closing:
                    break
                logger.warning("{}: {} (attempt {}/{})", _label(task), e, attempt, self.retries + 1)
                continue
            cpu += stats.get("cpu", 0.0)
            self.max_worker_rss_mb = max(self.max_worker_rss_mb, getattr(slot, "max_rss_mb", 0.0))
            if task.kind == "detect":
                task.future.set_result(result)
            else:
                assert task.chunk is not None
                task.future.set_result(ChunkResult(
                    chunk=task.chunk, status=ChunkStatus.OK, attempts=attempt,
                    seconds=round(time.monotonic() - started, 3), segments=tuple(result),
                    worker=slot.name, cpu_seconds=round(cpu, 3), language=stats.get("language")))
            return
        if task.kind == "detect":
            task.future.set_exception(ChunkError(last_error))
        else:
            assert task.chunk is not None
            task.future.set_result(ChunkResult(
                chunk=task.chunk, status=ChunkStatus.FAILED, attempts=task.attempts,
                seconds=round(time.monotonic() - started, 3), error=last_error, worker=slot.name,
                cpu_seconds=round(cpu, 3)))

    def _recycle_if_needed(self, slot: Slot) -> None:
        """Replace a worker that has served its quota or grown too large (leaks)."""
        if not isinstance(slot, ProcessSlot) or slot.proc is None or self._closing:
            return
        reason = None
        if self.max_chunks and slot.chunks_served >= self.max_chunks:
            reason = f"served {slot.chunks_served} chunks (SMAPD_WORKER_MAX_CHUNKS)"
        elif self.max_rss_mb and slot.rss_mb > self.max_rss_mb:
            reason = f"uses {slot.rss_mb:.0f} MB (SMAPD_WORKER_MAX_RSS_MB={self.max_rss_mb})"
        if reason:
            logger.info("recycling worker {}: {}", slot.name, reason)
            try:
                slot.close()
                slot.start()
            except ConfigError as e:
                logger.error("worker {} could not be restarted: {}", slot.name, e)


def _cancel(future: Future) -> None:
    """Cancel a queued future so that ``as_completed``/``wait`` wake up: ``cancel()`` alone only
    marks it; waiters hear of it from ``set_running_or_notify_cancel()`` (as an executor would)."""
    if future.cancel():
        future.set_running_or_notify_cancel()


def _label(task: _Task) -> str:
    if task.chunk is None:
        return f"{task.job} language detection"
    c = task.chunk
    return f"{task.job} chunk {c.index} ({c.start:.1f}-{c.end:.1f} s)"
