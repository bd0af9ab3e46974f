"""The test kit itself: a wrong WER or SRT parser, name parser or invariant checker would make the tests
that use it meaningless."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import wave
from pathlib import Path

import av
import numpy as np
import pytest

import testkit as h
from testkit.invariants import Seen, check_spool
from testkit.spoolview import Name, SpoolView, parse_name


def test_normalize() -> None:
    assert h.normalize("  Hello, World!  ") == "hello world"
    assert h.normalize("Don't STOP—the whole-number ratio: 3:2.") == "dont stop the whole number ratio 32"
    assert h.normalize("Concentró   AQUÍ\n") == "concentró aquí"
    assert h.normalize("") == ""


@pytest.mark.parametrize(("ref", "hyp", "expected"), [
    ("the cat sat", "the cat sat", 0.0),
    ("The cat sat.", "the CAT, sat", 0.0),
    ("the cat sat", "the sat", 1 / 3),  # deletion
    ("the cat sat", "the cat sat down", 1 / 3),  # insertion
    ("the cat sat", "a cat sat", 1 / 3),  # substitution
    ("a b c d", "", 1.0),
    ("a b", "x y z w", 2.0),  # WER can exceed 1
    ("", "", 0.0),
    ("", "hello", 1.0),
])
def test_wer(ref: str, hyp: str, expected: float) -> None:
    assert h.wer(ref, hyp) == pytest.approx(expected)


def test_word_errors_sum_to_corpus_wer() -> None:
    pairs = [("a b c d", "a b c d"), ("e f", "e x")]
    edits = sum(h.word_errors(r, x)[0] for r, x in pairs)
    words = sum(h.word_errors(r, x)[1] for r, x in pairs)
    assert (edits, words) == (1, 6)


def test_word_recall_ignores_order_and_counts_repeats() -> None:
    assert h.word_recall("the dog and the cat", "cat the dog and") == pytest.approx(4 / 5)
    assert h.word_recall("", "anything") == 1.0


SRT = ("\ufeff1\r\n00:00:01,000 --> 00:00:03,500\r\nHello there,\r\nworld.\r\n\r\n"
       "2\r\n01:02:03,040 --> 01:02:04,000\r\nSecond cue\r\n")


def test_parse_srt() -> None:
    assert h.parse_srt(SRT) == [(1.0, 3.5, "Hello there, world."), (3723.04, 3724.0, "Second cue")]
    assert h.parse_srt("") == []


def test_parse_vtt() -> None:
    vtt = ("WEBVTT\n\n00:01.000 --> 00:02.250\n<v Speaker>Hi</v>\n\n"
           "note-id\n00:00:03.000 --> 00:00:04.000 align:start\nBye\n")
    assert h.parse_vtt(vtt) == [(1.0, 2.25, "Hi"), (3.0, 4.0, "Bye")]
    with pytest.raises(ValueError):
        h.parse_vtt(SRT)


def test_manifest_matches_the_data_dir(manifest: list[dict[str, str]], data_dir: Path) -> None:
    files = {r["file"] for r in manifest}
    on_disk = {p.name for p in data_dir.iterdir() if p.suffix in {".wav", ".flac", ".mp3", ".ogg"}}
    assert files == on_disk
    english = [r for r in manifest if r["language"] == "en"]
    assert len(english) >= 8
    assert {Path(r["file"]).suffix for r in english} >= {".wav", ".flac", ".mp3", ".ogg"}
    for r in manifest:
        assert r["reference_text"].strip(), r["file"]
        duration = h.audio_info(data_dir / r["file"])["duration"]
        assert duration == pytest.approx(float(r["seconds"]), abs=0.1), r["file"]


def test_longform_spans_match_the_audio(longform) -> None:  # type: ignore[no-untyped-def]
    with wave.open(str(longform.path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        seconds = w.getnframes() / w.getframerate()
    assert seconds == pytest.approx(longform.duration)
    assert 240 <= seconds <= 360
    assert longform.spans[0]["start"] == 0.0
    pcm = h.decode_pcm16(longform.path)
    clips = {p.name: h.decode_pcm16(p) for p, _ in h.manifest_clips("en")}
    prev_end = 0.0
    for span in longform.spans:
        assert span["start"] >= prev_end
        prev_end = span["end"]
        a, b = round(span["start"] * 16000), round(span["end"] * 16000)
        # The span holds exactly that clip's samples, and its room tone follows it (no digital silence).
        clip = clips[span["file"]]
        assert (pcm[a:b] == clip[: b - a]).all(), span
        assert b - a == pytest.approx(len(clip), abs=1)
        pause = pcm[b: b + 4000]
        assert (pause == h.room_tone_of(clip, len(pause))).all() and pause.any(), span
        assert span["start"] <= span["speech_start"] < span["speech_end"] <= span["end"]
        assert span["speech_start"] - span["start"] < 1.0 and span["end"] - span["speech_end"] < 1.0
    assert longform.spans[-1]["end"] <= seconds
    gaps = [n["start"] - p["end"] for p, n in zip(longform.spans, longform.spans[1:])]
    assert min(gaps) >= 0.29 and max(gaps) <= 8.01 and any(g >= 4.0 for g in gaps)
    assert longform.reference_text == " ".join(s["text"] for s in longform.spans)
    assert json.loads(longform.path.with_suffix(".json").read_text()) == longform.spans
    assert all(a["file"] != b["file"] for a, b in zip(longform.spans, longform.spans[1:]))


def test_make_longform_is_reproducible(tmp_path: Path) -> None:
    clips = h.manifest_clips("en")[:3]
    a = h.make_longform(clips, tmp_path / "a.wav", seed=3, repeat=2)
    b = h.make_longform(clips, tmp_path / "b.wav", seed=3, repeat=2)
    assert a == b and len(a.spans) == 6
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


@pytest.mark.parametrize("fmt", h.SAMPLE_FORMATS)
@pytest.mark.parametrize(("channels", "rate"), [(1, 8000), (2, 44100), (6, 48000)])
def test_speech_variants_decode(tmp_path: Path, fmt: str, channels: int, rate: int) -> None:
    src = h.DATA_DIR / "librivox-sense_and_sensibility_01_austen_64kb-0870.wav"
    out = h.write_speech_variant(src, tmp_path / "v.wav", rate, channels, fmt)
    info = h.audio_info(out)
    assert (info["rate"], info["channels"]) == (rate, channels)
    assert info["codec"] == {"u8": "pcm_u8", "s16": "pcm_s16le", "s24": "pcm_s24le",
                             "s32": "pcm_s32le", "f32": "pcm_f32le"}[fmt]
    assert len(h.decode_pcm16(out)) / 16000 == pytest.approx(7.1, abs=0.01)


def test_bad_input_makers(tmp_path: Path) -> None:
    src = h.DATA_DIR / "librispeech-121-127105-0000.flac"
    video = h.write_video_without_audio(tmp_path / "clip.mp4")
    with av.open(str(video)) as c:
        assert [s.type for s in c.streams] == ["video"]
    for bad in (h.write_text_as(tmp_path / "list.mp3"), h.write_random_bytes(tmp_path / "noise.wav"),
                h.write_empty(tmp_path / "empty.wav"),
                h.write_truncated_copy(src, tmp_path / "cut.flac", 0.3)):
        with pytest.raises(av.error.FFmpegError):
            h.decode_pcm16(bad)
    assert not h.decode_pcm16(h.write_silence_wav(tmp_path / "s.wav", 2.0)).any()
    assert h.decode_pcm16(h.write_noise_wav(tmp_path / "n.wav", 2.0)).std() > 1000
    m4a = h.encode_audio(src, tmp_path / "x.m4a", "aac")
    assert h.audio_info(m4a)["codec"] == "aac"
    long = h.write_long_silence_flac(tmp_path / "long.flac", 3 * 3600)
    assert h.audio_info(long)["duration"] == pytest.approx(10800, abs=1)
    assert long.stat().st_size < 5_000_000


def test_sleepy_engine_dies_with_its_process_group(tools_dir: Path, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    proc = subprocess.Popen([str(tools_dir / "sleepy-engine"), "-f", "x.wav"], start_new_session=True,
                            env={**os.environ, "SLEEPY_PID_FILE": str(pids)})
    try:
        assert h.wait_for(lambda: pids.exists() and pids.read_text().strip(), timeout=5)
        parent, child = map(int, pids.read_text().split())
        assert parent == proc.pid and os.getpgid(child) == proc.pid
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    assert h.wait_gone(child, timeout=5)


def test_crashy_engine_segfaults(tools_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "attempts"
    result = subprocess.run([str(tools_dir / "crashy-engine"), "-f", "x.wav"], check=False, timeout=10,
                            env={**os.environ, "CRASHY_MARKER": str(marker)})
    assert result.returncode == -signal.SIGSEGV
    assert len(marker.read_text().split()) == 1


def test_sphinx_transcribe_recognises_speech(sphinx_transcribe: Path, tmp_path: Path) -> None:
    clip, ref = next((p, t) for p, t in h.manifest_clips("en") if p.name.startswith("librispeech-1320"))
    wav = h.write_pcm16_wav(tmp_path / "in.wav", h.decode_pcm16(clip))
    subprocess.run([str(sphinx_transcribe), "-m", "ignored", "-f", str(wav), "-otxt",
                    "-of", str(tmp_path / "out")],
                   check=True, timeout=120)
    hyp = (tmp_path / "out.txt").read_text()
    assert h.wer(ref, hyp) < 0.5, hyp  # pocketsphinx is a weak recognizer: about 0.15 on this clip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "out.txt"]  # no temp file left


def test_sphinx_transcribe_fails_cleanly(sphinx_transcribe: Path, tmp_path: Path) -> None:
    wrong_rate = h.write_silence_wav(tmp_path / "in.wav", 1.0, rate=22050)
    result = subprocess.run([str(sphinx_transcribe), "-f", str(wrong_rate), "-of", str(tmp_path / "out")],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert not (tmp_path / "out.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav"]


def test_room_tone_is_the_clips_own_quiet_edges() -> None:
    for clip, _ in h.manifest_clips("en"):
        pcm = h.decode_pcm16(clip)
        a, b = h.speech_bounds(pcm)
        tone = h.room_tone_of(pcm, 3 * h.RATE)
        assert len(tone) == 3 * h.RATE and tone.dtype == np.int16
        speech_rms = np.sqrt(np.mean(pcm[a:b].astype(np.float64) ** 2))
        tone_rms = np.sqrt(np.mean(tone.astype(np.float64) ** 2))
        assert tone_rms < 0.2 * speech_rms, clip.name  # background, not words
        edges = set(np.concatenate([pcm[:a], pcm[b:]]).tolist())
        assert set(tone[:2000].tolist()) <= edges, clip.name  # recorded samples, none made up


# --------------------------------------------------------------------------------------------
# The spool's names, the environment, the invariant checker
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "name", "expected"), [
    ("processing", "talk.mp3__web1_3f2a9c1e4b7d_a1_p4242", Name("talk.mp3", "3f2a9c1e4b7d", "web1", 1, 4242)),
    ("processing", "a__b_c.wav__n-2_0123456789ab_a12_p7_t", Name("a__b_c.wav", "0123456789ab", "n-2", 12, 7, True)),
    ("processing", "new\nline.ogg__x_0123456789ab_a1_p1", Name("new\nline.ogg", "0123456789ab", "x", 1, 1)),
    ("processing", "talk.mp3", None),
    ("processing", "talk.mp3__web_1_3f2a9c1e4b7d_a1_p4242", None),  # node names hold no "_"
    ("archive", "3f2a9c1e4b7d.talk.mp3", Name("talk.mp3", "3f2a9c1e4b7d")),
    ("archive", "3f2a9c1e4b7d.a.b.c", Name("a.b.c", "3f2a9c1e4b7d")),
    ("failed", "3f2a9c1e4b7d.pipe.wav", Name("pipe.wav", "3f2a9c1e4b7d")),
    ("failed", "3f2a9c1e4b7d.pipe.wav.report.json", None),
    ("archive", "talk.mp3", None),
])
def test_parse_name(state: str, name: str, expected: Name | None) -> None:
    assert parse_name(state, name) == expected


def test_env_scrubs_every_smapd_setting_and_systemds_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from smapd.settings import _SMAP_NAMES  # the SMAP names smapd reads without a prefix

    for name in (*_SMAP_NAMES, "SMAPD_LANGUAGE", "smapd_formats", "max_concurrent_jobs", "NOTIFY_SOCKET",
                 "WATCHDOG_USEC"):
        monkeypatch.setenv(name, "from-the-shell")
    monkeypatch.setenv("KEEP_ME", "1")
    env = h.daemon_env("/cache", SMAPD_FORMATS="txt", CHUNK_TIMEOUT=4)
    assert {k for k, v in env.items() if v == "from-the-shell"} == set()
    assert env["KEEP_ME"] == "1" and env["SMAPD_MODEL_CACHE"] == "/cache"
    assert env["SMAPD_FORMATS"] == "txt" and env["CHUNK_TIMEOUT"] == "4" and env["MAX_PARALLEL_WORKERS"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[-1] == str(h.REPO)


def _fake_spool(root: Path) -> SpoolView:
    """A finished spool written by hand: a.wav published by n2's attempt 2, b.wav failed."""
    for d in ("inbox", "processing", "outbox", "archive", "failed"):
        (root / d).mkdir(parents=True)
    job = "0123456789ab"
    for suffix in (".txt", ".srt"):
        (root / "outbox" / f"a{suffix}").write_text("words\n")
    report = {"outcome": "success", "outputs": {".txt": "a.txt", ".srt": "a.srt"},
              "input": {"name": "a.wav"},
              "job": {"id": job, "attempt": 2, "node": "n2", "original_name": "a.wav",
                      "claimed_as": f"a.wav__n2_{job}_a2_p9",
                      "attempts": [{"attempt": 1, "node": "n1"}, {"attempt": 2, "node": "n2"}]}}
    (root / "outbox" / "a.report.json").write_text(json.dumps(report))
    (root / "archive" / f"{job}.a.wav").write_bytes(b"RIFF")
    (root / "failed" / "ba9876543210.b.wav").write_bytes(b"")
    (root / "failed" / "ba9876543210.b.wav.report.json").write_text(json.dumps(
        {"outcome": "failed", "error": "empty (0 bytes)", "input": {"name": "b.wav"},
         "job": {"id": "ba9876543210", "attempt": 1, "node": "n1"}, "attempts": [{"attempt": 1}]}))
    return SpoolView(root)


