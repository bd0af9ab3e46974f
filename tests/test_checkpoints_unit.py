"""Fast unit tests of the checkpoint protocol (issue 10): two nodes are two ``Spool`` instances on
one real spool folder; the races are real renames. The pipeline runs on a real clip with a fake
pool (the real workers, daemons and signals are in tests/test_checkpoints.py).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smapd import checkpoints, pipeline
from smapd.checkpoints import SpoolCheckpoints
from smapd.models import Chunk, ChunkResult, ChunkStatus, DecodeSignals, Segment, Word
from smapd.results import result_from_dict, result_to_dict
from smapd.spool import Spool
from smapd.spool.chunks import HELPER

DATA = Path(__file__).parent / "data"
CHUNK = Chunk(3, 60.0, 90.0, speech=((61.0, 70.0), (75.0, 89.5)), pieces=((60.0, 71.0), (74.0, 90.0)))


def ok(chunk: Chunk, text: str = "hello") -> ChunkResult:
    return ChunkResult(chunk, ChunkStatus.OK, 1, 2.5, (Segment(0.5, 1.5, text, (Word(0.5, 1.5, text, 0.9),)),),
                       worker="w1", cpu_seconds=2.4, language=("en", 0.98),
                       signals=DecodeSignals(-0.2, 1.4, 0.01, 0.0, 5, 1), rss_mb=300.0)


def spools(root: Path, lease: float = 60.0) -> tuple[Spool, Spool]:
    a, b = Spool(root, "a", lease_seconds=lease), Spool(root, "b", lease_seconds=lease)
    a.ensure_layout()
    return a, b


def owner(sp: Spool, job: str = "job000000001", attempt: int = 1, share: bool = True) -> SpoolCheckpoints:
    board = sp.job_chunks(job)
    board.begin({"job_id": job, "fingerprint": "f1", "digest": "d1", "model": "m", "decode": {"language": "en"}})
    return SpoolCheckpoints(board, attempt=attempt, share=share, min_chunks=2, peers=lambda: 1)


def test_a_result_survives_its_json_round_trip() -> None:
    r = dataclasses.replace(ok(CHUNK), made_by={"node": "a", "attempt": 2, "helper": False}, redone=True)
    back = result_from_dict(result_to_dict(r))
    assert back == r and back.chunk.spans == CHUNK.spans and back.signals == r.signals
    assert back.made_by == r.made_by and back.redone, "a chunk redone by attempt 2 stays redone when resumed"


def test_a_failed_write_pauses_checkpoints_and_they_come_back(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = spools(tmp_path)
    mine = owner(a)
    real = mine.board.save
    calls: list[int] = []

    def full(index: int, data: dict) -> None:
        calls.append(index)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(index, data)
    monkeypatch.setattr(mine.board, "save", full)
    monkeypatch.setattr(checkpoints, "RETRY_SECONDS", 0.2)
    mine.save(ok(Chunk(1, 0.0, 30.0)))  # the disk is full: no checkpoint, the job goes on
    mine.save(ok(Chunk(2, 30.0, 60.0)))  # not tried: it would fail again at once
    assert calls == [1] and not mine.share(600.0, 30.0)
    time.sleep(0.3)
    mine.save(ok(Chunk(3, 60.0, 90.0)))
    assert calls == [1, 3] and sorted(a.job_chunks("job000000001").results()) == [3]


def test_one_taker_wins_an_offered_chunk_and_the_owner_waits_for_a_live_helper(tmp_path: Path) -> None:
    a, b = spools(tmp_path)
    mine = owner(a)
    mine.offer(CHUNK, np.arange(10, dtype=np.int16), ((0.0, 1.0),))
    helper_board = b.job_chunks("job000000001")
    taken = helper_board.take(CHUNK.index, HELPER, os.getpid())
    assert taken is not None and helper_board.take(CHUNK.index, HELPER, 1) is None, "a second rename loses"
    assert helper_board.window(CHUNK.index).tolist() == list(range(10))
    assert not mine.take(CHUNK), "a live helper has it"
    assert mine.arrived({CHUNK.index}) == ([], [])
    helper_board.save(CHUNK.index, result_to_dict(ok(CHUNK, "made by b")))
    came, redo = mine.arrived({CHUNK.index})
    assert [r.segments[0].text for r in came] == ["made by b"] and redo == []


def test_a_dead_helpers_chunk_goes_back_to_the_owner_and_counts_as_redone(tmp_path: Path) -> None:
    a, b = spools(tmp_path, lease=0.3)
    mine = owner(a)
    mine.offer(CHUNK, np.zeros(4, dtype=np.int16), ())
    assert b.job_chunks("job000000001").take(CHUNK.index, HELPER, 99999) is not None
    assert mine.arrived({CHUNK.index}) == ([], [])
    time.sleep(0.6)  # the helper stops refreshing: its lease runs out by the spool clock
    assert mine.arrived({CHUNK.index}) == ([], [CHUNK.index])
    assert mine.take(CHUNK) and mine.take(CHUNK), "the owner takes it (and a retry keeps it)"
    saved = mine.save(ok(CHUNK))
    assert saved.redone and saved.made_by == {"node": "a", "attempt": 1, "helper": False}


def test_a_takeover_resumes_every_saved_chunk_and_redoes_the_one_its_owner_died_in(tmp_path: Path) -> None:
    a, b = spools(tmp_path)
    first = owner(a)
    done, dying = Chunk(1, 0.0, 30.0), Chunk(2, 30.0, 60.0)
    first.planned([done, dying])
    assert first.take(done) and first.take(dying)
    first.save(ok(done))
    second = owner(b, attempt=2)  # another node took the claim over: same job id, same folder
    assert second.saved_plan() == [done, dying]
    saved = second.saved()
    assert list(saved) == [1] and saved[1].resumed and saved[1].made_by == {"node": "a", "attempt": 1, "helper": False}
    assert second.take(dying), "the dead owner's entry does not hold the chunk"
    assert second.save(ok(dying)).redone


def test_a_new_fingerprint_starts_afresh_and_a_handed_back_file_is_adopted(tmp_path: Path) -> None:
    a, _ = spools(tmp_path)
    first = owner(a, job="job00000000a")
    first.save(ok(Chunk(1, 0.0, 30.0)))
    assert a.adopt_chunks("job00000000b", "d1", "f1"), "same bytes, same options, its job no longer claimed"
    assert not a.job_chunks("job00000000a").exists()
    adopted = SpoolCheckpoints(a.job_chunks("job00000000b"), attempt=1, share=False, min_chunks=2, peers=lambda: 0)
    assert list(adopted.saved()) == [1]
    a.job_chunks("job00000000b").begin({"fingerprint": "f2"})
    assert a.job_chunks("job00000000b").results() == {}, "other options: the old chunks are not reused"
    assert not a.adopt_chunks("job00000000c", "d1", "f1")


def test_sharing_needs_a_long_file_a_peer_and_the_setting(tmp_path: Path) -> None:
    a, _ = spools(tmp_path)
    board = a.job_chunks("job000000001")
    make = lambda share, peers: SpoolCheckpoints(board, attempt=1, share=share, min_chunks=6,
                                                 peers=lambda: peers)
    assert make(True, 1).share(180.0, 30.0)
    assert not make(True, 1).share(179.0, 30.0) and not make(True, 0).share(600.0, 30.0)
    assert not make(False, 1).share(600.0, 30.0)


def test_prune_drops_checkpoints_a_day_old_that_no_claim_owns(tmp_path: Path) -> None:
    a, _ = spools(tmp_path)
    owner(a, job="job00000000o")
    owner(a, job="job00000000n")
    old = time.time() - 2 * 86400
    os.utime(a.job_chunks("job00000000o").dir / "job.json", (old, old))
    a.prune_archive(0)
    assert not a.job_chunks("job00000000o").exists() and a.job_chunks("job00000000n").exists()


class Pool:
    """Answers at once, and counts what it was asked to make."""

    closing = False  # smapd.pool.Pool.closing

    def __init__(self) -> None:
        self.made: list[int] = []

    def submit(self, key: str, chunk: Chunk, request: Any, on_start: Any = None) -> Future:
        fut: Future = Future()
        req = request()
        if req is None:
            fut.set_result(None)
            return fut
        self.made.append(chunk.index)
        fut.set_result(ChunkResult(chunk, ChunkStatus.OK, 1, 0.1, (Segment(0.0, 1.0, f"chunk {chunk.index}"),),
                                   language=("en", 0.99)))
        return fut

    def cancel_job(self, key: str) -> None:
        pass


def test_the_pipeline_resumes_from_checkpoints_and_gives_the_same_transcript(tmp_path: Path) -> None:
    a, b = spools(tmp_path)
    clip = DATA / "librispeech-121-127105-0000.flac"
    options = pipeline.PipelineOptions(language="en", chunk_seconds=5.0)
    pool = Pool()
    first = pipeline.run(clip, pool, options, checkpoints=owner(a, share=False))  # type: ignore[arg-type]
    assert len(pool.made) >= 2 and not any(c.resumed for c in first.chunks)
    again = Pool()
    second = pipeline.run(clip, again, options, checkpoints=owner(b, attempt=2, share=False))  # type: ignore[arg-type]
    assert again.made == [] and all(c.resumed for c in second.chunks)
    assert second.segments == first.segments and [c.chunk for c in second.chunks] == [c.chunk for c in first.chunks]


def test_a_job_stops_waiting_for_other_nodes_when_the_pool_shuts_down(tmp_path: Path) -> None:
    a, b = spools(tmp_path)
    clip = DATA / "librispeech-121-127105-0000.flac"
    options = pipeline.PipelineOptions(language="en", chunk_seconds=5.0)
    first = pipeline.run(clip, Pool(), options, checkpoints=owner(a, share=False))  # type: ignore[arg-type]
    helper = b.job_chunks("job000000002")
    owner(a, job="job000000002")
    for c in first.chunks:  # a live helper holds every chunk: the owner waits for it...
        helper.offer(c.chunk.index, {"chunk": {}}, np.zeros(1, dtype=np.int16))
        assert helper.take(c.chunk.index, HELPER, os.getpid()) is not None

    class Closing(Pool):
        closing = True  # ... until this node shuts down

    t = time.monotonic()
    stopped = pipeline.run(clip, Closing(), options, checkpoints=owner(a, job="job000000002", share=False))  # type: ignore[arg-type]
    assert time.monotonic() - t < 5
    assert all(c.status is ChunkStatus.FAILED and "shutting down" in (c.error or "") for c in stopped.chunks)
