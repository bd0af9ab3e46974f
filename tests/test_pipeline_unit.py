"""Fast unit tests of the pipeline's logic: packed chunks, time mapping, per-chunk languages.

A fake pool stands in for the workers (the real ones run in tests/test_transcribe.py and
tests/test_language.py); the audio is a real clip, the VAD probabilities synthetic where the
test is about cutting.
"""
from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smapd import audio, chunking, pipeline
from smapd.models import Chunk, ChunkResult, ChunkStatus, Segment, Word
from smapd.worker import TranscribeRequest

DATA = Path(__file__).parent / "data"
STEP = chunking.FRAME / audio.RATE


def probs(spans: list[tuple[float, float]], duration: float, quiet: float = 0.0) -> np.ndarray:
    """Synthetic VAD frame probabilities: sure speech inside ``spans``, ``quiet`` elsewhere."""
    t = np.arange(int(duration / STEP)) * STEP
    inside = np.zeros(len(t), dtype=bool)
    for s, e in spans:
        inside |= (t >= s) & (t < e)
    return np.where(inside, 0.95, quiet).astype(np.float32)


def sentences(n: int, pause: float, long_every: int = 0, long_pause: float = 6.0) -> list[tuple[float, float]]:
    spans, t = [], 1.0
    for i in range(n):
        spans.append((t, t + 4.0))
        t += 4.0 + (long_pause if long_every and i % long_every == long_every - 1 else pause)
    return spans


def test_packed_chunks_drop_long_pauses_and_never_cut_speech() -> None:
    spans = sentences(20, 0.8, long_every=3)
    duration = spans[-1][1] + 1.0
    chunks, resume = chunking.packed_chunks(probs(spans, duration), 30.0)
    assert resume == pytest.approx(len(probs(spans, duration)) * STEP)
    for c in chunks:
        assert sum(b - a for a, b in c.pieces) <= 30.0 + 1e-6
        for (_, b), (a, _) in zip(c.pieces, c.pieces[1:]):
            assert a - b >= chunking.PACK_GAP, "only long pauses are left out"
    kept = [(a, b) for c in chunks for a, b in c.pieces]
    for s, e in spans:  # every sentence lies whole inside one piece
        assert any(a <= s and e <= b for a, b in kept), (s, e)
    # a pause of CHUNK_BREAK seconds always ends a chunk
    gap = probs([(1.0, 20.0), (20.0 + chunking.CHUNK_BREAK, 30.0 + chunking.CHUNK_BREAK)], 31.0 + chunking.CHUNK_BREAK)
    assert len(chunking.packed_chunks(gap, 30.0)[0]) == 2
    # the windows hold more speech than cutting the plain audio does
    assert len(chunks) < len(chunking.silence_chunks(np.zeros(int(duration * audio.RATE), dtype=np.int16), 30.0,
                                                   probs=probs(spans, duration)))


def test_packed_chunks_keep_quiet_speech_and_skip_noise_only_audio() -> None:
    p = probs([(1.0, 8.0)], 40.0)
    p[int(14 / STEP):int(20 / STEP)] = 0.2  # a soft voice: never above the VAD threshold
    chunks, _ = chunking.packed_chunks(p, 30.0)
    assert any(a <= 14.5 and 19.5 <= b for c in chunks for a, b in c.pieces), "the quiet stretch was dropped"
    assert chunking.packed_chunks(probs([], 60.0, quiet=0.3), 30.0)[0] == []


def test_a_partial_analysis_returns_only_chunks_that_later_audio_cannot_change() -> None:
    spans = sentences(30, 1.0, long_every=4)
    duration = spans[-1][1] + 1.0
    p = probs(spans, duration)
    whole, _ = chunking.packed_chunks(p, 30.0)
    half = int(len(p) / 2)
    early, resume = chunking.packed_chunks(p[:half], 30.0, end=half * STEP, final=False)
    later, _ = chunking.packed_chunks(p, 30.0, origin=resume)
    assert early and [c.pieces for c in early] == [c.pieces for c in whole[:len(early)]]
    assert [c.pieces for c in early + later] == [c.pieces for c in whole]


def test_window_joins_pieces_and_times_map_back_to_the_file() -> None:
    chunk = Chunk(1, 10.0, 40.0, speech=((10.5, 14.0), (30.0, 38.0)), pieces=((10.0, 15.0), (29.0, 40.0)))
    samples = np.arange(50 * audio.RATE, dtype=np.float32)
    window, speech = pipeline._window(chunk, lambda a, b: samples[int(a * audio.RATE):int(b * audio.RATE)])
    assert len(window) == 16 * audio.RATE
    assert window[5 * audio.RATE] == samples[29 * audio.RATE], "the second piece follows the first"
    assert speech == ((0.5, 4.0), (6.0, 14.0))
    convert = pipeline._to_file_time(chunk)
    assert convert(0.5) == 10.5 and convert(6.0) == 30.0 and convert(15.9) == 39.9
    seg = pipeline._shift(Segment(6.0, 7.0, "hi", (Word(6.0, 7.0, "hi"),)), convert)
    assert (seg.start, seg.end, seg.words[0].start) == (30.0, 31.0, 30.0)