def test_check_spool_passes_a_sound_spool(tmp_path: Path) -> None:
    sp = _fake_spool(tmp_path / "spool")
    found = check_spool(sp, ["a.wav", "b.wav"], max_attempts=3, seen={"0123456789ab": Seen(2, "n2")})
    assert found, str(found)
    assert found.published_once == {"a.wav"} and found.report("b.wav") is not None
    # a node that took the job over after it was published only archived it: its later claim is fine
    written = (sp.outbox / "a.report.json").stat().st_mtime
    assert check_spool(sp, ["a.wav", "b.wav"], seen={"0123456789ab": Seen(3, "n3", since=written + 1)})
    # an attempt record its node could not write (a full disk) proves nothing either way
    path = sp.outbox / "a.report.json"
    rep = json.loads(path.read_text())
    rep["job"]["attempts"][-1] = {"attempt": 2, "node": None, "note": "no record"}
    path.write_text(json.dumps(rep))
    os.utime(path, (written, written))
    assert check_spool(sp, ["a.wav", "b.wav"]), str(check_spool(sp, ["a.wav", "b.wav"]))


def test_check_spool_catches_each_broken_invariant(tmp_path: Path) -> None:
    """Each mutation of a sound spool is caught: a checker that cannot fail proves nothing."""

    def broken(mutate, **kwargs) -> str:  # type: ignore[no-untyped-def]
        root = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        sp = _fake_spool(root)
        mutate(root)
        found = check_spool(sp, ["a.wav", "b.wav"], **{"max_attempts": 3, **kwargs})
        assert not found, f"not caught: {mutate.__doc__}"
        return str(found)

    def lost(r: Path) -> None:
        """the original of a.wav deleted"""
        (r / "archive" / "0123456789ab.a.wav").unlink()

    def twice(r: Path) -> None:
        """a.wav in inbox/ and archive/"""
        (r / "inbox" / "a.wav").write_bytes(b"")

    def orphan(r: Path) -> None:
        """a claim left in processing/"""
        (r / "processing" / "c.wav__n1_00000000000c_a1_p1").write_bytes(b"")

    def no_report(r: Path) -> None:
        """b.wav failed without its report"""
        (r / "failed" / "ba9876543210.b.wav.report.json").unlink()

    def missing_output(r: Path) -> None:
        """a.srt listed but gone"""
        (r / "outbox" / "a.srt").unlink()

    def late_output(r: Path) -> None:
        """a.txt rewritten after the report (a late node overwriting the stem)"""
        later = (r / "outbox" / "a.report.json").stat().st_mtime + 5
        os.utime(r / "outbox" / "a.txt", (later, later))

    def temp_file(r: Path) -> None:
        """a temp file in outbox/"""
        (r / "outbox" / ".a.txt.tmp-1").write_text("x")

    def stale_publisher(r: Path) -> None:
        """the report rewritten by attempt 1 (its node slept past the lease)"""
        path = r / "outbox" / "a.report.json"
        rep = json.loads(path.read_text())
        rep["job"].update(attempt=1, node="n1", claimed_as="a.wav__n1_0123456789ab_a1_p8",
                          attempts=[{"attempt": 1, "node": "n1"}])
        path.write_text(json.dumps(rep))

    def too_many(r: Path) -> None:
        """a failed report with 4 attempts"""
        path = r / "failed" / "ba9876543210.b.wav.report.json"
        rep = json.loads(path.read_text())
        rep["attempts"] = [{"attempt": n} for n in range(1, 5)]
        path.write_text(json.dumps(rep))

    for mutate in (lost, twice, orphan, no_report, missing_output, late_output, temp_file, too_many):
        broken(mutate)
    # consistent in itself: only the claims seen during the run tell that attempt 2 existed
    assert "the last claim seen was attempt 2 by n2" in broken(stale_publisher, seen={"0123456789ab": Seen(2, "n2")})
    assert "the last claim seen was attempt 3" in broken(lambda r: None, seen={"0123456789ab": Seen(3, "n3")})
