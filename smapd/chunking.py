"""Where the speech is (Silero VAD, the model faster-whisper bundles) and where to cut it into chunks.

The VAD runs over the int16 buffer in blocks, so the float32 copy it needs never exceeds one block;
``stream_chunks`` yields chunks while the rest of the file is still being analysed.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from smapd.audio import RATE
from smapd.models import Chunk

FRAME = 512  # samples per VAD window (32 ms at 16 kHz)
_VAD_BLOCK = RATE * 600  # VAD in 10-minute blocks: bounded float32 memory


@functools.lru_cache(maxsize=1)
def _vad_model() -> Any:
    from faster_whisper.vad import get_vad_model  # builds a new ONNX session on every call

    return get_vad_model()


def speech_probabilities(samples: np.ndarray) -> np.ndarray:
    """Silero VAD speech probability for every 32 ms frame of the audio."""
    model = _vad_model()
    probs = []
    for start in range(0, len(samples), _VAD_BLOCK):
        block = samples[start:start + _VAD_BLOCK].astype(np.float32) / 32768.0
        block = np.pad(block, (0, (-len(block)) % FRAME))
        probs.append(np.asarray(model(block), dtype=np.float32).reshape(-1))
    return np.concatenate(probs) if probs else np.zeros(0, dtype=np.float32)


def speech_regions(probs: np.ndarray, *, threshold: float = 0.5, min_silence: float = 0.25,
                   min_speech: float = 0.1) -> list[tuple[float, float]]:
    """Stretches of speech (seconds) from frame probabilities, with hysteresis.

    A region starts at a frame >= ``threshold`` and ends after ``min_silence`` seconds below
    ``threshold - 0.15`` (Silero's own rule); regions shorter than ``min_speech`` are dropped.
    """
    step = FRAME / RATE
    low = max(threshold - 0.15, 0.01)
    need_quiet = max(1, int(min_silence / step))
    regions: list[tuple[float, float]] = []
    start = None
    quiet = 0
    for i, p in enumerate(probs):
        if start is None:
            if p >= threshold:
                start, quiet = i, 0
        elif p < low:
            quiet += 1
            if quiet >= need_quiet:
                end = i - quiet + 1
                if (end - start) * step >= min_speech:
                    regions.append((start * step, end * step))
                start = None
        else:
            quiet = 0
    if start is not None and (len(probs) - start) * step >= min_speech:
        regions.append((start * step, len(probs) * step))
    return regions


# --- chunking ----------------------------------------------------------------------------------

def _cut_point(probs: np.ndarray, lo: float, hi: float) -> float:
    """The time in [lo, hi] least likely to be inside speech, preferring later cuts (fuller chunks).

    Probabilities are smoothed over ~1 s so the middle of a long pause scores lower than a short
    dip inside a sentence.
    """
    a, b = int(lo * RATE / FRAME), max(int(lo * RATE / FRAME) + 1, int(hi * RATE / FRAME))
    p = probs[max(0, a - 16):b + 16]
    smooth = np.convolve(p, np.ones(31) / 31, mode="same")[a - max(0, a - 16):][:b - a]
    if len(smooth) == 0:
        return hi
    # Prefer later cuts: fewer, fuller chunks (each costs a full 30 s encoder pass whatever its length).
    score = smooth + 0.15 * (1.0 - np.arange(len(smooth)) / len(smooth))
    return (a + int(np.argmin(score)) + 0.5) * FRAME / RATE


def _live_stretches(probs: np.ndarray, duration: float, *, dead: float = 3.0, quiet: float = 0.05,
                    pad: float = 0.3) -> list[tuple[float, float]]:
    """The audio minus stretches of at least ``dead`` seconds where the VAD hears nothing at all.

    Only near-certain silence is skipped: Silero scores quiet or noisy speech (a babble-noise clip,
    a soft voice) well below its 0.5 threshold, so cutting away everything under 0.5 loses words.
    """
    step = FRAME / RATE
    need = max(1, int(dead / step))
    stretches: list[tuple[float, float]] = []
    start = 0.0
    run = 0
    for i, p in enumerate(np.append(probs, 1.0)):  # sentinel closes a trailing run
        if p < quiet:
            run += 1
            continue
        if run >= need:  # no padding at the file's edges: nothing to protect there
            s_dead = (i - run) * step + (pad if i - run > 0 else 0.0)
            e_dead = i * step - (pad if i < len(probs) else 0.0)
            if s_dead > start:
                stretches.append((start, s_dead))
            start = e_dead
        run = 0
    if start < duration:
        stretches.append((start, duration))
    return [(round(a, 3), round(min(b, duration), 3)) for a, b in stretches if min(b, duration) - a > 0.1]


def silence_chunks(samples: np.ndarray, limit: float, *, probs: np.ndarray | None = None) -> list[Chunk]:
    """Cut the audio into chunks of at most ``limit`` seconds, at the quietest points.

    A file in which the VAD finds no speech at all gives no chunks (nothing to transcribe, nothing
    for Whisper to hallucinate). Otherwise every stretch of audio is covered except long dead
    silences, and each cut falls where speech is least likely (mid-pause), never inside speech
    unless one stretch of speech runs longer than ``limit``.
    """
    duration = len(samples) / RATE
    if probs is None:
        probs = speech_probabilities(samples)
    regions = speech_regions(probs)
    if not regions:
        return []
    live = _live_stretches(probs, duration)
    chunks: list[Chunk] = []
    start = live[0][0] if live else duration
    while start < duration - 0.05:
        end = duration if duration - start <= limit else _cut_point(probs, start + limit / 2, start + limit)
        # A long dead silence ends the chunk: no point decoding it, and Whisper invents text in it.
        gap = next((b for (_, b), (a, _) in itertools.pairwise(live) if start < b < end and a - b > 10.0), None)
        end = gap if gap is not None else end
        # Trim the chunk to live audio: a dead silence at its edges is not worth a decoder's time.
        inside = [(max(a, start), min(b, end)) for a, b in live if b > start and a < end]
        speech = tuple((round(max(a, start), 3), round(min(b, end), 3)) for a, b in regions
                       if b > start and a < end)
        if inside and speech:  # audio without any confident speech is noise: skip it
            chunks.append(Chunk(index=len(chunks) + 1, start=round(inside[0][0], 3),
                                end=round(inside[-1][1], 3), speech=speech))
        later = [a for a, b in live if b > end]
        start = max(end, later[0]) if later else duration
    return chunks


# --- packed chunks, streamed -------------------------------------------------------------------

PACK_GAP = 2.0  # a pause with no voice for longer than this is shortened ...
PACK_PAD = 0.4  # ... to its first and last PACK_PAD seconds (breath, room tone stay in)
CHUNK_BREAK = 10.0  # a pause this long always ends a chunk
_STREAM_BLOCK = FRAME * 960  # VAD ~30 s at a time, so the first chunks start while the rest is analysed


def _pieces(probs: np.ndarray, origin: float, end: float) -> list[tuple[float, float]]:
    """The live stretches of [origin, end] (file time)."""
    return [(round(a + origin, 3), round(b + origin, 3))
            for a, b in _live_stretches(probs[_frames(origin):], end - origin, dead=PACK_GAP, pad=PACK_PAD)]


def _frames(t: float) -> int:
    return round(t * RATE / FRAME)


def packed_chunks(probs: np.ndarray, limit: float, *, origin: float = 0.0, end: float | None = None,
                  final: bool = True) -> tuple[list[Chunk], float]:
    """Chunks of up to ``limit`` seconds of live audio each, from ``origin`` on.

    A chunk is a run of live stretches (``Chunk.pieces``) joined without the long pauses between
    them, so a 30 s window holds up to 30 s of voice rather than 20 s of voice and 10 s of silence:
    a recording needs fewer encoder passes. On the joined audio the cut falls where speech is least
    likely (as in ``silence_chunks``), a removed pause counting as the surest silence; a chunk
    without one confident stretch of speech is noise and is skipped. With ``final=False`` (more
    audio is coming) only chunks that the audio after ``end`` cannot change are returned.

    Returns:
        The chunks (indices from 1) and the file time to resume from.
    """
    end = len(probs) * FRAME / RATE if end is None else end
    pieces = _pieces(probs, origin, end)
    if not final:
        pieces = pieces[:-1]  # the stretch that reaches ``end`` may still grow
    if not pieces:
        return [], (end if final else origin)
    # The joined audio, frame by frame: its VAD probabilities and which file frame each one is.
    where = np.concatenate([np.arange(_frames(a), max(_frames(a) + 1, _frames(b))) for a, b in pieces])
    joined = probs[np.minimum(where, len(probs) - 1)]
    seams = np.flatnonzero(np.diff(where) > 1) + 1  # first joined frame after a removed pause
    # A long silence ends a chunk: what follows is often another speaker, scene or language.
    walls = seams[(where[seams] - where[seams - 1]) * FRAME / RATE >= CHUNK_BREAK]
    smooth = np.convolve(joined, np.ones(31) / 31, mode="same")
    smooth[seams] = -0.05  # a removed pause: the best cut there is
    step = FRAME / RATE
    total, n = len(joined) * step, len(joined)
    regions = [(a + origin, b + origin) for a, b in speech_regions(probs[_frames(origin):_frames(end)])]
    chunks: list[Chunk] = []
    pos = 0
    while pos < n:
        wall = next((int(w) for w in walls if pos < w <= pos + limit / step), None)
        if wall is not None:
            cut = wall
        elif n - pos <= limit / step:
            if not final:
                break
            cut = n
        else:
            lo, hi = pos + int(limit / 2 / step), pos + int(limit / step)
            score = smooth[lo:hi] + 0.3 * (1.0 - np.arange(hi - lo) / (hi - lo))  # prefer fuller windows
            cut = lo + int(np.argmin(score))
        frames = where[pos:cut]
        breaks = np.flatnonzero(np.diff(frames) > 1) + 1
        group = [(round(int(f[0]) * step, 3), round(min((int(f[-1]) + 1) * step, end), 3))
                 for f in np.split(frames, breaks)]
        speech = tuple((round(max(a, s), 3), round(min(b, e), 3)) for s, e in group for a, b in regions
                       if b > s and a < e)
        if speech:
            chunks.append(Chunk(index=len(chunks) + 1, start=group[0][0], end=group[-1][1], speech=speech,
                                pieces=tuple(group)))
        pos = cut
    resume = end if pos >= n and final else float(where[pos]) * step if pos < n else end
    del total
    return chunks, round(resume, 3)


def stream_chunks(samples: np.ndarray, limit: float) -> Iterator[Chunk]:
    """``packed_chunks`` of the whole file, each yielded as soon as the VAD has heard past it."""
    model = _vad_model()
    probs = np.zeros(-(-len(samples) // FRAME), dtype=np.float32)
    origin, index = 0.0, 0
    for start in range(0, len(samples), _STREAM_BLOCK):
        block = samples[start:start + _STREAM_BLOCK].astype(np.float32) / 32768.0
        block = np.pad(block, (0, (-len(block)) % FRAME))
        probs[start // FRAME:start // FRAME + len(block) // FRAME] = np.asarray(model(block)).reshape(-1)
        done = start + _STREAM_BLOCK >= len(samples)
        heard = min(len(samples), start + _STREAM_BLOCK) / RATE
        chunks, origin = packed_chunks(probs[:-(-min(len(samples), start + _STREAM_BLOCK) // FRAME)], limit,
                                       origin=origin, end=heard, final=done)
        for chunk in chunks:
            index += 1
            yield Chunk(index=index, start=chunk.start, end=chunk.end, speech=chunk.speech, pieces=chunk.pieces)


def fixed_chunks(duration: float, limit: float) -> list[Chunk]:
    """SMAP's fixed cuts every ``limit`` seconds (SMAPD_VAD=false): cuts may fall inside words."""
    out: list[Chunk] = []
    start = 0.0
    while start < duration - 0.05:
        end = min(duration, start + limit)
        out.append(Chunk(index=len(out) + 1, start=round(start, 3), end=round(end, 3), speech=((start, end),)))
        start = end
    return out
