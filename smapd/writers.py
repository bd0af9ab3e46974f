"""Render a transcript as txt, srt, vtt and json, build the job report, and publish them atomically.

Failed chunks are gaps: a ``[untranscribed ...]`` line in txt, a cue over the chunk's span in srt/vtt, an
entry under ``gaps`` in json. Times are seconds from the start of the input, rounded to milliseconds.

Report (``<stem>.report.json``; the schema is stable: every key is always present, null when unknown):

- ``report_version`` (int): 1; bumped only when a field changes meaning or goes away.
- ``smapd`` (str): version of smapd that wrote the report. ``host`` (str): hostname of the node.
- ``created`` (str): UTC time the report was built, ISO 8601, e.g. ``2025-01-31T12:00:00+00:00``.
- ``outcome`` (str): ``success`` (every chunk transcribed, or no speech), ``partial`` (some chunks
  failed; outputs written with the gaps marked) or ``failed`` (nothing transcribed, or bad input).
- ``error`` (str|null): one readable sentence saying what went wrong; null on success.
- ``input``: ``name`` (file name), ``size`` (bytes), ``sha256`` (hex), ``duration`` (seconds of decoded
  audio), ``codec``, ``container``, ``sample_rate`` (Hz) and ``channels`` of the source audio stream.
- ``language``: ``code`` (e.g. ``en``) and ``probability`` (0-1) of the detected or forced language.
- ``engine``: ``name``, ``model``, ``compute_type``, ``workers``, ``cpu_threads``, ``beam_size``, plus
  any further engine options the caller passes.
- ``chunks`` (list, by index): ``index``, ``start``/``end`` (s), ``attempts``, ``seconds`` (wall seconds
  the pool spent on it), ``status`` (``ok``/``failed``), ``chars`` (characters transcribed), ``error``
  (why its last attempt failed, or null), ``worker`` (the engine slot that ran it).
- ``totals``: ``wall_seconds``, ``cpu_seconds`` (user+system, all processes), ``peak_rss_mb``,
  ``real_time_factor`` (audio seconds per wall second, "x real time": 10.0 = ten times faster than real
  time; the inverse of the usual ASR RTF), ``success_rate`` (percent of chunks transcribed),
  ``chunks_ok``, ``chunks_failed``, ``speech_seconds`` (VAD speech), ``stage_seconds`` (per stage), and
  any further totals the caller passes.
- ``job``: ``id``, ``attempt``, ``node``, plus whatever the caller passes.
- ``outputs``: file suffix -> file name, e.g. ``{".srt": "talk.srt"}``.
"""
from __future__ import annotations

import errno
import itertools
import json
import math
import os
import secrets
import socket
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from smapd import __version__
from smapd.errors import ConfigError, TransientJobError
from smapd.models import ChunkResult, ChunkStatus, Outcome, Segment, Transcript, Word

FORMATS: dict[str, str] = {"txt": ".txt", "srt": ".srt", "vtt": ".vtt", "json": ".json"}
REPORT_SUFFIX = ".report.json"
REPORT_VERSION = 1
MIN_CUE_SECONDS = 0.5
_SENTENCE_END = ".?!…。？！"
_CLAUSE_END = _SENTENCE_END + ",;:，、；："
_CLOSERS = "\"'”’»)]"
_TXT_LINE_CHARS = 500  # a txt line without sentence punctuation still breaks at a segment end


