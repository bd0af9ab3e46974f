"""Leaf data carried between the stages: states, chunks, segments, transcripts.

Frozen dataclasses only; no behaviour beyond small derived properties. Times are seconds from the
start of the input file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class JobState(str, Enum):
    """Where a dropped file is. In the spool each state is also a directory."""

    INBOX = "inbox"
    PROCESSING = "processing"
    ARCHIVE = "archive"
    FAILED = "failed"


class ChunkStatus(str, Enum):
    OK = "ok"
    FAILED = "failed"


class Outcome(str, Enum):
    """How a job ended."""

    SUCCESS = "success"  # every chunk transcribed (or no speech at all)
    PARTIAL = "partial"  # some chunks failed; outputs written with the gaps marked
    FAILED = "failed"  # nothing transcribed, or the input is bad


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    text: str
    probability: float = 0.0


@dataclass(frozen=True)
class Segment:
    """One stretch of recognised text, already shifted to file time."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A slice of the decoded audio that one engine slot transcribes in one go.

    ``speech`` lists the VAD speech spans inside the chunk (file time), used to place cues when the
    engine gives no timestamps of its own.
    """

    index: int
    start: float
    end: float
    speech: tuple[tuple[float, float], ...] = ()
    # The stretches (file time) the engine's window is made of, joined without what lies between
    # (long pauses): fewer 30 s encoder passes per file. Empty: the whole of [start, end].
    pieces: tuple[tuple[float, float], ...] = ()

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def spans(self) -> tuple[tuple[float, float], ...]:
        """The stretches of file time that are decoded: ``pieces``, or the whole chunk."""
        return self.pieces or ((self.start, self.end),)


@dataclass(frozen=True)
class DecodeSignals:
    """How sure the decoder was of a chunk (Whisper's own fallback signals), for the report."""

    avg_logprob: float  # mean log-probability of the chosen tokens
    compression_ratio: float  # of the text (gzip); > 2.4 means the decoder looped
    no_speech_prob: float  # Whisper's probability that the window holds no speech
    temperature: float  # 0.0 = the beam/greedy decode was kept, higher = a sampling fallback
    beam_size: int  # of the decode that was kept
    windows: int = 1  # decoder windows run (re-decodes of speech the first pass skipped add one each)


@dataclass(frozen=True)
class ChunkResult:
    """What happened to one chunk: its segments, or the error that ended its last attempt."""

    chunk: Chunk
    status: ChunkStatus
    attempts: int
    seconds: float
    segments: tuple[Segment, ...] = ()
    error: str | None = None
    worker: str | None = None
    cpu_seconds: float = 0.0
    language: tuple[str, float] | None = None  # what the chunk was decoded in, and the detector's probability
    signals: DecodeSignals | None = None
    rss_mb: float = 0.0  # the worker's resident memory when it returned this chunk (0: unknown)
    crashed: bool = False  # failed because its worker was killed or hung (not an engine error)
    # issue 10: who made it ({"node", "attempt", "helper"}), whether it came from a checkpoint of an
    # earlier attempt or another node (``resumed``), and whether a node that died had started it (``redone``)
    made_by: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    resumed: bool = False
    redone: bool = False

    @property
    def chars(self) -> int:
        return sum(len(s.text) for s in self.segments)

    @property
    def short_error(self) -> str:
        """Why the chunk failed, on one line of at most 200 characters (for gap markers and reports)."""
        return " ".join((self.error or "failed").split())[:200]


@dataclass(frozen=True)
class AudioInfo:
    """What decoding learned about the input."""

    duration: float  # seconds of decoded audio
    sample_rate: int  # of the source stream
    channels: int  # of the source stream
    codec: str
    container: str


@dataclass(frozen=True)
class Transcript:
    """The merged result of one file."""

    segments: tuple[Segment, ...]
    chunks: tuple[ChunkResult, ...]
    language: str | None
    language_probability: float | None
    audio: AudioInfo
    speech_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    warning: str | None = None  # e.g. decoding stopped early on a truncated file

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())

    @property
    def gaps(self) -> list[ChunkResult]:
        """The failed chunks, in time order."""
        return sorted((c for c in self.chunks if c.status is ChunkStatus.FAILED), key=lambda c: c.chunk.start)

    @property
    def chunks_ok(self) -> int:
        return sum(1 for c in self.chunks if c.status is ChunkStatus.OK)

    @property
    def success_rate(self) -> float:
        return 100.0 * self.chunks_ok / len(self.chunks) if self.chunks else 100.0

    @property
    def outcome(self) -> Outcome:
        if not self.chunks or self.chunks_ok == len(self.chunks):
            return Outcome.SUCCESS
        return Outcome.PARTIAL if self.chunks_ok else Outcome.FAILED
