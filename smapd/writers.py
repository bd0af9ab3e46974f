"""Render a transcript as txt, srt and vtt (cue layout in ``subtitles``) and json, and publish a job's
outputs with its report (``report``) atomically, the report last.

Failed chunks are gaps: a ``[untranscribed ...]`` line in txt, a cue over the chunk's span in srt/vtt, an
entry under ``gaps`` in json. Times are seconds from the start of the input, rounded to milliseconds.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smapd import report as reports
from smapd.errors import ConfigError, TransientJobError
from smapd.models import ChunkResult, Segment, Transcript
from smapd.spool import fsio
from smapd.spool.names import REPORT_SUFFIX
from smapd.subtitles import SENTENCE_END, Cue, ends_with, transcript_cues

FORMATS: dict[str, str] = {"txt": ".txt", "srt": ".srt", "vtt": ".vtt", "json": ".json"}
_TXT_LINE_CHARS = 500  # a txt line without sentence punctuation still breaks at a segment end

__all__ = ["FORMATS", "REPORT_SUFFIX", "publish", "render", "render_json", "render_srt", "render_txt",
           "render_vtt", "srt_time", "vtt_time"]


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
    return f"[untranscribed {r.chunk.start:.1f}-{r.chunk.end:.1f} s: chunk {r.chunk.index}: {r.short_error}]"


def render_txt(transcript: Transcript) -> str:
    """Render plain text: one line per sentence-ending segment group, failed chunks as marker lines.

    A gap reads ``[untranscribed 60.0-90.0 s: chunk 3: timed out after 120 s]``.
    """
    items: list[tuple[float, str, bool]] = [(s.start, " ".join(s.text.split()), False) for s in transcript.segments]
    items += [(r.chunk.start, _gap_line(r), True) for r in transcript.gaps]
    lines: list[str] = []
    line: list[str] = []
    for _, text, is_gap in sorted(items, key=lambda item: item[0]):
        if is_gap:
            lines += [" ".join(line), text] if line else [text]
            line = []
        elif text:
            line.append(text)
            if ends_with(text, SENTENCE_END) or sum(map(len, line)) >= _TXT_LINE_CHARS:
                lines.append(" ".join(line))
                line = []
    if line:
        lines.append(" ".join(line))
    return "".join(f"{x}\n" for x in lines)


def render_json(transcript: Transcript, words: bool) -> str:
    """Render the transcript as JSON (times in seconds, rounded to milliseconds).

    Shape: ``{"language", "language_probability", "duration", "text", "segments": [{"start", "end",
    "text", "words": [{"start", "end", "text", "probability"}]}], "gaps": [{"chunk", "start", "end",
    "error"}]}``; ``words`` appears in each segment only when ``words`` is true.
    """
    def segment(s: Segment) -> dict[str, Any]:
        d: dict[str, Any] = {"start": reports.num(s.start), "end": reports.num(s.end), "text": s.text.strip()}
        if words:
            d["words"] = [{"start": reports.num(w.start), "end": reports.num(w.end), "text": w.text.strip(),
                           "probability": reports.num(w.probability)} for w in s.words]
        return d

    doc = {
        "language": transcript.language,
        "language_probability": reports.num(transcript.language_probability),
        "duration": reports.num(transcript.audio.duration),
        "text": transcript.text,
        "segments": [segment(s) for s in transcript.segments],
        "gaps": [{"chunk": r.chunk.index, "start": reports.num(r.chunk.start), "end": reports.num(r.chunk.end),
                  "error": r.error} for r in transcript.gaps],
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


# --- publish ----------------------------------------------------------------------------------------------


def publish(directory: Path, stem: str, files: Mapping[str, bytes], report: Mapping[str, Any] | reports.Report,
            *, tmp_dir: Path | None = None) -> dict[str, Path]:
    """Publish outputs and then the report, so that no reader ever sees a half-written file
    (``fsio.publish``: each file through a dot-named temp file, fsynced and renamed over any old one;
    an old report removed first; the report last). The CLI's path; the daemon's is ``Spool.finish``.

    Args:
        directory: Where the outputs go.
        stem: File name without suffix.
        files: Suffix -> bytes, e.g. from ``render``.
        report: The report; written as ``<stem>.report.json``, last.
        tmp_dir: Where temp files are made; must be on the same filesystem as ``directory``.

    Returns:
        Suffix -> published path, the report under ".report.json".

    Raises:
        ValueError: The report cannot be serialised (NaN, ...); nothing was written.
        TransientJobError: Writing failed (disk full, permissions, ...). Temp files are removed, and
            so are the outputs this call had already put in place.
    """
    data = report.to_json() if isinstance(report, reports.Report) else reports.dumps(report)
    try:
        return fsio.publish(directory, stem, files, data, tmp_dir or directory)
    except OSError as e:
        raise TransientJobError(f"could not publish {stem} into {directory}: {e.strerror or e}") from e
