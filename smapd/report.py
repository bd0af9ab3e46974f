"""The job report (``<stem>.report.json`` in outbox/, ``<name>.report.json`` in failed/): one schema for
every way a job ends, built by one function, ``build``.

Every key is always present, null when unknown; a failure that happened before any audio was read
(a refused entry, a bad file, a claim given up after MAX_ATTEMPTS) has the same keys as a success,
with empty ``chunks``/``outputs`` and null measurements.

- ``report_version`` (int): 1; bumped only when a field changes meaning or goes away.
- ``smapd`` (str): version of smapd that wrote the report. ``host`` (str): hostname of the node.
- ``created`` (str): UTC time the report was built, ISO 8601, e.g. ``2025-01-31T12:00:00+00:00``.
- ``outcome`` (str): ``success`` (every chunk transcribed, or no speech), ``partial`` (some chunks
  failed; outputs written with the gaps marked) or ``failed`` (nothing transcribed, or bad input).
- ``error`` (str|null): one readable sentence saying what went wrong; null on success.
- ``input``: see ``InputInfo``. ``language``: see ``LanguageInfo``. ``engine``: see ``EngineInfo``.
- ``chunks`` (list, by index): see ``ChunkEntry``. ``totals``: see ``Totals``. ``job``: see ``JobInfo``.
- ``outputs``: file suffix -> file name, e.g. ``{".srt": "talk.srt"}``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from smapd import __version__
from smapd.models import ChunkStatus, Outcome, Transcript

REPORT_VERSION = 1


@dataclass(frozen=True)
class InputInfo:
    """The input file: ``name`` (its original name, undecodable bytes as U+FFFD), ``size`` (bytes),
    ``sha256`` (hex), ``duration`` (seconds of decoded audio), ``codec``, ``container``,
    ``sample_rate`` (Hz) and ``channels`` of the source audio stream, and ``raw``: the name's bytes
    when it is not valid UTF-8 (so the exact name is never lost), else null."""

    name: str
    size: int | None = None
    sha256: str | None = None
    duration: float | None = None
    codec: str | None = None
    container: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    raw: tuple[int, ...] | None = None


@dataclass(frozen=True)
class LanguageInfo:
    """``code`` (e.g. ``en``) and ``probability`` (0-1) of the detected or forced language."""

    code: str | None = None
    probability: float | None = None


@dataclass(frozen=True)
class EngineInfo:
    """How the job was transcribed: engine ``name``, ``model``, ``device``, ``compute_type``,
    ``workers``, ``cpu_threads``, ``beam_size``, ``chunk_seconds``, ``chunk_timeout``, ``vad``, and
    the ``command`` of the command engine. All null where no engine ran (the spool's own failures)."""

    name: str | None = None
    model: str | None = None
    device: str | None = None
    compute_type: str | None = None
    workers: int | None = None
    cpu_threads: int | None = None
    beam_size: int | None = None
    chunk_seconds: float | None = None
    chunk_timeout: float | None = None
    vad: bool | None = None
    command: str | None = None


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk: ``index``, ``start``/``end`` (s), ``attempts``, ``seconds`` (wall seconds the pool
    spent on it), ``status`` (``ok``/``failed``), ``chars`` (characters transcribed), ``error`` (why
    its last attempt failed, or null), ``worker`` (the engine slot that ran it), ``decoded_seconds``
    (audio the engine heard: long pauses inside the chunk are left out), ``language`` and
    ``language_probability`` (what this chunk was decoded in: mixed-language files change it), and
    ``signals`` (the decoder's own confidence: ``avg_logprob``, ``compression_ratio``,
    ``no_speech_prob``, ``temperature``, ``beam_size``, ``windows``; null when it failed),
    ``made_by`` (``node``, ``attempt`` of the job, ``helper``: true when another node's idle slot
    made it; null outside the daemon), ``resumed`` (taken from a checkpoint that an earlier attempt
    or a helper made before this attempt began) and ``redone`` (a node that died had started it)."""

    index: int
    start: float | None
    end: float | None
    attempts: int
    seconds: float | None
    status: str
    chars: int
    error: str | None
    worker: str | None
    decoded_seconds: float | None = None
    language: str | None = None
    language_probability: float | None = None
    signals: dict[str, float] | None = None
    made_by: dict[str, Any] | None = None
    resumed: bool = False
    redone: bool = False


@dataclass(frozen=True)
class Totals:
    """``wall_seconds``, ``cpu_seconds`` (user+system, this process and its workers), ``peak_rss_mb``,
    ``real_time_factor`` (audio seconds per wall second, "x real time": 10.0 = ten times faster than
    real time; the inverse of the usual ASR RTF), ``success_rate`` (percent of chunks transcribed),
    ``chunks_ok``, ``chunks_failed``, ``speech_seconds`` (VAD speech), ``stage_seconds`` (per stage),
    ``chunks_resumed`` (from checkpoints), ``chunks_helped`` (made by other nodes) and ``chunks_redone``
    (started by a node that died, made again)."""

    wall_seconds: float | None = None
    cpu_seconds: float | None = None
    peak_rss_mb: float | None = None
    real_time_factor: float | None = None
    success_rate: float = 0.0
    chunks_ok: int = 0
    chunks_failed: int = 0
    speech_seconds: float | None = None
    stage_seconds: dict[str, float | None] = field(default_factory=dict)
    chunks_resumed: int = 0
    chunks_helped: int = 0
    chunks_redone: int = 0


@dataclass(frozen=True)
class Measured:
    """What the runner measured around a job (the inputs of ``Totals``)."""

    wall_seconds: float | None = None
    cpu_seconds: float | None = None
    peak_rss_mb: float | None = None


@dataclass(frozen=True)
class JobInfo:
    """The job: ``id`` (the same for every attempt), ``attempt`` (1 for the first claim, 0 for an entry
    refused before any claim), ``node``, ``claimed_as`` (its processing/ name), ``original_name``,
    ``output_stem`` (outbox/ stem, null when nothing was published), ``attempts`` (one record per
    attempt: node, pid, when, why it started), ``warning`` (e.g. "decoding stopped at 41.2 s" for
    a truncated file, else null), ``profile`` (the profile folder it was dropped in, or null) and
    ``options`` (the decoding options it ran with: global settings < profile < sidecar; null when
    no engine ran)."""

    id: str | None = None
    attempt: int | None = None
    node: str | None = None
    claimed_as: str | None = None
    original_name: str | None = None
    output_stem: str | None = None
    attempts: tuple[Mapping[str, Any], ...] = ()
    warning: str | None = None
    profile: str | None = None  # issue 11
    options: dict[str, Any] | None = None  # issue 11


@dataclass(frozen=True)
class Report:
    """One job's report; ``as_dict`` gives the JSON object, ``to_json`` the bytes written to disk."""

    outcome: str
    error: str | None
    input: InputInfo
    language: LanguageInfo
    engine: EngineInfo
    chunks: tuple[ChunkEntry, ...]
    totals: Totals
    job: JobInfo
    outputs: Mapping[str, str]
    created: str = ""
    host: str = ""
    smapd: str = __version__
    report_version: int = REPORT_VERSION

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict, keys in the documented order."""
        d = dataclasses.asdict(self)
        top = ("report_version", "smapd", "host", "created", "outcome", "error", "input", "language",
               "engine", "chunks", "totals", "job", "outputs")
        d["input"]["raw"] = list(self.input.raw) if self.input.raw is not None else None
        d["chunks"] = [dataclasses.asdict(c) for c in self.chunks]
        d["job"]["attempts"] = [dict(a) for a in self.job.attempts]
        d["outputs"] = dict(self.outputs)
        return {k: d[k] for k in top}

    def to_json(self) -> bytes:
        """The report file's content (UTF-8 JSON)."""
        return dumps(self.as_dict())

    def published_as(self, stem: str, suffixes: Sequence[str]) -> Report:
        """This report for outputs published as ``<stem><suffix>``."""
        return dataclasses.replace(self, outputs={s: stem + s for s in suffixes},
                                   job=dataclasses.replace(self.job, output_stem=stem))


def dumps(report: Mapping[str, Any]) -> bytes:
    """A report as UTF-8 JSON bytes. Raises ValueError for NaN/infinity (before anything is written)."""
    return (json.dumps(_text_safe(report), ensure_ascii=False, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _text_safe(obj: Any) -> Any:
    """File names are bytes: one that is not UTF-8 reaches us with lone surrogates, which no JSON
    reader accepts. Show such bytes as U+FFFD (the file itself keeps its name; ``input.raw`` has it)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            return obj.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(obj, Mapping):
        return {_text_safe(k): _text_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_text_safe(v) for v in obj]
    return obj


def num(x: float | None, digits: int = 3) -> float | None:
    """A measurement as JSON: rounded, null when unknown or not finite."""
    return round(float(x), digits) if x is not None and math.isfinite(x) else None


def input_info(name: str, size: int | None = None, sha256: str | None = None) -> InputInfo:
    """What is known of an input before decoding: its name (``raw`` bytes kept when not UTF-8)."""
    raw = name.encode("utf-8", "surrogateescape")
    shown = raw.decode("utf-8", "replace")
    return InputInfo(name=shown, size=size, sha256=sha256, raw=None if shown == name else tuple(raw))


def _default_error(transcript: Transcript) -> str | None:
    failed = transcript.gaps
    if not failed:
        return None
    first = failed[0]
    return (f"{len(failed)} of {len(transcript.chunks)} chunks could not be transcribed; first: chunk "
            f"{first.chunk.index} ({first.chunk.start:.1f}-{first.chunk.end:.1f} s): "
            f"{first.short_error.rstrip('.')}.")


def build(transcript: Transcript | None, *, input: InputInfo, job: JobInfo, error: str | None,
          engine: EngineInfo | None = None, measured: Measured | None = None,
          outputs: Mapping[str, str] | None = None) -> Report:
    """Build the report of one job, success or failure (schema in the module docstring).

    Args:
        transcript: The merged transcript, or None when the job failed before one existed.
        input: The input's name, size and hash; its audio fields are filled from ``transcript``.
        job: Who ran which attempt; ``warning`` is taken from the transcript when it has one.
        error: One readable sentence, or None; for a partial job a summary of the failed chunks is
            used when None. A job without a transcript is failed.
        engine: How it was transcribed (all null when no engine ran).
        measured: Wall and CPU seconds and peak RSS around the job.
        outputs: Suffix -> file name of the outputs to publish.

    Returns:
        The report, with every documented key.
    """
    m = measured or Measured()
    audio = transcript.audio if transcript else None
    chunks = sorted(transcript.chunks, key=lambda c: c.chunk.index) if transcript else []
    ok = sum(1 for c in chunks if c.status is ChunkStatus.OK)
    duration = audio.duration if audio else None
    if audio is not None:
        input = dataclasses.replace(input, duration=num(duration), codec=audio.codec, container=audio.container,
                                    sample_rate=audio.sample_rate, channels=audio.channels)
    if transcript is not None and transcript.warning:
        job = dataclasses.replace(job, warning=transcript.warning)
    return Report(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        host=socket.gethostname(),
        outcome=(transcript.outcome if transcript else Outcome.FAILED).value,
        error=error if error or transcript is None else _default_error(transcript),
        input=input,
        language=LanguageInfo(transcript.language, num(transcript.language_probability, 4))
        if transcript else LanguageInfo(),
        engine=engine or EngineInfo(),
        chunks=tuple(ChunkEntry(index=c.chunk.index, start=num(c.chunk.start), end=num(c.chunk.end),
                                attempts=c.attempts, seconds=num(c.seconds), status=c.status.value,
                                chars=c.chars, error=c.error, worker=c.worker,
                                decoded_seconds=num(sum(b - a for a, b in c.chunk.spans)),
                                language=c.language[0] if c.language else None,
                                language_probability=num(c.language[1], 4) if c.language else None,
                                signals=dataclasses.asdict(c.signals) if c.signals else None,
                                made_by=dict(c.made_by) if c.made_by else None, resumed=c.resumed, redone=c.redone)
                     for c in chunks),
        totals=Totals(
            wall_seconds=num(m.wall_seconds), cpu_seconds=num(m.cpu_seconds), peak_rss_mb=num(m.peak_rss_mb, 1),
            real_time_factor=num(duration / m.wall_seconds, 2) if duration is not None and m.wall_seconds else None,
            success_rate=(num(transcript.success_rate, 1) or 0.0) if transcript else 0.0,
            chunks_ok=ok, chunks_failed=len(chunks) - ok,
            speech_seconds=num(transcript.speech_seconds) if transcript else None,
            stage_seconds={k: num(v) for k, v in transcript.timings.items()} if transcript else {},
            chunks_resumed=sum(1 for c in chunks if c.resumed),
            chunks_helped=sum(1 for c in chunks if c.made_by and c.made_by.get("helper")),
            chunks_redone=sum(1 for c in chunks if c.redone)),
        job=job,
        outputs=dict(outputs or {}),
    )


def failure(name: str, job: JobInfo, error: str) -> Report:
    """The report of a job that ended before any audio was read (the spool's refusals, give-ups, repairs)."""
    return build(None, input=input_info(name), job=job, error=error)
