"""One file through the flow: decode -> chunk -> transcribe chunks in parallel -> merge.

Knows nothing of the spool or of settings: the caller hands in plain options and a started pool.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loguru import logger

from smapd import audio
from smapd.engine import DecodeOptions
from smapd.errors import ChunkError
from smapd.models import Chunk, ChunkResult, ChunkStatus, Segment, Transcript, Word
from smapd.pool import Pool


@dataclass(frozen=True)
class PipelineOptions:
    language: str = "auto"  # or a code: then no detection
    task: str = "transcribe"
    beam_size: int = 5
    vad: bool = True  # silence-aware chunks; False = SMAP's fixed cuts
    chunk_seconds: float = 30.0
    max_seconds: float = float("inf")
    # profiles (issue 11): custom vocabulary and when the language is detected
    initial_prompt: str = ""
    hotwords: str = ""
    language_mode: str = "file"  # "file": detected once per file; "chunk": each chunk detects its own


@dataclass(frozen=True)
class Progress:
    """What the pipeline reports as it goes (for progress bars and the daemon's status)."""

    kind: str  # "planned" | "started" | "finished"
    total: int
    done: int
    chunk: Chunk | None = None
    result: ChunkResult | None = None
    worker: str | None = None


def _shift(segment: Segment, offset: float) -> Segment:
    return Segment(round(segment.start + offset, 3), round(segment.end + offset, 3), segment.text,
                   tuple(Word(round(w.start + offset, 3), round(w.end + offset, 3), w.text, w.probability)
                         for w in segment.words))


def run(path: Path, pool: Pool, options: PipelineOptions, *, job: str | None = None, key: str | None = None,
        on_progress: Callable[[Progress], None] | None = None) -> Transcript:
    """Transcribe one file on a started pool. A transcript whose chunks all failed has outcome FAILED.

    Raises:
        PermanentJobError: the input cannot be decoded (with a one-sentence reason).
    """
    job = job or path.name
    key = key or job  # the pool's name for this job (fair queueing, cancelling)
    log = logger.bind(job=job)
    notify = on_progress or (lambda p: None)
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    decoded = audio.decode(path, max_seconds=options.max_seconds)
    audio.level_speech(decoded.samples)
    timings["decode_seconds"] = round(time.monotonic() - t0, 3)
    if decoded.warning:
        log.warning("{}: {}", job, decoded.warning)

    t1 = time.monotonic()
    if options.vad:
        chunks = audio.silence_chunks(decoded.samples, options.chunk_seconds)
    else:
        chunks = audio.fixed_chunks(decoded.info.duration, options.chunk_seconds)
    timings["chunk_seconds"] = round(time.monotonic() - t1, 3)
    speech = round(sum(e - s for c in chunks for s, e in c.speech), 3)
    log.info("{}: {:.1f} s of audio, {:.1f} s of speech in {} chunks", job, decoded.info.duration, speech,
             len(chunks))
    notify(Progress("planned", len(chunks), 0))

    language, probability = (None if options.language == "auto" else options.language), None
    # One chunk: it detects the language from its own encoder pass (no second pass); otherwise
    # detect once on the file's first 30 s of speech and decode every chunk in that language.
    if len(chunks) > 1 and language is None and options.language_mode == "file":
        t2 = time.monotonic()
        try:
            language, probability = pool.detect_language(key, audio.speech_prefix(decoded, chunks)).result()
            log.info("{}: language {} (probability {:.2f})", job, language, probability)
        except ChunkError as e:
            log.warning("{}: language detection failed ({}); each chunk detects its own", job, e)
        timings["detect_seconds"] = round(time.monotonic() - t2, 3)

    decode_options = DecodeOptions(language=language, task=options.task, beam_size=options.beam_size,
                                   initial_prompt=options.initial_prompt or None, hotwords=options.hotwords or None)
    total = len(chunks)

    def started(chunk: Chunk, worker: str) -> None:
        log.info("[{}/{}] Transcribing chunk {} ({:.1f}-{:.1f} s) on {}", chunk.index, total, chunk.index,
                 chunk.start, chunk.end, worker)
        notify(Progress("started", total, done, chunk=chunk, worker=worker))

    t3 = time.monotonic()
    futures: dict[Future, Chunk] = {}
    for chunk in chunks:
        fut = pool.transcribe(key, chunk, lambda c=chunk: decoded.float32(c.start, c.end), decode_options,
                              on_start=started)
        futures[fut] = chunk
    results: dict[int, ChunkResult] = {}
    done = 0
    try:
        for fut in as_completed(futures):
            if fut.cancelled():  # the pool is shutting down (daemon stop): a gap, not a crash
                result = ChunkResult(chunk=futures[fut], status=ChunkStatus.FAILED, attempts=0, seconds=0.0,
                                     error="cancelled: smapd was shutting down")
            else:
                result = fut.result()
            done += 1
            results[result.chunk.index] = result
            if result.status is ChunkStatus.OK:
                log.info("[{}/{}] Completed in {:.1f}s: {} chars", result.chunk.index, total, result.seconds,
                         result.chars)
            else:
                log.error("[{}/{}] Failed after {} attempts: {}", result.chunk.index, total, result.attempts,
                          result.error)
            log.info("Progress: {}/{} ({:.1f}%)", done, total, 100.0 * done / total)
            notify(Progress("finished", total, done, chunk=result.chunk, result=result))
    finally:
        pool.cancel_job(key)
    timings["transcribe_seconds"] = round(time.monotonic() - t3, 3)

    ordered = tuple(results[c.index] for c in chunks)
    if language is None and ordered and ordered[0].language:
        language, probability = ordered[0].language
        log.info("{}: language {} (probability {:.2f})", job, language, probability)
    segments = tuple(_shift(s, r.chunk.start) for r in ordered for s in r.segments)
    transcript = Transcript(segments=segments, chunks=ordered, language=language,
                            language_probability=round(probability, 4) if probability is not None else None,
                            audio=decoded.info, speech_seconds=speech, timings=timings,
                            warning=decoded.warning)
    if not chunks:
        log.info("{}: no speech found", job)
    return transcript
