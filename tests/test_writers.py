"""Unit tests of smapd.writers and smapd.subtitles: cues, renderers, atomic publish. No model, no audio."""
from __future__ import annotations

import itertools
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import pytest

from smapd.errors import ConfigError, TransientJobError
from smapd.models import AudioInfo, Chunk, ChunkResult, ChunkStatus, Segment, Transcript, Word
from smapd.subtitles import Cue, build_cues, transcript_cues, wrap_lines
from smapd.writers import (
    REPORT_SUFFIX,
    publish,
    render,
    render_json,
    render_srt,
    render_txt,
    render_vtt,
    srt_time,
    vtt_time,
)

_TIME = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"
_SRT_BLOCK = re.compile(rf"(\d+)\n{_TIME} --> {_TIME}\n((?:[^\n]+\n)+)\n")
_VTT_BLOCK = re.compile(rf"{_TIME} --> {_TIME}\n((?:[^\n]+\n)+)\n")


def _secs(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_srt(text: str) -> list[tuple[int, float, float, list[str]]]:
    """Parse SRT strictly: the whole text must be well-formed blocks."""
    out, pos = [], 0
    while pos < len(text):
        m = _SRT_BLOCK.match(text, pos)
        assert m, f"bad SRT at {pos}: {text[pos:pos + 80]!r}"
        g = m.groups()
        out.append((int(g[0]), _secs(*g[1:5]), _secs(*g[5:9]), g[9].splitlines()))
        pos = m.end()
    return out


def parse_vtt(text: str) -> list[tuple[float, float, list[str]]]:
    assert text.startswith("WEBVTT\n\n")
    out, pos = [], len("WEBVTT\n\n")
    while pos < len(text):
        m = _VTT_BLOCK.match(text, pos)
        assert m, f"bad VTT at {pos}: {text[pos:pos + 80]!r}"
        g = m.groups()
        out.append((_secs(*g[0:4]), _secs(*g[4:8]), g[8].splitlines()))
        pos = m.end()
    return out


def check_timeline(spans: list[tuple[float, float]]) -> None:
    prev_end = 0.0
    for start, end in spans:
        assert start < end
        assert start >= prev_end - 1e-9, "cues overlap"
        prev_end = end


def words_from(text: str, start: float = 0.0, word_s: float = 0.3, gap_s: float = 0.05,
               pauses: dict[int, float] | None = None) -> tuple[Word, ...]:
    """Words with faster-whisper's leading-space convention, evenly timed, with optional pauses."""
    out, t = [], start
    for i, tok in enumerate(text.split()):
        out.append(Word(t, t + word_s, " " + tok, 0.9))
        t += word_s + (pauses or {}).get(i, gap_s)
    return tuple(out)


def seg_of(words: tuple[Word, ...]) -> Segment:
    return Segment(words[0].start, words[-1].end, "".join(w.text for w in words).strip(), words)


def make_transcript(segments: list[Segment], chunks: list[ChunkResult] | None = None,
                    duration: float = 120.0) -> Transcript:
    if chunks is None:
        chunks = [ChunkResult(Chunk(1, 0.0, duration), ChunkStatus.OK, 1, 3.2, tuple(segments), None, "w0")]
    return Transcript(tuple(segments), tuple(chunks), "en", 0.987654, AudioInfo(duration, 44100, 2, "mp3", "mp3"),
                      speech_seconds=duration * 0.8, timings={"decode": 0.51234, "transcribe": 9.9})


TEXT = ("So this is a sentence that goes on. And then, after a pause, we continue talking about things "
        "for quite a while without stopping at all because we like long sentences, really. Short one. Another!")


# --- timestamps and formats -------------------------------------------------------------------------------


def test_timestamps_real_format() -> None:
    assert srt_time(3661.5) == "01:01:01,500"
    assert vtt_time(3661.5) == "01:01:01.500"
    assert srt_time(0) == "00:00:00,000"
    assert srt_time(59.9996) == "00:01:00,000"
    assert srt_time(-1.0) == "00:00:00,000"
    assert srt_time(36000 + 0.042) == "10:00:00,042"


def test_srt_and_vtt_parse_back_valid() -> None:
    words = words_from(TEXT, start=5.0, pauses={12: 1.2})
    tr = make_transcript([seg_of(words)])
    cues = transcript_cues(tr)
    srt = parse_srt(render_srt(cues))
    assert [i for i, *_ in srt] == list(range(1, len(srt) + 1))
    check_timeline([(s, e) for _, s, e, _ in srt])
    assert " ".join(" ".join(lines) for *_, lines in srt) == TEXT  # every word, in order, once
    vtt = parse_vtt(render_vtt(cues))
    assert [(s, e) for s, e, _ in vtt] == [(s, e) for _, s, e, _ in srt]
    assert srt[0][1] == 5.0  # cue starts at the first word's start


def test_vtt_escapes_markup() -> None:
    out = render_vtt([Cue(0, 1, "a < b & c > d")])
    assert "a &lt; b &amp; c &gt; d" in out
    assert render_srt([Cue(0, 1, "x")]) == "1\n00:00:00,000 --> 00:00:01,000\nx\n\n"


# --- cue building -------------------------------------------------------------------------------------------


def test_wrap_lines_balanced_and_bounded() -> None:
    lines = wrap_lines("The quick brown fox jumps over the lazy dog and keeps running far away", 42)
    assert len(lines) == 2 and all(len(x) <= 42 for x in lines)
    assert abs(len(lines[0]) - len(lines[1])) <= 8  # balanced, not greedy (greedy: 42 + 27)
    assert wrap_lines("short line", 42) == ["short line"]
    assert wrap_lines("   ", 42) == []
    long_token = "x" * 100
    assert all(len(x) <= 42 for x in wrap_lines(long_token, 42))
    assert "".join(wrap_lines(long_token, 42)) == long_token


def test_word_cues_split_at_pause() -> None:
    words = words_from("one two three four five six", pauses={2: 0.8})
    cues = build_cues([seg_of(words)])
    assert [c.text for c in cues] == ["one two three", "four five six"]
    assert cues[1].start == words[3].start and cues[0].end == words[2].end


def test_word_cues_split_at_sentence_end_once_long_enough() -> None:
    words = words_from("This sentence is long enough to end a cue. Then another. Ok. Yes fine")
    texts = [c.text for c in build_cues([seg_of(words)])]
    assert texts[0] == "This sentence is long enough to end a cue."
    assert "Then another. Ok. Yes fine" in texts  # short sentences are not each a cue


def test_word_cues_forced_by_length_and_duration() -> None:
    text = " ".join(f"word{i}" for i in range(80))  # no punctuation, no pauses, 80 * 0.35 s = 28 s
    cues = build_cues([seg_of(words_from(text))])
    assert len(cues) >= 4
    for c in cues:
        assert c.end - c.start <= 7.0 + 1e-9
        lines = c.text.split("\n")
        assert len(lines) <= 2 and all(len(x) <= 42 for x in lines)
    assert " ".join(c.text.replace("\n", " ") for c in cues) == text


def test_forced_break_prefers_clause_end() -> None:
    text = ("alpha beta gamma delta epsilon zeta eta theta iota, kappa lambda mu nu xi omicron pi rho "
            "sigma tau upsilon")
    cues = build_cues([seg_of(words_from(text))])
    assert cues[0].text.replace("\n", " ").endswith("iota,")


def test_long_segment_without_words_split_proportionally() -> None:
    seg = Segment(10.0, 40.0, TEXT)
    cues = build_cues([seg])
    assert len(cues) >= 5
    assert cues[0].start == 10.0 and cues[-1].end == pytest.approx(40.0)
    check_timeline([(c.start, c.end) for c in cues])
    for a, b in itertools.pairwise(cues):
        assert b.start == pytest.approx(a.end)  # contiguous: the segment's time is shared out
    for c in cues:
        assert c.end - c.start <= 7.0 + 1e-6
        assert all(len(x) <= 42 for x in c.text.split("\n")) and c.text.count("\n") <= 1
    assert " ".join(c.text.replace("\n", " ") for c in cues) == TEXT
    # character-proportional: a piece's share of time matches its share of text
    total = len(TEXT)
    for c in cues:
        assert (c.end - c.start) / 30.0 == pytest.approx(len(c.text) / total, abs=0.03)


def test_short_segment_without_words_keeps_times() -> None:
    cues = build_cues([Segment(1.0, 3.0, " Hello there. "), Segment(3.5, 5.0, "General Kenobi.")])
    assert [(c.start, c.end, c.text) for c in cues] == [(1.0, 3.0, "Hello there."), (3.5, 5.0, "General Kenobi.")]


def test_min_duration_and_no_overlap() -> None:
    w = (Word(1.0, 1.1, " Hi."), Word(5.0, 5.1, " Yo"), Word(5.3, 5.4, " there"))
    cues = build_cues([seg_of(w)], min_gap_split=0.15)
    assert (cues[0].start, cues[0].end) == (1.0, 1.5)  # stretched to 0.5 s: room before the next cue
    assert cues[1].end == pytest.approx(5.3)  # stretched only up to the next cue
    assert cues[2].end == pytest.approx(5.8)
    # overlapping word times (engines do this) never give overlapping cues
    w2 = (Word(0.0, 2.0, " first"), Word(1.5, 3.0, " second"))
    cues2 = build_cues([seg_of(w2)], max_seconds=2.5)
    check_timeline([(c.start, c.end) for c in cues2])
    # the last cue is not stretched past the end of the audio
    assert build_cues([Segment(9.8, 9.9, "end")], duration=10.0)[0].end == 10.0


def test_95_percent_of_cues_at_most_12s_on_long_transcript() -> None:
    rng = random.Random(7)
    vocab = ["the", "a", "speech", "model", "daemon", "chunk", "silence", "word", "time", "server", "of", "we"]
    segments, t = [], 0.0
    for _ in range(400):  # ~30+ minutes of speech, whisper-like segments of 2-25 s
        toks = [rng.choice(vocab) + (rng.choice([",", ".", "?", ""]) if rng.random() < 0.12 else "")
                for _ in range(rng.randint(5, 60))]
        pauses = {i: rng.choices([0.05, 0.1, 0.3, 0.7, 2.0], weights=[50, 25, 15, 7, 3])[0]
                  for i in range(len(toks))}
        words = words_from(" ".join(toks), start=t, word_s=rng.uniform(0.15, 0.45), pauses=pauses)
        segments.append(seg_of(words))
        t = words[-1].end + rng.uniform(0.1, 3.0)
    for segs in (segments, [Segment(s.start, s.end, s.text) for s in segments]):  # with and without words
        cues = build_cues(segs)
        durations = [c.end - c.start for c in cues]
        assert sum(d <= 12.0 for d in durations) >= 0.95 * len(durations)
        check_timeline([(c.start, c.end) for c in cues])
        for c in cues:
            lines = c.text.split("\n")
            assert len(lines) <= 2 and all(len(x) <= 42 for x in lines)
    # word mode: every word lies inside the cue that holds it (timestamps accurate to the speech)
    cues = build_cues(segments)
    all_words = [w for s in segments for w in s.words]
    i = 0
    for c in cues:
        n = len(c.text.split())
        assert c.start == pytest.approx(all_words[i].start)
        assert c.end >= all_words[i + n - 1].end - 1e-9 or c.end == pytest.approx(all_words[i + n].start)
        i += n
    assert i == len(all_words)


# --- renderers ----------------------------------------------------------------------------------------------


def _partial() -> Transcript:
    s1 = seg_of(words_from("Before the gap we talk.", start=2.0))
    s3 = seg_of(words_from("After the gap we talk again.", start=61.0))
    chunks = [
        ChunkResult(Chunk(1, 0.0, 30.0), ChunkStatus.OK, 1, 4.0, (s1,), None, "w0"),
        ChunkResult(Chunk(2, 30.0, 60.0), ChunkStatus.FAILED, 2, 240.5, (), "timed out after 120 s", "w1"),
        ChunkResult(Chunk(3, 60.0, 90.0), ChunkStatus.OK, 1, 4.2, (s3,), None, "w0"),
    ]
    return make_transcript([s1, s3], chunks, duration=90.0)


def test_gaps_rendered_for_failed_chunks() -> None:
    tr = _partial()
    txt = render_txt(tr)
    assert txt.splitlines() == ["Before the gap we talk.",
                                "[untranscribed 30.0-60.0 s: chunk 2: timed out after 120 s]",
                                "After the gap we talk again."]
    srt = parse_srt(render_srt(transcript_cues(tr)))
    check_timeline([(s, e) for _, s, e, _ in srt])
    gap = [c for c in srt if c[3][0].startswith("[untranscribed")]
    assert len(gap) == 1 and gap[0][1:3] == (30.0, 60.0)
    assert " ".join(gap[0][3]) == "[untranscribed: timed out after 120 s]"
    doc = json.loads(render_json(tr, words=False))
    assert doc["gaps"] == [{"chunk": 2, "start": 30.0, "end": 60.0, "error": "timed out after 120 s"}]


def test_unicode_text_everywhere() -> None:
    text = "Grüße aus Köln — ça va? 東京で会いましょう 🎉"
    tr = make_transcript([Segment(0.0, 4.0, text)])
    out = render(tr, ["txt", "srt", "vtt", "json"], words=False)
    for data in out.values():
        assert "Köln" in data.decode("utf-8")
    assert json.loads(out[".json"])["text"] == text
    assert "🎉" in out[".srt"].decode("utf-8")
    cjk = "東京で会いましょう" * 12  # unspaced text is wrapped by characters, never lost
    cues = build_cues([Segment(0.0, 6.0, cjk)])
    assert "".join(c.text.replace("\n", "") for c in cues) == cjk
    cjk_words = tuple(Word(i * 0.2, i * 0.2 + 0.2, ch) for i, ch in enumerate("東京で会いましょう"))
    assert build_cues([seg_of(cjk_words)])[0].text == "東京で会いましょう"  # joined tight, no spaces


def test_json_round_trip() -> None:
    words = (Word(0.12345, 0.5004, " Hello", 0.91234), Word(0.6, 1.0, " world.", 0.8))
    tr = make_transcript([Segment(0.12345, 1.0, " Hello world.", words)])
    plain = json.loads(render_json(tr, words=False))
    assert set(plain) == {"language", "language_probability", "duration", "text", "segments", "gaps"}
    assert plain["segments"] == [{"start": 0.123, "end": 1.0, "text": "Hello world."}]
    assert plain["language"] == "en" and plain["language_probability"] == 0.988 and plain["gaps"] == []
    full = json.loads(render_json(tr, words=True))
    assert full["segments"][0]["words"][0] == {"start": 0.123, "end": 0.5, "text": "Hello", "probability": 0.912}


def test_render_formats_and_empty_transcript() -> None:
    tr = make_transcript([], duration=30.0)  # pure silence: empty, never a hallucination
    out = render(tr, ["txt", "srt", "vtt", "json"], words=True)
    assert list(out) == [".txt", ".srt", ".vtt", ".json"]
    assert out[".txt"] == b"" and out[".srt"] == b"" and out[".vtt"] == b"WEBVTT\n\n"
    assert json.loads(out[".json"])["segments"] == []
    assert list(render(tr, ["srt"], words=False)) == [".srt"]
    with pytest.raises(ConfigError, match="docx"):
        render(tr, ["txt", "docx"], words=False)


# --- publish ------------------------------------------------------------------------------------------------


def test_publish_report_last_and_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[tuple[str, str]] = []
    real_rename = os.rename

    def recording_rename(src: Any, dst: Any) -> None:
        order.append((Path(src).name, Path(dst).name))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", recording_rename)
    files = {".txt": b"hello\n", ".srt": b"1\n", ".json": b"{}"}
    paths = publish(tmp_path, "talk", files, {"outcome": "success"})
    assert [dst for _, dst in order] == ["talk.txt", "talk.srt", "talk.json", "talk.report.json"]
    assert all(src.startswith(".talk") and ".tmp-" in src for src, _ in order)
    assert paths == {s: tmp_path / f"talk{s}" for s in [*files, REPORT_SUFFIX]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"talk{s}" for s in [*files, REPORT_SUFFIX])
    assert (tmp_path / "talk.txt").read_bytes() == b"hello\n"
    assert json.loads((tmp_path / "talk.report.json").read_text()) == {"outcome": "success"}


def test_publish_overwrites_previous_run(tmp_path: Path) -> None:
    publish(tmp_path, "talk", {".txt": b"old"}, {"run": 1})
    publish(tmp_path, "talk", {".txt": b"new"}, {"run": 2})
    assert (tmp_path / "talk.txt").read_bytes() == b"new"
    assert json.loads((tmp_path / "talk.report.json").read_text()) == {"run": 2}
    assert len(list(tmp_path.iterdir())) == 2


def test_publish_failure_leaves_nothing_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "talk.report.json").write_text('{"run": 1}')  # a previous run's done marker
    real_rename = os.rename
    calls = []

    def failing_rename(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(TransientJobError, match="No space left on device"):
        publish(tmp_path, "talk", {".txt": b"a", ".srt": b"b", ".vtt": b"c"}, {"run": 2})
    # no temp file, no half of the new outputs, and no stale report vouching for them
    assert list(tmp_path.iterdir()) == []


def test_publish_failure_while_writing_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(TransientJobError, match="Input/output error"):
        publish(tmp_path, "talk", {".txt": b"a"}, {})
    assert list(tmp_path.iterdir()) == []


def test_publish_uses_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, tmp = tmp_path / "outbox", tmp_path / ".smapd"
    out.mkdir()
    tmp.mkdir()
    sources: list[Path] = []
    real_rename = os.rename

    def recording_rename(src: Any, dst: Any) -> None:
        sources.append(Path(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", recording_rename)
    publish(out, "x", {".txt": b"t"}, {}, tmp_dir=tmp)
    assert all(s.parent == tmp for s in sources) and list(tmp.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["x.report.json", "x.txt"]


def test_publish_rejects_unserialisable_report_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        publish(tmp_path, "talk", {".txt": b"a"}, {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []
