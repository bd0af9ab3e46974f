"""Fast unit tests of the pool's logic (retries, timeouts, fairness, recycling, memory) with a fake slot.

The real worker processes, signals and the model are proven in tests/test_engines.py and
tests/test_faults.py; here a scripted slot stands in so that every branch runs in milliseconds.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from smapd.engine import DecodeOptions, EngineSpec, Transcribed
from smapd.errors import ChunkError, ChunkTimeout, ConfigError, WorkerDied
from smapd.models import Chunk, ChunkStatus, Segment
from smapd.pool import Pool
from smapd.slots import ProcessSlot, Slot
from smapd.worker import Reply, Stats, TranscribeRequest

SPEC = EngineSpec(kind="fake", model="none")
AUDIO = np.zeros(1600, dtype=np.float32)


class FakeSlot:
    """A slot whose answers come from ``script(slot, request)``: a Reply, or an exception to raise."""

    recyclable = True

    def __init__(self, name: str, script: Callable[[FakeSlot, TranscribeRequest], Reply]) -> None:
        self.name = name
        self.script = script
        self.chunks_served = 0
        self.rss_mb = self.max_rss_mb = 0.0
        self.starts = self.restarts = self.recycles = 0
        self.alive = False

    @property
    def pid(self) -> int | None:
        return 1 if self.alive else None

    def start(self) -> None:
        self.starts += 1
        self.alive = True

    def run(self, request: TranscribeRequest, timeout: float) -> Reply:
        reply = self.script(self, request)
        self.chunks_served += 1
        self.rss_mb = reply.stats.rss_mb
        self.max_rss_mb = max(self.max_rss_mb, reply.stats.max_rss_mb)
        return reply

    def restart(self) -> None:
        self.restarts += 1

    def recycle(self) -> None:
        self.recycles += 1
        self.chunks_served = 0

    def terminate(self) -> None:
        pass

    def close(self) -> None:
        self.alive = False


def ok(text: str = "hello", rss: float = 100.0) -> Reply:
    return Reply(Stats(cpu_seconds=0.5, rss_mb=rss, max_rss_mb=rss),
                 transcribed=Transcribed((Segment(0.0, 1.0, text),), ("en", 0.99)))


def make_pool(script: Callable[[FakeSlot, TranscribeRequest], Reply], workers: int = 1, **kw: object) -> Pool:
    slots: list[FakeSlot] = []

    def make(name: str, spec: EngineSpec) -> Slot:
        slots.append(FakeSlot(name, script))
        return slots[-1]

    pool = Pool(SPEC, workers, chunk_timeout=5.0, make=make, **kw)  # type: ignore[arg-type]
    pool.fakes = slots  # type: ignore[attr-defined]
    return pool


def chunk(i: int) -> Chunk:
    return Chunk(index=i, start=float(i), end=i + 1.0, speech=((float(i), i + 0.5),))


def test_a_real_slot_class_satisfies_the_protocol() -> None:
    slot: Slot = ProcessSlot("w1", SPEC)  # mypy checks the assignment; here: nothing is missing
    for name in ("start", "run", "restart", "recycle", "terminate", "close"):
        assert callable(getattr(slot, name))
    assert slot.pid is None and slot.chunks_served == 0 and slot.recyclable


def test_results_carry_segments_language_cpu_and_the_workers_memory() -> None:
    seen: list[TranscribeRequest] = []

    def script(slot: FakeSlot, req: TranscribeRequest) -> Reply:
        seen.append(req)
        return ok(rss=321.0)

    with make_pool(script) as pool:
        result = pool.transcribe("job", chunk(3), lambda: AUDIO, DecodeOptions(language="de")).result(timeout=5)
    assert result.status is ChunkStatus.OK and result.attempts == 1
    assert result.segments[0].text == "hello" and result.language == ("en", 0.99)
    assert result.cpu_seconds == 0.5 and result.rss_mb == 321.0 and result.worker == "w1"
    assert seen[0].options.language == "de"
    assert seen[0].speech == ((0.0, 0.5),), "speech spans are sent in the chunk's own time"


@pytest.mark.parametrize("error", [ChunkTimeout("late"), WorkerDied("worker w1 was killed by SIGKILL")])
def test_a_timeout_or_crash_restarts_the_slot_and_retries(error: Exception) -> None:
    calls = []

    def script(slot: FakeSlot, req: TranscribeRequest) -> Reply:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return ok()

    with make_pool(script, retries=1) as pool:
        result = pool.transcribe("job", chunk(1), lambda: AUDIO, DecodeOptions()).result(timeout=5)
        assert pool.fakes[0].restarts == 1  # type: ignore[attr-defined]
    assert result.status is ChunkStatus.OK and result.attempts == 2


def test_an_engine_error_is_retried_then_the_chunk_fails_with_the_error() -> None:
    def script(slot: FakeSlot, req: TranscribeRequest) -> Reply:
        raise ChunkError("RuntimeError: bad input")

    with make_pool(script, retries=2) as pool:
        result = pool.transcribe("job", chunk(1), lambda: AUDIO, DecodeOptions()).result(timeout=5)
        assert pool.fakes[0].restarts == 0  # type: ignore[attr-defined]  # the worker lives on
    assert result.status is ChunkStatus.FAILED and result.attempts == 3
    assert result.error == "RuntimeError: bad input" and result.segments == ()


def test_a_slot_that_cannot_restart_fails_the_chunk_not_the_pool() -> None:
    def script(slot: FakeSlot, req: TranscribeRequest) -> Reply:
        raise WorkerDied("gone")

    with make_pool(script, retries=1) as pool:
        def boom() -> None:
            raise ConfigError("model vanished")

        pool.fakes[0].restart = boom  # type: ignore[attr-defined]
        result = pool.transcribe("job", chunk(1), lambda: AUDIO, DecodeOptions()).result(timeout=5)
    assert result.status is ChunkStatus.FAILED and result.error == "gone"


def test_recycling_after_the_chunk_quota_and_above_the_memory_limit() -> None:
    def script(slot: FakeSlot, req: TranscribeRequest) -> Reply:
        return ok(rss=50.0 if slot.chunks_served < 3 else 900.0)

    with make_pool(script, max_chunks=2) as pool:
        for i in range(4):
            pool.transcribe("job", chunk(i), lambda: AUDIO, DecodeOptions()).result(timeout=5)
    assert pool.fakes[0].recycles == 2  # type: ignore[attr-defined]  # (close() waited for the slot thread)
    with make_pool(script, max_rss_mb=500) as pool:
        for i in range(5):
            pool.transcribe("job", chunk(i), lambda: AUDIO, DecodeOptions()).result(timeout=5)
    assert pool.fakes[0].recycles == 1  # type: ignore[attr-defined]


def test_jobs_take_turns_and_a_cancelled_job_loses_its_queued_chunks() -> None:
    gate = threading.Event()
    order: list[str] = []

    def script(slot: FakeSlot, req: TranscribeRequest) -> Reply:
        gate.wait(5)
        order.append(req.options.task)
        return ok()

    with make_pool(script) as pool:
        first = pool.transcribe("blocker", chunk(0), lambda: AUDIO, DecodeOptions(task="blocker"))
        big = [pool.transcribe("big", chunk(i), lambda: AUDIO, DecodeOptions(task="big")) for i in range(4)]
        small = [pool.transcribe("small", chunk(i), lambda: AUDIO, DecodeOptions(task="small")) for i in range(2)]
        doomed = [pool.transcribe("doomed", chunk(i), lambda: AUDIO, DecodeOptions(task="doomed")) for i in range(2)]
        pool.cancel_job("doomed")
        gate.set()
        for f in [first, *big, *small]:
            f.result(timeout=5)
        assert all(f.cancelled() for f in doomed)
    assert order[:5] == ["blocker", "big", "small", "big", "small"], order


def test_close_cancels_what_waits() -> None:
    gate, entered = threading.Event(), threading.Event()

    def script(slot: FakeSlot, req: TranscribeRequest) -> Reply:
        entered.set()
        gate.wait(5)
        return ok()

    pool = make_pool(script)
    pool.start()
    running = pool.transcribe("job", chunk(0), lambda: AUDIO, DecodeOptions())
    waiting = pool.transcribe("job", chunk(1), lambda: AUDIO, DecodeOptions())
    assert entered.wait(5), "the first chunk never reached the slot"  # else close() cancels both
    threading.Timer(0.2, gate.set).start()
    pool.close()
    assert waiting.cancelled()
    assert running.result(timeout=5).status is ChunkStatus.OK


def test_the_last_failed_attempt_is_reported_before_the_slot_reloads() -> None:
    def script(slot: FakeSlot, req: TranscribeRequest) -> Reply:
        raise ChunkTimeout("late")

    futures = []
    seen_done: list[bool] = []
    with make_pool(script, retries=0) as pool:
        pool.fakes[0].restart = lambda: seen_done.append(futures[0].done())  # type: ignore[attr-defined]
        futures.append(pool.transcribe("job", chunk(1), lambda: AUDIO, DecodeOptions()))
        assert futures[0].result(timeout=5).status is ChunkStatus.FAILED
    assert seen_done == [True], "the failure waited for a model load"