class FakePool:
    """``submit`` answers at once: the language comes from ``script(chunk, request)``."""

    closing = False  # smapd.pool.Pool.closing

    def __init__(self, script: Any) -> None:
        self.script = script
        self.requests: list[tuple[int, TranscribeRequest]] = []

    def submit(self, key: str, chunk: Chunk, request: Any, on_start: Any = None) -> Future:
        if on_start is not None:
            on_start(chunk, "w1")
        req = request()
        self.requests.append((chunk.index, req))
        language = self.script(chunk, req)
        fut: Future = Future()
        fut.set_result(ChunkResult(chunk, ChunkStatus.OK, 1, 0.1, (Segment(0.0, 1.0, f"{language[0]}-{chunk.index}"),),
                                   language=language))
        return fut

    def cancel_job(self, key: str) -> None:
        pass


def plan(*speech_seconds: float) -> list[Chunk]:
    out, t = [], 0.0
    for i, s in enumerate(speech_seconds, 1):
        out.append(Chunk(i, t, t + 1.0, speech=((t, t + s),)))
        t += 1.0
    return out


def run(monkeypatch: pytest.MonkeyPatch, chunks: list[Chunk], script: Any, language: str = "auto") -> tuple:
    monkeypatch.setattr(pipeline, "_plan", lambda decoded, options: iter(chunks))
    pool = FakePool(script)
    transcript = pipeline.run(DATA / "ljspeech-LJ001-0001.wav", pool, pipeline.PipelineOptions(language=language))  # type: ignore[arg-type]
    return transcript, pool.requests


def test_each_chunk_is_decoded_in_its_own_language_with_the_vote_as_prior(monkeypatch: pytest.MonkeyPatch) -> None:
    said = {1: ("de", 0.95), 2: ("de", 0.9), 3: ("en", 0.97), 4: ("en", 0.96), 5: ("en", 0.99)}
    transcript, requests = run(monkeypatch, plan(20, 20, 20, 20, 25), lambda c, r: said[c.index])
    assert [r.chunks[0].language for r in [transcript]] == [("de", 0.95)]
    assert [c.language[0] for c in transcript.chunks if c.language] == ["de", "de", "en", "en", "en"]
    assert transcript.language == "en"  # 65 s of English speech outvote 40 s of German
    assert requests[0][1].options.language is None  # nothing to go by yet: the chunk detects alone
    assert requests[1][1].options.language == "de" and requests[1][1].options.follow_language
    assert len(requests) == 5, "sure chunks are not decoded twice"


def test_unsure_chunks_decoded_before_the_vote_are_decoded_again_in_the_files_language(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def script(chunk: Chunk, req: TranscribeRequest) -> tuple[str, float]:
        if req.options.language is not None and not req.options.follow_language:
            return (req.options.language, 0.5)  # forced
        return ("cy", 0.4) if chunk.index == 1 else ("en", 0.98)

    transcript, requests = run(monkeypatch, plan(2, 20, 20), script)
    assert transcript.language == "en"
    assert [c.language[0] for c in transcript.chunks if c.language] == ["en", "en", "en"]
    assert [i for i, _ in requests] == [1, 2, 3, 1]
    assert transcript.segments[0].text == "en-1"


def test_a_forced_language_is_never_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    transcript, requests = run(monkeypatch, plan(20, 20), lambda c, r: (r.options.language, 1.0), language="fr")
    assert transcript.language == "fr" and all(r.options.language == "fr" and not r.options.follow_language
                                               for _, r in requests)


def test_progress_and_log_lines_carry_the_final_chunk_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), format="{message}")
    events: list[pipeline.Progress] = []
    monkeypatch.setattr(pipeline, "_plan", lambda decoded, options: iter(plan(20, 20, 20)))
    try:
        pipeline.run(DATA / "ljspeech-LJ001-0001.wav", FakePool(lambda c, r: ("en", 0.99)),  # type: ignore[arg-type]
                     pipeline.PipelineOptions(), on_progress=events.append)
    finally:
        logger.remove(sink)
    assert next(ln for ln in lines if "Transcribing chunk" in ln).startswith("[1/3] Transcribing chunk 1 (")
    assert [e.kind for e in events][:1] == ["planned"] and {e.total for e in events} == {3}