@dataclass(frozen=True)
class Cue:
    """One subtitle cue; ``text`` holds its wrapped lines joined by newlines."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class _Limits:
    max_seconds: float
    max_chars: int
    max_lines: int
    min_gap: float

    def fits(self, text: str) -> bool:
        return len(wrap_lines(text, self.max_chars)) <= self.max_lines


# --- wrapping ---------------------------------------------------------------------------------------------


def _atoms(text: str, max_chars: int) -> list[tuple[str, str]]:
    """(separator, piece) pairs; a token longer than a line (or unspaced CJK) is cut into characters."""
    atoms: list[tuple[str, str]] = []
    for token in text.split():
        if len(token) <= max_chars:
            atoms.append((" ", token))
        else:
            atoms += [(" " if i == 0 else "", c) for i, c in enumerate(token)]
    return atoms


def wrap_lines(text: str, max_chars: int = 42) -> list[str]:
    """Wrap text into the fewest lines of at most ``max_chars``, balanced so the longest is shortest.

    Args:
        text: Text to wrap; runs of whitespace count as one space.
        max_chars: Longest allowed line.

    Returns:
        The lines (empty for blank text). Two lines split near the middle at a space.
    """
    atoms = _atoms(text, max_chars)
    n = len(atoms)
    pos, sep = [0], [0]  # prefix sums of piece lengths and separator lengths
    for s, p in atoms:
        pos.append(pos[-1] + len(p))
        sep.append(sep[-1] + len(s))

    def width(i: int, j: int) -> int:  # line made of atoms i..j-1; the first one's separator is dropped
        return pos[j] - pos[i] + sep[j] - sep[i + 1]

    k = max(1, math.ceil(width(0, n) / (max_chars + 1))) if n else 0
    while k:
        # best[j] = (longest line, cut points) for atoms[:j] in the current number of lines
        best: list[tuple[float, list[int]]] = [(width(0, j), [0]) if j else (math.inf, []) for j in range(n + 1)]
        for _ in range(k - 1):
            best = [(math.inf, [])] + [
                min(((max(best[i][0], width(i, j)), best[i][1] + [i]) for i in range(1, j)),
                    default=(math.inf, []))
                for j in range(1, n + 1)
            ]
        longest, cuts = best[n]
        if longest <= max_chars or k >= n:
            bounds = cuts + [n]
            return ["".join((s if a > i else "") + p for a, (s, p) in enumerate(atoms[i:j], i))
                    for i, j in itertools.pairwise(bounds)]
        k += 1
    return []


# --- cues -------------------------------------------------------------------------------------------------


def _join_words(texts: Sequence[str]) -> str:
    """Join word texts: faster-whisper words carry their own leading space; unspaced CJK joins tight."""
    if any(t[:1].isspace() for t in texts[1:]) or all(
        unicodedata.east_asian_width(t.strip()[:1] or " ") in "WF" for t in texts
    ):
        return " ".join("".join(texts).split())
    return " ".join(" ".join(texts).split())


def _ends(text: str, marks: str) -> bool:
    stripped = text.rstrip().rstrip(_CLOSERS)
    return bool(stripped) and stripped[-1] in marks


def _word_cues(words: Sequence[Word], lim: _Limits) -> list[Cue]:
    """Phrases (cut at pauses and sentence ends), each split into balanced cues that fit.

    A phrase too long for one cue is halved at the word that best balances the two sides,
    preferring a clause end (comma, semicolon) near the middle, and halved again as needed, so a
    long sentence gives two even cues rather than a full cue and a one-word orphan.
    """
    def text(ws: Sequence[Word]) -> str:
        return _join_words([w.text for w in ws])

    def fits(ws: Sequence[Word]) -> bool:
        return ws[-1].end - ws[0].start <= lim.max_seconds and lim.fits(text(ws))

    def split(ws: Sequence[Word]) -> list[Sequence[Word]]:
        if len(ws) <= 1 or fits(ws):
            return [ws]
        total = len(text(ws))
        best, best_score = 1, float("inf")
        for i in range(1, len(ws)):
            left = len(text(ws[:i]))
            score = abs(left - (total - left)) / max(total, 1)
            score -= 0.15 if _ends(ws[i - 1].text, _CLAUSE_END) else 0.0
            score -= min(0.15, ws[i].start - ws[i - 1].end)  # a small pause is a good place too
            if score < best_score:
                best, best_score = i, score
        return split(ws[:best]) + split(ws[best:])

    phrases: list[list[Word]] = []
    cur: list[Word] = []
    for w in words:
        if cur and (w.start - cur[-1].end >= lim.min_gap
                    or (_ends(cur[-1].text, _SENTENCE_END) and len(text(cur)) >= lim.max_chars // 2)):
            phrases.append(cur)
            cur = []
        cur.append(w)
    if cur:
        phrases.append(cur)
    return [Cue(ws[0].start, max(ws[-1].end, ws[0].start), text(ws)) for p in phrases for ws in split(p)]


def _segment_cues(seg: Segment, lim: _Limits) -> list[Cue]:
    """Cues for a segment without word times: split proportionally by characters at word boundaries."""
    atoms = _atoms(seg.text, lim.max_chars)
    if not atoms:
        return []
    ends = [0]  # character offset after each atom (the first separator dropped)
    for i, (s, p) in enumerate(atoms):
        ends.append(ends[-1] + (len(s) if i else 0) + len(p))
    total, span = ends[-1], max(seg.end - seg.start, 0.0)
    least = max(1, math.ceil(span / lim.max_seconds), math.ceil(total / (lim.max_chars * lim.max_lines)))
    pieces: list[Cue] = []
    for n in range(min(least, len(atoms)), len(atoms) + 1):
        bounds = [0]
        for k in range(1, n):  # the boundary nearest the k-th n-th of the text, leaving room for the rest
            lo, hi = bounds[-1] + 1, len(atoms) - (n - k)
            bounds.append(min(range(lo, hi + 1), key=lambda b: abs(ends[b] - total * k / n)))
        bounds.append(len(atoms))
        pieces = [
            Cue(seg.start + span * ends[i] / total, seg.start + span * ends[j] / total,
                "".join((s if a > i else "") + p for a, (s, p) in enumerate(atoms[i:j], i)))
            for i, j in itertools.pairwise(bounds)
        ]
        if all(c.end - c.start <= lim.max_seconds + 1e-6 and lim.fits(c.text) for c in pieces):
            break
    return pieces


def _settle(cues: list[Cue], max_chars: int, end_limit: float | None) -> list[Cue]:
    """Order cues, make them non-overlapping, give short ones MIN_CUE_SECONDS where there is room, wrap."""
    cues = sorted((c for c in cues if c.text.strip()), key=lambda c: c.start)
    out: list[Cue] = []
    prev_end = 0.0
    for i, c in enumerate(cues):
        start = max(c.start, prev_end, 0.0)
        if i + 1 < len(cues):  # stretch into the room before the next cue; trim an overlap with it
            end = min(max(c.end, start + MIN_CUE_SECONDS), max(cues[i + 1].start, start))
        else:
            end = max(c.end, min(start + MIN_CUE_SECONDS, end_limit or math.inf))
        end = max(end, start + 0.001)
        out.append(Cue(start, end, "\n".join(wrap_lines(c.text, max_chars))))
        prev_end = end
    return out


def build_cues(
    segments: Sequence[Segment],
    *,
    max_seconds: float = 7.0,
    max_chars_per_line: int = 42,
    max_lines: int = 2,
    min_gap_split: float = 0.6,
    duration: float | None = None,
    extra: Sequence[Cue] = (),
) -> list[Cue]:
    """Turn segments into readable subtitle cues.

    Segments with word timestamps are cut between words: at a pause of ``min_gap_split`` seconds or
    more, after a sentence end once the cue has half a line of text, and always before the cue would
    last longer than ``max_seconds`` or need more than ``max_lines`` lines (then preferably after a
    comma in its second half). Segments without words keep their times; a long one is cut into even
    pieces at spaces with times shared out by characters.

    Args:
        segments: Segments in file time, in order.
        max_seconds: Longest cue (a single word longer than this stays one cue).
        max_chars_per_line: Longest line after wrapping.
        max_lines: Most lines per cue.
        min_gap_split: A pause this long between words always starts a new cue.
        duration: End of the audio; the minimum-duration stretch of the last cue never passes it.
        extra: Cues to merge in as they are (gap markers), wrapped but never cut to ``max_lines``.

    Returns:
        Cues in time order, non-overlapping, each at least MIN_CUE_SECONDS long where the next cue
        leaves room, text wrapped into at most ``max_lines`` balanced lines.
    """
    lim = _Limits(max_seconds, max_chars_per_line, max_lines, min_gap_split)
    cues: list[Cue] = list(extra)
    words: list[Word] = []
    for seg in segments:
        if seg.words:
            words += [w for w in seg.words if w.text.strip()]
        else:
            cues += _word_cues(words, lim) + _segment_cues(seg, lim)
            words = []
    cues += _word_cues(words, lim)
    return _settle(cues, max_chars_per_line, duration)


def _failed(transcript: Transcript) -> list[ChunkResult]:
    return sorted((c for c in transcript.chunks if c.status is ChunkStatus.FAILED), key=lambda c: c.chunk.start)


def _why(result: ChunkResult) -> str:
    return " ".join((result.error or "failed").split())[:200]


def transcript_cues(transcript: Transcript, **options: Any) -> list[Cue]:
    """Cues for a whole transcript: ``build_cues`` on its segments plus one cue per failed chunk.

    Args:
        transcript: The merged transcript.
        **options: Passed to ``build_cues`` (max_seconds, max_chars_per_line, max_lines, min_gap_split).

    Returns:
        Speech cues and ``[untranscribed: <error>]`` cues over failed chunks, in time order.
    """
    gaps = [Cue(r.chunk.start, r.chunk.end, f"[untranscribed: {_why(r)}]") for r in _failed(transcript)]
    return build_cues(transcript.segments, duration=transcript.audio.duration or None, extra=gaps, **options)


# --- renderers --------------------------------------------------------------------------------------------


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000)) if math.isfinite(seconds) else 0


def _stamp(seconds: float, sep: str) -> str:
    ms = _ms(seconds)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def srt_time(seconds: float) -> str:
    """Format seconds as an SRT timestamp, e.g. 3661.5 -> ``01:01:01,500``."""
    return _stamp(seconds, ",")


def vtt_time(seconds: float) -> str:
    """Format seconds as a WebVTT timestamp, e.g. 3661.5 -> ``01:01:01.500``."""
    return _stamp(seconds, ".")


def render_srt(cues: Sequence[Cue]) -> str:
    """Render cues as SubRip: 1-based index, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, text, blank line."""
    return "".join(f"{i}\n{srt_time(c.start)} --> {srt_time(c.end)}\n{c.text}\n\n" for i, c in enumerate(cues, 1))


def render_vtt(cues: Sequence[Cue]) -> str:
    """Render cues as WebVTT (``WEBVTT`` header, ``HH:MM:SS.mmm``; ``&``, ``<``, ``>`` escaped)."""
    body = "".join(
        f"{vtt_time(c.start)} --> {vtt_time(c.end)}\n"
        f"{c.text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}\n\n"
        for c in cues
    )
    return "WEBVTT\n\n" + body


def _gap_line(r: ChunkResult) -> str:
    return f"[untranscribed {r.chunk.start:.1f}-{r.chunk.end:.1f} s: chunk {r.chunk.index}: {_why(r)}]"


def render_txt(transcript: Transcript) -> str:
    """Render plain text: one line per sentence-ending segment group, failed chunks as marker lines.

    A gap reads ``[untranscribed 60.0-90.0 s: chunk 3: timed out after 120 s]``.
    """
    items: list[tuple[float, str, bool]] = [(s.start, " ".join(s.text.split()), False) for s in transcript.segments]
    items += [(r.chunk.start, _gap_line(r), True) for r in _failed(transcript)]
    lines: list[str] = []
    line: list[str] = []
    for _, text, is_gap in sorted(items, key=lambda item: item[0]):
        if is_gap:
            lines += [" ".join(line), text] if line else [text]
            line = []
        elif text:
            line.append(text)
            if _ends(text, _SENTENCE_END) or sum(map(len, line)) >= _TXT_LINE_CHARS:
                lines.append(" ".join(line))
                line = []
    if line:
        lines.append(" ".join(line))
    return "".join(f"{x}\n" for x in lines)


def _num(x: float | None, digits: int = 3) -> float | None:
    return round(float(x), digits) if x is not None and math.isfinite(x) else None


def render_json(transcript: Transcript, words: bool) -> str:
    """Render the transcript as JSON (times in seconds, rounded to milliseconds).

    Shape: ``{"language", "language_probability", "duration", "text", "segments": [{"start", "end",
    "text", "words": [{"start", "end", "text", "probability"}]}], "gaps": [{"chunk", "start", "end",
    "error"}]}``; ``words`` appears in each segment only when ``words`` is true.
    """
    def segment(s: Segment) -> dict[str, Any]:
        d: dict[str, Any] = {"start": _num(s.start), "end": _num(s.end), "text": s.text.strip()}
        if words:
            d["words"] = [{"start": _num(w.start), "end": _num(w.end), "text": w.text.strip(),
                           "probability": _num(w.probability)} for w in s.words]
        return d

    doc = {
        "language": transcript.language,
        "language_probability": _num(transcript.language_probability),
        "duration": _num(transcript.audio.duration),
        "text": transcript.text,
        "segments": [segment(s) for s in transcript.segments],
        "gaps": [{"chunk": r.chunk.index, "start": _num(r.chunk.start), "end": _num(r.chunk.end),
                  "error": r.error} for r in _failed(transcript)],
    }
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


def render(transcript: Transcript, formats: Sequence[str], words: bool) -> dict[str, bytes]:
    """Render the requested formats.

    Args:
        transcript: The merged transcript.
        formats: Any of "txt", "srt", "vtt", "json".
        words: Include word timings in the json.

    Returns:
        File suffix (".txt", ...) -> UTF-8 bytes, in the order asked.

    Raises:
        ConfigError: A format is not one of FORMATS.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown output format {unknown[0]!r}; allowed: {', '.join(FORMATS)}")
    cues = transcript_cues(transcript) if {"srt", "vtt"} & set(formats) else []
    makers = {"txt": lambda: render_txt(transcript), "srt": lambda: render_srt(cues),
              "vtt": lambda: render_vtt(cues), "json": lambda: render_json(transcript, words)}
    return {FORMATS[f]: makers[f]().encode("utf-8") for f in formats}


