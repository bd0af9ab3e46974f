"""Fast unit tests of ``runner.run_claim`` (one claimed job end to end) on a real temp spool and a real
clip, with a fake engine pool instead of the model: what is published, archived or failed for each
way a job ends. Only public entry points are used (Spool's verbs, run_claim, JobConfig), so the
spool's and the runner's insides may change freely. The real engine is proved in test_daemon.py."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import testkit as tk
from smapd import runner
from smapd.engine import EngineSpec
from smapd.errors import TransientJobError
from smapd.models import Chunk, ChunkResult, ChunkStatus, Segment
from smapd.settings import Settings
from smapd.spool import Claim, Spool
from smapd.worker import TranscribeRequest

CLIP = tk.DATA_DIR / "fleurs-en-003.ogg"  # 5.8 s: one chunk


class FakePool:
    """What the pipeline calls (``submit``, ``cancel_job``): every chunk is answered on a "slot" thread
    with a fixed segment (or a failure); records what it was given."""

    workers = 1

    def __init__(self, fail: bool = False, during: Callable[[], None] | None = None, crashed: bool = False) -> None:
        self.fail, self.during, self.crashed = fail, during, crashed
        self.chunks: list[tuple[str, Chunk, int]] = []
        self.cancelled: list[str] = []
        self.slot = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-slot")

    def submit(self, job: str, chunk: Chunk, request: Callable[[], TranscribeRequest],
               on_start: Callable[[Chunk, str], None] | None = None) -> Future:
        def serve() -> ChunkResult:  # on the "slot", later, as the real pool does
            if on_start is not None:
                on_start(chunk, "fake1")
            self.chunks.append((job, chunk, len(request().audio)))  # the request is built when a slot takes it
            if self.during is not None:
                self.during()
            if self.fail:
                return ChunkResult(chunk=chunk, status=ChunkStatus.FAILED, attempts=2, seconds=0.01,
                                   error="worker fake1 was killed by SIGKILL", worker="fake1",
                                   crashed=self.crashed)
            return ChunkResult(chunk=chunk, status=ChunkStatus.OK, attempts=1, seconds=0.01,
                               segments=(Segment(0.0, 2.0, " the cabbage juice changes color"),),
                               worker="fake1", language=("en", 0.99))

        return self.slot.submit(serve)

    def cancel_job(self, job: str) -> None:
        self.cancelled.append(job)


CONFIG = runner.JobConfig(  # from Settings, as the daemon builds it, with what these tests need
    engine=EngineSpec(kind="faster-whisper", model="fake-model"), workers=1,
    **runner.reloadable(Settings.model_construct(formats="txt,json", chunk_timeout=60.0, chunk_retries=0,
                                                 max_file_bytes=0)))


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", "unit", lease_seconds=60)
    s.ensure_layout()
    return s


def claim(spool: Spool, src: Path, name: str) -> Claim:
    shutil.copyfile(src, spool.inbox / name)
    c = spool.claim(name)
    assert c is not None
    return c


def run(spool: Spool, c: Claim, pool: FakePool, lost: bool = False, cancelled: bool = False) -> str:
    lost_ev, cancelled_ev = threading.Event(), threading.Event()
    if lost:
        lost_ev.set()
    if cancelled:
        cancelled_ev.set()
    progress: list[str] = []
    try:
        outcome = runner.run_claim(c, spool, pool, CONFIG, node="unit", lost=lost_ev,  # type: ignore[arg-type]
                                   cancelled=cancelled_ev, on_progress=lambda p: progress.append(p.kind))
    finally:
        pool.slot.shutdown(wait=True)
    if outcome == "done":
        assert "started" in progress and "finished" in progress
    return outcome


def reports(spool: Spool, where: Path) -> list[dict[str, Any]]:
    return [json.loads((where / n).read_bytes()) for n in os.listdir(where) if n.endswith(".report.json")]


def test_a_finished_job_publishes_its_outputs_and_report_then_archives_the_original(spool: Spool) -> None:
    c = claim(spool, CLIP, "talk.ogg")
    pool = FakePool()
    assert run(spool, c, pool) == "done"
    assert sorted(os.listdir(spool.outbox)) == ["talk.json", "talk.report.json", "talk.txt"]
    assert "cabbage juice" in (spool.outbox / "talk.txt").read_text()
    (report,) = reports(spool, spool.outbox)
    assert report["outcome"] == "success" and report["job"]["id"] == c.job_id
    assert report["outputs"] == {".txt": "talk.txt", ".json": "talk.json"}
    assert not os.listdir(spool.processing) and not os.listdir(spool.inbox)
    (archived,) = os.listdir(spool.archive)
    assert (spool.archive / archived).read_bytes() == CLIP.read_bytes()
    assert [(job, chunk.index) for job, chunk, _ in pool.chunks] == [(c.job_id, 1)]  # keyed by the job id
    assert pool.chunks[0][2] > 16000 * 5  # the chunk's samples (5.8 s at 16 kHz, minus trimmed silence)


def test_a_job_whose_claim_was_lost_publishes_nothing_and_leaves_the_claim(spool: Spool) -> None:
    c = claim(spool, CLIP, "lost.ogg")
    assert run(spool, c, FakePool(), lost=True) == "lost"
    assert not os.listdir(spool.outbox) and not os.listdir(spool.archive) and not os.listdir(spool.failed)


def test_a_claim_renamed_away_mid_job_is_noticed_before_publishing(spool: Spool, tmp_path: Path) -> None:
    """Another node took the claim over while the chunks ran (its rename of our claim)."""
    c = claim(spool, CLIP, "taken.ogg")
    pool = FakePool(during=lambda: c.path.rename(tmp_path / "elsewhere"))
    assert run(spool, c, pool) == "lost"
    assert not os.listdir(spool.outbox) and not os.listdir(spool.archive) and not os.listdir(spool.failed)


def test_a_cancelled_job_publishes_nothing_and_leaves_the_claim_for_the_hand_back(spool: Spool) -> None:
    c = claim(spool, CLIP, "stop.ogg")
    assert run(spool, c, FakePool(), cancelled=True) == "cancelled"
    assert not os.listdir(spool.outbox) and os.listdir(spool.processing) == [c.path.name]


def test_a_file_that_is_not_audio_goes_to_failed_with_a_report(spool: Spool, tmp_path: Path) -> None:
    c = claim(spool, tk.write_text_as(tmp_path / "list.txt"), "list.mp3")
    pool = FakePool()
    assert run(spool, c, pool) == "failed"
    assert not pool.chunks and not os.listdir(spool.outbox)
    (report,) = reports(spool, spool.failed)
    assert report["outcome"] == "failed" and report["error"]
    assert [n for n in os.listdir(spool.failed) if not n.endswith(".report.json")] == [f"{c.job_id}.list.mp3"]


def test_a_job_whose_every_chunk_failed_goes_to_failed_saying_why(spool: Spool) -> None:
    c = claim(spool, CLIP, "crashy.ogg")
    assert run(spool, c, FakePool(fail=True)) == "failed"
    (report,) = reports(spool, spool.failed)
    assert "no chunk could be transcribed" in report["error"] and "SIGKILL" in report["error"]
    assert not os.listdir(spool.outbox)


def test_a_job_whose_every_chunk_lost_its_worker_is_retried_as_the_next_attempt(tmp_path: Path) -> None:
    """Workers killed from outside (OOM, an operator, the chaos run) on every retry of every chunk say
    nothing about the file: the claim is kept for the next attempt (TransientJobError: the daemon
    abandons it to its lease) instead of failing the file; at the last attempt the file fails."""
    sp = Spool(tmp_path / "spool", "unit", lease_seconds=60, max_attempts=2)
    sp.ensure_layout()
    c = claim(sp, CLIP, "unlucky.ogg")
    with pytest.raises(TransientJobError, match="retried as the next attempt"):
        run(sp, c, FakePool(fail=True, crashed=True))
    assert os.listdir(sp.processing) == [c.path.name] and not os.listdir(sp.failed) and not os.listdir(sp.outbox)
    last = dataclasses.replace(c, attempt=2)  # the same claim as its last attempt (2 of 2)
    assert run(sp, last, FakePool(fail=True, crashed=True)) == "failed"
    (report,) = reports(sp, sp.failed)
    assert "SIGKILL" in report["error"]
