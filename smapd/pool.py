"""The bounded engine pool: MAX_PARALLEL_WORKERS slots shared by every job, fair between jobs.

Each slot (``smapd.slots``) is stoppable, so a timeout really stops the work (DESIGN.md §4). One
thread of a bounded ThreadPoolExecutor drives each slot, pulling tasks from a queue that takes
jobs in turn (round-robin), so a huge file never starves a small one: each job gets every n-th
free slot.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Self

import numpy as np
from loguru import logger

from smapd.engine import DecodeOptions, EngineSpec
from smapd.errors import ChunkError, ChunkTimeout, ConfigError, WorkerDied
from smapd.models import Chunk, ChunkResult, ChunkStatus
from smapd.slots import Slot, make_slot
from smapd.worker import Reply, TranscribeRequest


@dataclass
class _Task:
    job: str
    # built when a slot takes the task: audio is converted lazily; None: skip it (its future gets None)
    request: Callable[[], TranscribeRequest | None]
    future: Future
    chunk: Chunk
    on_start: Callable[[Chunk, str], None] | None = None
    started: float = 0.0
    attempts: int = 0


@dataclass
class _FairQueue:
    """Tasks per job, served round-robin across jobs."""

    queues: dict[str, deque] = field(default_factory=dict)
    order: deque = field(default_factory=deque)
    cond: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False

    def put(self, task: _Task) -> None:
        with self.cond:
            q = self.queues.get(task.job)
            if q is None:
                q = self.queues[task.job] = deque()
                self.order.append(task.job)
            q.append(task)
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
                 max_chunks: int = 0, max_rss_mb: int = 0,
                 make: Callable[[str, EngineSpec], Slot] = make_slot) -> None:
        self.spec = spec
        self.workers = workers
        self.chunk_timeout = chunk_timeout
        self.retries = retries
        self.max_chunks = max_chunks
        self.max_rss_mb = max_rss_mb
        self.slots: list[Slot] = [make(f"w{i + 1}", spec) for i in range(workers)]
        self._queue = _FairQueue()
        self._executor: ThreadPoolExecutor | None = None
        self._running: dict[str, _Task] = {}
        self._lock = threading.Lock()
        self._closing = False
        self._booted = threading.Event()
        self._boot_errors: list[BaseException] = []
        self.restarts = 0  # workers replaced (crash, timeout, recycling) since start: for the metrics
        self.timeouts = 0  # chunk attempts that ran past CHUNK_TIMEOUT
        self._boots_left = workers

    def start(self, wait: bool = True) -> None:
        """Start the serving threads; each boots its slot (loads the model) in parallel.

        With ``wait=False`` the caller goes on (decoding and VAD overlap the model load) and the
        first ``transcribe``/``submit`` waits for the slots instead.

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

    def __enter__(self) -> Self:
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
    def transcribe(self, job: str, chunk: Chunk, audio: Callable[[], np.ndarray], options: DecodeOptions,
                   on_start: Callable[[Chunk, str], None] | None = None) -> Future:
        """Future of a ChunkResult for [chunk.start, chunk.end] decoded with ``options``; see ``submit``."""
        speech = tuple((round(s - chunk.start, 3), round(e - chunk.start, 3)) for s, e in chunk.speech)
        return self.submit(job, chunk, lambda: TranscribeRequest(audio(), options, speech), on_start)

    def submit(self, job: str, chunk: Chunk, request: Callable[[], TranscribeRequest | None],
               on_start: Callable[[Chunk, str], None] | None = None) -> Future:
        """Future of a ChunkResult (never raises: failures are results with status FAILED), or of None
        when ``request`` returns None as a slot takes the task.

        Args:
            job: The job's key (fair queueing, cancelling).
            chunk: The chunk; its index and times go into the result.
            request: Builds the request when a slot takes the task, so the audio is converted, and
                the options chosen (e.g. the language the chunks so far agree on), as late as possible.
            on_start: Called with the chunk and the slot's name as each attempt starts.
        """
        self.wait_ready()
        fut: Future = Future()
        if self._closing:  # shut down: nothing will serve it
            _cancel(fut)
            return fut
        self._queue.put(_Task(job, request, fut, chunk=chunk, on_start=on_start))
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

    @property
    def closing(self) -> bool:
        """The pool is shutting down: queued and new chunks are cancelled."""
        return self._closing

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
                self._recycle_if_needed(slot)

    def _run_task(self, slot: Slot, task: _Task) -> None:
        started = time.monotonic()
        cpu = 0.0
        last_error = ""
        broken = False  # the slot must be restarted before it serves again
        crashed = False  # the last attempt ended with its worker killed or hung, not with an engine error
        for attempt in range(1, self.retries + 2):
            task.attempts = attempt
            task.started = time.monotonic()
            request = task.request()
            if request is None:  # nothing to do after all (another node makes this chunk)
                task.future.set_result(None)
                return
            if task.on_start is not None:
                task.on_start(task.chunk, slot.name)
            try:
                reply = slot.run(request, self.chunk_timeout)
            except (ChunkTimeout, WorkerDied) as e:
                last_error, crashed = str(e), True
                if isinstance(e, ChunkTimeout):
                    self._count("timeouts")
                if self._closing:
                    last_error = "the pool was shut down while this chunk ran"
                    break
                logger.warning("{}: {} (attempt {}/{})", _label(task), e, attempt, self.retries + 1)
                broken = True
                if attempt <= self.retries:
                    self._restart(slot)
                    broken = False
                continue
            except ChunkError as e:
                last_error, crashed = str(e), False
                if self._closing:
                    break
                logger.warning("{}: {} (attempt {}/{})", _label(task), e, attempt, self.retries + 1)
                continue
            cpu += reply.stats.cpu_seconds
            self._settle(task, reply, ChunkStatus.OK, attempt, started, slot, cpu)
            return
        self._settle(task, None, ChunkStatus.FAILED, task.attempts, started, slot, cpu, last_error, crashed)
        if broken and not self._closing:  # after the result: a failed chunk need not wait for a model load
            self._restart(slot)

    def _count(self, counter: str) -> None:
        with self._lock:  # slot threads count concurrently
            setattr(self, counter, getattr(self, counter) + 1)

    def _restart(self, slot: Slot) -> None:
        self._count("restarts")
        try:
            slot.restart()
        except ConfigError as boot_error:
            logger.error("worker {} could not be restarted: {}", slot.name, boot_error)

    @staticmethod
    def _settle(task: _Task, reply: Reply | None, status: ChunkStatus, attempts: int, started: float, slot: Slot,
                cpu: float, error: str = "", crashed: bool = False) -> None:
        """Hand the outcome to the task's future as a ChunkResult."""
        done = reply.transcribed if reply is not None else None
        task.future.set_result(ChunkResult(
            chunk=task.chunk, status=status if done else ChunkStatus.FAILED, attempts=attempts,
            seconds=round(time.monotonic() - started, 3), segments=done.segments if done else (),
            error=None if done else (error or "the worker sent no transcript"), worker=slot.name,
            cpu_seconds=round(cpu, 3), language=done.language if done else None,
            signals=done.signals if done else None,
            rss_mb=round(reply.stats.rss_mb if reply is not None else slot.rss_mb, 1), crashed=crashed and not done))

    def _recycle_if_needed(self, slot: Slot) -> None:
        """Replace a worker that has served its quota or grown too large (leaks)."""
        if not slot.recyclable or slot.pid is None or self._closing:
            return
        reason = None
        if self.max_chunks and slot.chunks_served >= self.max_chunks:
            reason = f"served {slot.chunks_served} chunks (SMAPD_WORKER_MAX_CHUNKS)"
        elif self.max_rss_mb and slot.rss_mb > self.max_rss_mb:
            reason = f"uses {slot.rss_mb:.0f} MB (SMAPD_WORKER_MAX_RSS_MB={self.max_rss_mb})"
        if reason:
            logger.info("recycling worker {}: {}", slot.name, reason)
            self._count("restarts")
            try:
                slot.recycle()
            except ConfigError as e:
                logger.error("worker {} could not be restarted: {}", slot.name, e)


def _cancel(future: Future) -> None:
    """Cancel a queued future so that ``as_completed``/``wait`` wake up: ``cancel()`` alone only
    marks it; waiters hear of it from ``set_running_or_notify_cancel()`` (as an executor would)."""
    if future.cancel():
        future.set_running_or_notify_cancel()


def _label(task: _Task) -> str:
    c = task.chunk
    return f"{task.job} chunk {c.index} ({c.start:.1f}-{c.end:.1f} s)"
