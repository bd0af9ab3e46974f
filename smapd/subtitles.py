"""Subtitle layout: segments (and failed chunks) to readable cues, and line wrapping.

Cues are cut between words where word times exist (at pauses, sentence ends, and before a cue
gets too long or needs too many lines), else proportionally by characters; then ordered, made
non-overlapping, given a minimum duration where there is room, and wrapped into balanced lines.
"""
from __future__ import annotations

import itertools
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from smapd.models import Segment, Transcript, Word

MIN_CUE_SECONDS = 0.5
SENTENCE_END = ".?!…。？！"
_CLAUSE_END = SENTENCE_END + ",;:，、；："
_CLOSERS = "\"'”’»)]"


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


def ends_with(text: str, marks: str) -> bool:
    """Whether ``text`` ends with one of ``marks``, closing quotes and brackets aside."""
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
            score -= 0.15 if ends_with(ws[i - 1].text, _CLAUSE_END) else 0.0
            score -= min(0.15, ws[i].start - ws[i - 1].end)  # a small pause is a good place too
            if score < best_score:
                best, best_score = i, score
        return split(ws[:best]) + split(ws[best:])

    phrases: list[list[Word]] = []
    cur: list[Word] = []
    for w in words:
        if cur and (w.start - cur[-1].end >= lim.min_gap
                    or (ends_with(cur[-1].text, SENTENCE_END) and len(text(cur)) >= lim.max_chars // 2)):
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


def transcript_cues(transcript: Transcript, **options: Any) -> list[Cue]:
    """Cues for a whole transcript: ``build_cues`` on its segments plus one cue per failed chunk.

    Args:
        transcript: The merged transcript.
        **options: Passed to ``build_cues`` (max_seconds, max_chars_per_line, max_lines, min_gap_split).

    Returns:
        Speech cues and ``[untranscribed: <error>]`` cues over failed chunks, in time order.
    """
    gaps = [Cue(r.chunk.start, r.chunk.end, f"[untranscribed: {r.short_error}]") for r in transcript.gaps]
    return build_cues(transcript.segments, duration=transcript.audio.duration or None, extra=gaps, **options)