# --- report -----------------------------------------------------------------------------------------------


def _default_error(transcript: Transcript) -> str | None:
    failed = _failed(transcript)
    if not failed:
        return None
    first = failed[0]
    return (f"{len(failed)} of {len(transcript.chunks)} chunks could not be transcribed; first: chunk "
            f"{first.chunk.index} ({first.chunk.start:.1f}-{first.chunk.end:.1f} s): {_why(first).rstrip('.')}.")


def build_report(
    transcript: Transcript | None,
    *,
    input_path: str | os.PathLike[str],
    input_size: int | None,
    input_sha256: str | None,
    job: Mapping[str, Any],
    engine: Mapping[str, Any],
    totals: Mapping[str, Any],
    outputs: Mapping[str, str],
    error: str | None,
) -> dict[str, Any]:
    """Build the JSON report of one job (schema in the module docstring).

    Args:
        transcript: The merged transcript, or None when the job failed before one existed.
        input_path: The input file; only its name is reported.
        input_size: Its size in bytes.
        input_sha256: Its SHA-256, hex.
        job: ``id``, ``attempt``, ``node`` and anything else to record about the job.
        engine: ``name``, ``model``, ``compute_type``, ``workers``, ``cpu_threads``, ``beam_size``, ...
        totals: ``wall_seconds``, ``cpu_seconds``, ``peak_rss_mb`` (and any extra measurements).
        outputs: Suffix -> file name of the published outputs.
        error: One readable sentence, or None; for a partial job a summary of the failed chunks is
            used when None.

    Returns:
        A JSON-serialisable dict with every documented key present.
    """
    audio = transcript.audio if transcript else None
    wall = totals.get("wall_seconds")
    duration = audio.duration if audio else None
    chunks = sorted(transcript.chunks, key=lambda c: c.chunk.index) if transcript else []
    ok = sum(1 for c in chunks if c.status is ChunkStatus.OK)
    return {
        "report_version": REPORT_VERSION,
        "smapd": __version__,
        "host": socket.gethostname(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "outcome": (transcript.outcome if transcript else Outcome.FAILED).value,
        "error": error if error or transcript is None else _default_error(transcript),
        "input": {
            "name": Path(input_path).name, "size": input_size, "sha256": input_sha256,
            "duration": _num(duration),
            "codec": audio.codec if audio else None, "container": audio.container if audio else None,
            "sample_rate": audio.sample_rate if audio else None, "channels": audio.channels if audio else None,
        },
        "language": {"code": transcript.language if transcript else None,
                     "probability": _num(transcript.language_probability, 4) if transcript else None},
        "engine": {**dict.fromkeys(("name", "model", "compute_type", "workers", "cpu_threads", "beam_size")),
                   **engine},
        "chunks": [{
            "index": c.chunk.index, "start": _num(c.chunk.start), "end": _num(c.chunk.end),
            "attempts": c.attempts, "seconds": _num(c.seconds), "status": c.status.value,
            "chars": c.chars, "error": c.error, "worker": c.worker,
        } for c in chunks],
        "totals": {
            **totals,
            "wall_seconds": _num(wall), "cpu_seconds": _num(totals.get("cpu_seconds")),
            "peak_rss_mb": _num(totals.get("peak_rss_mb"), 1),
            "real_time_factor": _num(duration / wall, 2) if duration is not None and wall else None,
            "success_rate": _num(transcript.success_rate, 1) if transcript else 0.0,
            "chunks_ok": ok, "chunks_failed": len(chunks) - ok,
            "speech_seconds": _num(transcript.speech_seconds) if transcript else None,
            "stage_seconds": {k: _num(v) for k, v in transcript.timings.items()} if transcript else {},
        },
        "job": {**dict.fromkeys(("id", "attempt", "node")), **job},
        "outputs": dict(outputs),
    }


# --- publish ----------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # a few filesystems (some FUSE) cannot fsync a directory; the rename still holds
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _write_replace(target: Path, suffix: str, data: bytes, tmp_dir: Path, stem: str) -> None:
    # A dot name is never claimed or read as output (DESIGN §1 inv. 8); stem cut to stay under NAME_MAX.
    tmp = tmp_dir / f".{stem[:100]}{suffix}.tmp-{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _text_safe(obj: Any) -> Any:
    """File names are bytes: one that is not UTF-8 reaches us with lone surrogates, which no JSON
    reader accepts. Show such bytes as U+FFFD in the report (the file itself keeps its name)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            return obj.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(obj, dict):
        return {_text_safe(k): _text_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_text_safe(v) for v in obj]
    return obj


def publish(
    directory: Path,
    stem: str,
    files: Mapping[str, bytes],
    report: Mapping[str, Any],
    *,
    tmp_dir: Path | None = None,
) -> dict[str, Path]:
    """Publish outputs and then the report, so that no reader ever sees a half-written file.

    Each file goes to a dot-named temp file, is fsynced and renamed into place (``os.replace``, which
    overwrites: the CLI rewrites a previous run's outputs; the daemon picks a fresh stem). An old
    ``<stem>.report.json`` is removed first, so the report, the "done" marker, never vouches for a mix
    of old and new files. The directory is fsynced before the report is renamed in (the outputs' names
    are durable before the marker's) and again after.

    Args:
        directory: Where the outputs go.
        stem: File name without suffix.
        files: Suffix -> bytes, e.g. from ``render``.
        report: The report; written as ``<stem>.report.json``, last.
        tmp_dir: Where temp files are made; must be on the same filesystem as ``directory``.

    Returns:
        Suffix -> published path, the report under ".report.json".

    Raises:
        TransientJobError: Writing failed (disk full, permissions, ...). Temp files are removed, and
            so are the outputs this call had already put in place, unless the report was.
    """
    if REPORT_SUFFIX in files:
        raise ValueError(f"{REPORT_SUFFIX} is written from the report argument, not from files")
    data = (json.dumps(_text_safe(report), ensure_ascii=False, indent=2, allow_nan=False) + "\n").encode("utf-8")
    tmp = tmp_dir or directory
    report_path = directory / f"{stem}{REPORT_SUFFIX}"
    placed: dict[str, Path] = {}
    try:
        report_path.unlink(missing_ok=True)
        for suffix, content in files.items():
            target = directory / f"{stem}{suffix}"
            _write_replace(target, suffix, content, tmp, stem)
            placed[suffix] = target
        _fsync_dir(directory)
        _write_replace(report_path, REPORT_SUFFIX, data, tmp, stem)
        placed[REPORT_SUFFIX] = report_path
        _fsync_dir(directory)
    except OSError as e:
        if REPORT_SUFFIX not in placed:  # no marker: take back what we put there, leave no orphans
            for path in placed.values():
                path.unlink(missing_ok=True)
        raise TransientJobError(f"could not publish {stem} into {directory}: {e.strerror or e}") from e
    return placed
