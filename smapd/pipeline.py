"""One file through the flow: decode -> chunk -> transcribe chunks in parallel -> merge.

Knows nothing of the spool or of settings: the caller hands in plain options and a started pool.
The stages overlap: chunks go to the pool as soon as the VAD has heard past them, so the workers
start on the first chunk while the rest of the file is still being analysed; there is no separate
language detection pass (each chunk detects its language from its own encoder pass, see ``_Languages``).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from smapd import audio, chunking
from smapd.chunkstore import Checkpoints, NoCheckpoints
from smapd.engine import SWITCH_PROBABILITY, SWITCH_SPEECH_SECONDS, DecodeOptions
from smapd.models import Chunk, ChunkResult, ChunkStatus, Segment, Transcript, Word
from smapd.pool import Pool
from smapd.worker import TranscribeRequest


@dataclass(frozen=True)
class PipelineOptions:
    language: str = "auto"  # or a code: then no detection
    task: str = "transcribe"
    beam_size: int = 5
    vad: bool = True  # silence-aware chunks; False = SMAP's fixed cuts
    chunk_seconds: float = 30.0
    max_seconds: float = float("inf")
    pack: bool = True  # join a chunk's live stretches without the long pauses (fewer encoder passes)
    # profiles (issue 11): custom vocabulary and how the language is detected
    initial_prompt: str = ""
    hotwords: str = ""
    language_mode: str = "chunk"  # "chunk": each chunk may leave the file's language; "file": one language


@dataclass(frozen=True)
class Progress:
    """What the pipeline reports as it goes (for progress bars and the daemon's status)."""

    kind: str  # "planned" | "started" | "finished"
    total: int  # chunks known so far (final from "planned" on)
    done: int
    chunk: Chunk | None = None
    result: ChunkResult | None = None
    worker: str | None = None
    duration: float = 0.0  # the file's audio seconds (progress in audio time: done chunks over this)
    resumed: float = 0.0  # ("planned") audio seconds of the chunks taken from checkpoints


def language_prior(results: Iterable[ChunkResult]) -> str | None:
    """The language ``results`` agree on (the prior a chunk made elsewhere is decoded with)."""
    vote = _Languages()
    for r in results:
        vote.add(r)
    return vote.prior()


class _Languages:
    """The file's language as the chunks report theirs: a vote weighted by speech and probability.

    A chunk is decoded with the vote's leader as its prior and may leave it only when its own
    detector is sure (engine.SWITCH_*), so a recording that changes language is followed while a
    short or unsure chunk keeps the file's language. Chunks that started before any vote existed
    and were unsure are re-decoded in the final language.
    """

    def __init__(self) -> None:
        self._votes: dict[str, float] = {}
        self._lock = threading.Lock()

    def prior(self) -> str | None:
        with self._lock:
            return max(self._votes, key=self._votes.__getitem__) if self._votes else None

    def add(self, result: ChunkResult) -> None:
        if result.language is not None:
            code, p = result.language
            with self._lock:
                self._votes[code] = self._votes.get(code, 0.0) + p * _speech_seconds(result.chunk)

    def final(self, results: Iterable[ChunkResult]) -> tuple[str | None, float | None]:
        """The winner and the mean detector probability of the chunks decoded in it."""
        code = self.prior()
        probs = [r.language[1] for r in results if r.language is not None and r.language[0] == code]
        return code, (round(float(np.mean(probs)), 4) if probs else None)


def _speech_seconds(chunk: Chunk) -> float:
    return sum(e - s for s, e in chunk.speech)


def _unsure(result: ChunkResult) -> bool:
    return result.language is not None and (
        result.language[1] < SWITCH_PROBABILITY or _speech_seconds(result.chunk) < SWITCH_SPEECH_SECONDS)


def _window(chunk: Chunk, samples: Callable[[float, float], np.ndarray]) -> tuple[np.ndarray, tuple]:
    """The chunk's audio with its pieces joined, and its speech spans in that joined time."""
    parts, speech, at = [], [], 0.0
    for a, b in chunk.spans:
        parts.append(samples(a, b))
        speech += [(round(max(s, a) - a + at, 3), round(min(e, b) - a + at, 3)) for s, e in chunk.speech
                   if e > a and s < b]
        at += len(parts[-1]) / audio.RATE
    return (np.concatenate(parts) if len(parts) > 1 else parts[0]), tuple(speech)


def _to_file_time(chunk: Chunk) -> Callable[[float], float]:
    """Maps a time in the chunk's joined window back to file time."""
    spans = chunk.spans
    starts = np.cumsum([0.0] + [b - a for a, b in spans])

    def convert(t: float) -> float:
        k = max(0, min(len(spans) - 1, int(np.searchsorted(starts, t, side="right")) - 1))
        return round(min(spans[k][0] + t - starts[k], spans[k][1]), 3)

    return convert


def _shift(segment: Segment, convert: Callable[[float], float]) -> Segment:
    words = tuple(Word(convert(w.start), convert(w.end), w.text, w.probability) for w in segment.words)
    return Segment(convert(segment.start), convert(segment.end), segment.text, words)


POLL_SECONDS = 1.0  # how often an owner looks for the chunks other nodes make
OWN_AHEAD = 2  # the first chunks not made yet (the one in flight, the next) are the owner's: never offered
TAIL_CHUNKS = 10  # once no more chunks than this are left unoffered, all are offered (see ``top_up``)
SHARE_RECHECK_SECONDS = 10.0  # how often a long job that no node could help asks again


def run(path: Path, pool: Pool, options: PipelineOptions, *, job: str | None = None, key: str | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        checkpoints: Checkpoints | None = None) -> Transcript:
    """Transcribe one file on a started pool. A transcript whose chunks all failed has outcome FAILED.

    With ``checkpoints`` (the daemon), chunks an earlier attempt or another node made are not made
    again, the plan of an earlier attempt is reused, every chunk made here is kept as it finishes,
    and a long file's chunks are offered to other nodes.

    Raises:
        PermanentJobError: the input cannot be decoded (with a one-sentence reason).
    """
    job = job or path.name
    key = key or job  # the pool's name for this job (fair queueing, cancelling)
    log = logger.bind(job=job)
    notify = on_progress or (lambda p: None)
    store: Checkpoints = checkpoints or NoCheckpoints()
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    decoded = audio.decode(path, max_seconds=options.max_seconds)
    audio.level_speech(decoded.samples)
    timings["decode_seconds"] = round(time.monotonic() - t0, 3)
    if decoded.warning:
        log.warning("{}: {}", job, decoded.warning)

    forced = None if options.language == "auto" else options.language
    languages = _Languages()
    chunks: list[Chunk] = []
    done = 0

    def request(chunk: Chunk, language: str | None = None) -> Callable[[], TranscribeRequest | None]:
        def build() -> TranscribeRequest | None:  # when a slot takes it: the vote so far is the prior
            if language is None and not store.take(chunk):
                return None  # another node makes it
            prior = language or forced or languages.prior()
            window, speech = _window(chunk, decoded.float32)
            return TranscribeRequest(window, decode_options(options, prior, follow=language is None and forced is None),
                                     speech)
        return build

    early: list[tuple[Chunk, str]] | None = []  # chunks that started before the plan was complete
    lock = threading.Lock()

    def started(chunk: Chunk, worker: str) -> None:
        with lock:
            if early is not None:  # say "[1/14]", not "[1/1]": wait until the total is known
                early.append((chunk, worker))
                return
        log.info("[{}/{}] Transcribing chunk {} ({:.1f}-{:.1f} s) on {}", chunk.index, len(chunks), chunk.index,
                 chunk.start, chunk.end, worker)
        notify(Progress("started", len(chunks), done, chunk=chunk, worker=worker,
                        duration=decoded.info.duration))

    saved, plan = store.saved(), store.saved_plan()
    shared = store.share(decoded.info.duration, options.chunk_seconds)
    results: dict[int, ChunkResult] = {}
    arrivals: queue.SimpleQueue[tuple[Chunk, ChunkResult | None]] = queue.SimpleQueue()

    def submit(chunk: Chunk) -> None:
        fut = pool.submit(key, chunk, request(chunk), on_start=started)
        fut.add_done_callback(lambda f: arrivals.put((chunk, _voted(_result(f, chunk)))))

    def _voted(result: ChunkResult | None) -> ChunkResult | None:
        if result is not None:
            languages.add(result)  # at once: the chunks that start next have it as their prior
        return result

    offers = _Offers(store, decoded, options, results, log, job, shared)

    t1 = time.monotonic()
    for chunk in plan if plan is not None else _plan(decoded, options):
        if not chunks:
            timings["first_chunk_seconds"] = round(time.monotonic() - t0, 3)
        chunks.append(chunk)
        kept = saved.get(chunk.index)
        if kept is not None and kept.chunk == chunk and kept.status is ChunkStatus.OK:
            results[chunk.index] = kept  # made before: by an earlier attempt or another node
            languages.add(kept)
            continue
        submit(chunk)
        offers.add(chunk)
    offers.planned = True
    if plan is None:
        store.planned(chunks)
    timings["chunk_seconds"] = round(time.monotonic() - t1, 3)  # VAD and cutting, overlapped with decoding
    speech = round(sum(_speech_seconds(c) for c in chunks), 3)
    log.info("{}: {:.1f} s of audio, {:.1f} s of speech in {} chunks{}", job, decoded.info.duration, speech,
             len(chunks), ", offered to other nodes" if offers.sharing else "")
    if results:
        makers = sorted({_maker(r) for r in results.values()})
        log.info("{}: resumed {} of {} chunks from checkpoints (made by {})", job, len(results), len(chunks),
                 ", ".join(makers))
    done = len(results)
    notify(Progress("planned", len(chunks), done, duration=decoded.info.duration,
                    resumed=sum(c.duration for c in chunks if c.index in results)))
    with lock:
        waiting, early = early or [], None
    for chunk, worker in waiting:
        started(chunk, worker)

    by_index = {c.index: c for c in chunks}
    pending: set[int] = set()  # taken by other nodes: their results come through ``store``
    try:
        polled = time.monotonic()
        while len(results) < len(chunks):
            try:
                item: tuple[Chunk, ChunkResult | None] | None = arrivals.get(
                    timeout=POLL_SECONDS if pending or offers.waiting else None)
            except queue.Empty:
                item = None
            if item is not None and item[1] is None:
                pending.add(item[0].index)
            got = [store.save(item[1])] if item is not None and item[1] is not None else []
            offers.top_up()
            if pending and pool.closing:  # shutting down: stop waiting for other nodes
                for index in sorted(pending):
                    arrivals.put((by_index[index], _cancelled(by_index[index])))
                pending.clear()
            if pending and time.monotonic() - polled >= POLL_SECONDS:  # look in the spool once a second
                polled = time.monotonic()
                came, redo = store.arrived(pending)
                got += came
                for r in came:
                    languages.add(r)
                for index in redo:
                    pending.discard(index)
                    submit(by_index[index])
            for r in got:
                if r.chunk.index in results:
                    continue
                pending.discard(r.chunk.index)
                results[r.chunk.index] = r
                done += 1
                _log_result(log, r, len(chunks), done)
                notify(Progress("finished", len(chunks), done, chunk=r.chunk, result=r,
                                duration=decoded.info.duration))
        language, probability = (forced, None) if forced else languages.final(results.values())
        # Unsure chunks decoded in another language than the file's (e.g. before any vote): again.
        again = {pool.submit(key, r.chunk, request(r.chunk, language), on_start=started): r.chunk
                 for r in results.values() if not forced and language and r.status is ChunkStatus.OK
                 and r.language is not None and r.language[0] != language and _unsure(r)}
        for fut in as_completed(again):
            result = _result(fut, again[fut])
            if result is not None and result.status is ChunkStatus.OK:
                log.info("[{}/{}] decoded again in {}", result.chunk.index, len(chunks), language)
                results[result.chunk.index] = store.save(result)
    finally:
        pool.cancel_job(key)
    timings["transcribe_seconds"] = round(time.monotonic() - t1, 3)

    ordered = tuple(results[c.index] for c in chunks)
    if language:
        log.info("{}: language {} (probability {})", job, language, probability)
    segments = tuple(_shift(s, _to_file_time(r.chunk)) for r in ordered for s in r.segments)
    transcript = Transcript(segments=segments, chunks=ordered, language=language, language_probability=probability,
                            audio=decoded.info, speech_seconds=speech, timings=timings, warning=decoded.warning)
    if not chunks:
        log.info("{}: no speech found", job)
    return transcript


def decode_options(options: PipelineOptions, prior: str | None, *, follow: bool) -> DecodeOptions:
    """What a chunk is decoded with: the job's options and the language prior (``follow``: the chunk
    may leave it when its own detector is sure)."""
    return DecodeOptions(language=prior, task=options.task, beam_size=options.beam_size,
                         follow_language=follow and options.language_mode == "chunk",
                         initial_prompt=options.initial_prompt or None, hotwords=options.hotwords or None)


def _maker(r: ChunkResult) -> str:
    m = r.made_by or {}
    return f"{m.get('node')} " + (f"attempt {m.get('attempt')}" if m.get("attempt") else "as helper")


def _plan(decoded: audio.Decoded, options: PipelineOptions) -> Iterable[Chunk]:
    if not options.vad:
        return chunking.fixed_chunks(decoded.info.duration, options.chunk_seconds)
    if options.pack:
        return chunking.stream_chunks(decoded.samples, options.chunk_seconds)
    return chunking.silence_chunks(decoded.samples, options.chunk_seconds)


def _cancelled(chunk: Chunk) -> ChunkResult:
    """A chunk the pool never made because it was shutting down (daemon stop): a gap, not a crash."""
    return ChunkResult(chunk=chunk, status=ChunkStatus.FAILED, attempts=0, seconds=0.0,
                       error="cancelled: smapd was shutting down")


def _result(fut: Future, chunk: Chunk) -> ChunkResult | None:
    """The chunk's result; None when another node makes it."""
    return _cancelled(chunk) if fut.cancelled() else fut.result()


class _Offers:
    """Which of a job's chunks are offered to other nodes, and when (the job's side of sharing).

    A few chunks are kept on offer (``store.room``), taken from the end of the file, so audio is
    written mostly for chunks that helpers make; the owner's next ``OWN_AHEAD`` are never offered.
    """

    def __init__(self, store: Checkpoints, decoded: audio.Decoded, options: PipelineOptions,
                 results: dict[int, ChunkResult], log: Any, job: str, sharing: bool) -> None:
        self.store, self.decoded, self.options, self.results, self.log, self.job = (
            store, decoded, options, results, log, job)
        self.sharing, self.asked = sharing, time.monotonic()  # whether to offer, and when that was decided
        self.unoffered: list[Chunk] = []  # not offered yet, in file order (the last ones go first)
        self.planned = False  # the plan is complete (the job's last chunks are known)
        self.topped = 0.0

    @property
    def waiting(self) -> bool:
        """Chunks that may still be offered: the owner's loop wakes once a second for them."""
        return len(self.unoffered) > OWN_AHEAD

    def add(self, chunk: Chunk) -> None:
        self.unoffered.append(chunk)
        self.top_up()

    def top_up(self) -> None:
        """Offer what ``store.room`` allows, at most once every POLL_SECONDS."""
        while self.unoffered and self.unoffered[0].index in self.results:  # made by now: nobody needs it
            self.unoffered.pop(0)
        now = time.monotonic()
        if not self.waiting or now - self.topped < POLL_SECONDS:
            return
        self.topped = now
        if not self.sharing:  # no other node was up when the job started: look again now and then
            if now - self.asked < SHARE_RECHECK_SECONDS:
                return
            self.sharing, self.asked = self.store.share(self.decoded.info.duration, self.options.chunk_seconds), now
            if not self.sharing:
                return
            self.log.info("{}: another node is up; offering the chunks not started yet", self.job)
        # The last TAIL_CHUNKS not offered go on offer at once: if the owner dies now, its helpers make
        # them while its lease runs out, and the takeover makes little more than what was in flight.
        tail = self.planned and len(self.unoffered) <= TAIL_CHUNKS
        for _ in range(len(self.unoffered) if tail else self.store.room()):
            if not self.waiting:
                break
            chunk = self.unoffered.pop()
            self.store.offer(chunk, *_window(chunk, self.decoded.int16))


def _log_result(log: Any, result: ChunkResult, total: int, done: int) -> None:
    if result.status is ChunkStatus.OK:
        log.info("[{}/{}] Completed in {:.1f}s: {} chars", result.chunk.index, total, result.seconds, result.chars)
    else:
        log.error("[{}/{}] Failed after {} attempts: {}", result.chunk.index, total, result.attempts, result.error)
    log.info("Progress: {}/{} ({:.1f}%)", done, total, 100.0 * done / total)
