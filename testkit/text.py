"""Judging text from the outside: normalisation, word error rate, word recall, SRT/VTT parsing.

Nothing here imports smapd, so a bug in smapd's subtitle writer cannot hide itself in the tests.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Text normalisation and word error rate
# --------------------------------------------------------------------------------------------

_DASHES = re.compile(r"[-\u2010-\u2015/]")
_NOT_WORD = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace.

    Hyphens, dashes and slashes become spaces ("whole-number" -> "whole number"); apostrophes are
    removed inside words ("don't" -> "dont"); accented letters are kept (NFC). Deliberately simple:
    numbers written as digits vs. words ("1963" vs "nineteen sixty three"), "Mr." vs "mister" and
    British vs. American spellings still count as errors, so pick test clips without them or
    allow for them in thresholds.
    """
    text = unicodedata.normalize("NFC", text).lower().replace("_", " ")
    text = _DASHES.sub(" ", text)
    text = _NOT_WORD.sub("", text)
    return " ".join(text.split())


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """``(edits, reference_words)``: word-level Levenshtein distance after :func:`normalize`.

    Sum both parts over many utterances for a corpus-level WER.
    """
    r = normalize(ref).split()
    h = normalize(hyp).split()
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1], len(r)


def wer(ref: str, hyp: str) -> float:
    """Word error rate of ``hyp`` against ``ref`` (0.0 = perfect; can exceed 1.0).

    An empty reference gives 0.0 for an empty hypothesis and 1.0 for any words at all.
    """
    edits, n = word_errors(ref, hyp)
    if n == 0:
        return 0.0 if edits == 0 else 1.0
    return edits / n


# --------------------------------------------------------------------------------------------
# Subtitles
# --------------------------------------------------------------------------------------------

_TIME = re.compile(r"(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{1,3})")
_CUE_LINE = re.compile(rf"^\s*({_TIME.pattern})\s*-->\s*({_TIME.pattern})")


def _seconds(stamp: str) -> float:
    m = _TIME.fullmatch(stamp.strip())
    if not m:
        raise ValueError(f"bad timestamp {stamp!r}")
    h, mnt, s, frac = m.groups()
    return int(h or 0) * 3600 + int(mnt) * 60 + int(s) + int(frac.ljust(3, "0")) / 1000


def _parse_cues(text: str) -> list[tuple[float, float, str]]:
    cues: list[tuple[float, float, str]] = []
    lines = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    i = 0
    while i < len(lines):
        m = _CUE_LINE.match(lines[i])
        if not m:
            i += 1
            continue
        start = _seconds(m.group(1))
        end = _seconds(m.group(6))
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip():
            body.append(lines[i].strip())
            i += 1
        cues.append((start, end, " ".join(body)))
    return cues


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """Cues of an SRT file as ``(start, end, text)``, times in seconds, multi-line text joined by spaces.

    Tolerant of a BOM, CRLF line ends, missing cue numbers and '.' instead of ',' in timestamps.
    """
    return _parse_cues(text)


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """Cues of a WebVTT file as ``(start, end, text)``; raises ValueError without the WEBVTT header."""
    if not text.lstrip("\ufeff").startswith("WEBVTT"):
        raise ValueError("not a WebVTT file: no WEBVTT header")
    return [(s, e, re.sub(r"<[^>]+>", "", t)) for s, e, t in _parse_cues(text)]


# --------------------------------------------------------------------------------------------
# Judging transcripts
# --------------------------------------------------------------------------------------------

def cue_words_in_span(cues: Iterable[tuple[float, float, str]], start: float, end: float,
                      slack: float = 1.0) -> str:
    """Text of all cues that overlap ``[start - slack, end + slack]``, normalized."""
    return normalize(" ".join(t for s, e, t in cues if e >= start - slack and s <= end + slack))


def word_recall(reference: str, hypothesis: str) -> float:
    """Fraction of the reference's words found in the hypothesis (as a multiset; order ignored)."""
    ref = normalize(reference).split()
    if not ref:
        return 1.0
    pool: dict[str, int] = {}
    for w in normalize(hypothesis).split():
        pool[w] = pool.get(w, 0) + 1
    hit = 0
    for w in ref:
        if pool.get(w, 0) > 0:
            pool[w] -= 1
            hit += 1
    return hit / len(ref)


def load_json(path: Path | str) -> Mapping:
    """Parse a JSON file (a report, a transcript .json)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
