"""`smapd transcribe` end to end: the real model on real speech, real files, real processes.

Accuracy is judged on a long-form recording whose pauses are the clips' own room tone, not digital
silence: against what smapd reaches now (the model is embedded, so it is the same everywhere) and
against faster-whisper's own sequential whole-file transcription, measured in the same test.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import testkit as tk
from testkit import smapd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def base_env(model_cache_dir: Path, model_dir: Path) -> dict[str, str]:
    return tk.smapd_env(model_cache_dir)


@pytest.fixture(scope="session")
def longform_run(tmp_path_factory: pytest.TempPathFactory, longform, base_env) -> dict:
    """smapd transcribe on the long-form recording, once per session (outputs + log)."""
    out = tmp_path_factory.mktemp("longform-out")
    started = time.monotonic()
    proc = smapd("transcribe", str(longform.path), "-o", str(out), env=base_env)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = longform.path.stem
    return {"out": out, "stem": stem, "log": proc.stderr, "wall": wall,
            "report": tk.load_json(out / f"{stem}.report.json")}


@pytest.fixture(scope="session")
def sequential_text(longform, model_dir: Path) -> str:
    """faster-whisper's plain sequential whole-file transcription: the accuracy baseline."""
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=os.cpu_count() or 1)
    segments, _ = model.transcribe(str(longform.path), beam_size=5)
    return " ".join(s.text for s in segments)


# Measured 2026-12-01 (commit after 741e44b, 2-core VM, the embedded whisper base, defaults): chunked
# parallel 5.60%, sequential whole-file 12.19% (it invents words in the long pauses of room tone).
# The bound leaves one point for noise (thread counts, CPU kernels): a regression of 1+ point fails.
LONGFORM_WER_MEASURED = 0.056
WER_NOISE = 0.01


def test_longform_wer_matches_sequential(longform, longform_run, sequential_text):
    ours = (longform_run["out"] / f"{longform_run['stem']}.txt").read_text()
    ours_wer = tk.wer(longform.reference_text, ours)
    seq_wer = tk.wer(longform.reference_text, sequential_text)
    print(f"WER chunked parallel {ours_wer:.2%} vs sequential whole-file {seq_wer:.2%}")
    assert ours_wer <= LONGFORM_WER_MEASURED + WER_NOISE, \
        f"chunked WER {ours_wer:.2%}: over the {LONGFORM_WER_MEASURED:.1%} smapd reached (+1 point)"
    assert ours_wer <= seq_wer + WER_NOISE, f"chunked WER {ours_wer:.2%} vs sequential {seq_wer:.2%}"


def test_srt_cues_follow_the_speech(longform, longform_run):
    cues = tk.parse_srt((longform_run["out"] / f"{longform_run['stem']}.srt").read_text())
    assert cues, "no cues"
    recalls = [tk.word_recall(span["text"], tk.cue_words_in_span(cues, span["start"], span["end"]))
               for span in longform.spans]
    mean_recall = sum(recalls) / len(recalls)
    short = sum(1 for s, e, _ in cues if e - s <= 12.0) / len(cues)
    print(f"clip recall in cues (+-1 s): {mean_recall:.1%}; cues <= 12 s: {short:.1%} of {len(cues)}")
    assert mean_recall >= 0.90
    assert short >= 0.95
    for (s1, e1, _), (s2, _, _) in itertools.pairwise(cues):
        assert s1 < e1 <= s2 + 1e-3, "cues overlap or run backwards"
    srt = (longform_run["out"] / f"{longform_run['stem']}.srt").read_text()
    for block in srt.strip().split("\n\n"):
        lines = block.split("\n")[2:]  # after the index and the timing line
        assert 1 <= len(lines) <= 2 and all(len(line) <= 42 for line in lines), block


def test_outputs_report_and_progress_lines(longform, longform_run):
    out, stem, report = longform_run["out"], longform_run["stem"], longform_run["report"]
    for suffix in (".txt", ".srt", ".vtt", ".json", ".report.json"):
        assert (out / f"{stem}{suffix}").stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"
    assert (out / f"{stem}.vtt").read_text().startswith("WEBVTT")
    data = json.loads((out / f"{stem}.json").read_text())
    assert data["segments"] and all(s["end"] >= s["start"] for s in data["segments"])
    assert report["outcome"] == "success"
    assert report["input"]["name"] == longform.path.name
    assert report["input"]["sha256"] and len(report["input"]["sha256"]) == 64
    assert abs(report["input"]["duration"] - longform.duration) < 0.1
    assert report["language"]["code"] == "en" and report["language"]["probability"] > 0.5
    assert report["engine"]["name"] == "faster-whisper" and report["engine"]["compute_type"] == "int8"
    assert report["engine"]["workers"] >= 1
    n = len(report["chunks"])
    assert n >= 6, "a 4.5-minute recording in 30 s chunks"
    assert all(c["status"] == "ok" and c["attempts"] == 1 for c in report["chunks"])
    # A chunk may span more file time than Whisper's window (long pauses are left out), never more audio.
    assert all(0 < c["decoded_seconds"] <= 30.0 + 1e-6 for c in report["chunks"])
    assert all(c["language"] == "en" and c["signals"]["avg_logprob"] < 0 for c in report["chunks"])
    totals = report["totals"]
    assert totals["success_rate"] == 100.0 and totals["chunks_ok"] == n
    assert totals["wall_seconds"] > 0 and totals["cpu_seconds"] > 0 and totals["peak_rss_mb"] > 50
    assert totals["real_time_factor"] > 1.0
    log = longform_run["log"]  # not a TTY: SMAP-style lines
    assert f"[1/{n}] Transcribing chunk 1 (" in log
    assert f"Progress: {n}/{n} (100.0%)" in log
    assert "Completed in " in log and " chars" in log
    assert f"Success rate: 100.0% ({n}/{n})" in log


def test_chunk_cuts_never_fall_inside_a_clip(longform, longform_run):
    """Silence-aware chunks: every cut lies outside the clips' speech (all clips here are < 30 s).

    Speech, not the clip file: a cut in a clip's leading room noise cuts no word. The bounds come from
    ``speech_bounds``, which marks the onset early on a quiet clip (fleurs-en-006: a cut 0.11 s after
    its marked onset loses no word, measured), hence 0.3 s of slack on either side."""
    cuts = [c["start"] for c in longform_run["report"]["chunks"][1:]]
    for cut in cuts:
        inside = [s for s in longform.spans if s["speech_start"] + 0.3 < cut < s["speech_end"] - 0.3]
        assert not inside, f"cut at {cut} s falls inside the speech of {inside[0]['file']}"


def test_formats_and_sample_rates_and_channels(tmp_path, data_dir, base_env):
    """mp3, 8 kHz, 48 kHz 6-channel 24-bit, float WAV, opus: the same words come out."""
    src = data_dir / "librispeech-2412-153948-0000.flac"
    ref = next(r["reference_text"] for r in tk.read_manifest() if r["file"] == src.name)
    variants = [
        tk.write_speech_variant(src, tmp_path / "v8k.wav", rate=8000),
        tk.write_speech_variant(src, tmp_path / "v48k6ch.wav", rate=48000, channels=6, sample_format="s24"),
        tk.write_speech_variant(src, tmp_path / "vfloat.wav", rate=22050, channels=2, sample_format="f32"),
        tk.encode_audio(src, tmp_path / "vopus.ogg", "libopus", rate=48000),
        data_dir / "ljspeech-LJ001-0005.mp3",
    ]
    out = tmp_path / "out"
    proc = smapd("transcribe", *map(str, variants), "-o", str(out), "--language", "en", env=base_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for v in variants[:4]:
        text = (out / f"{v.stem}.txt").read_text()
        assert tk.wer(ref, text) < 0.2, (v.name, text)
        report = tk.load_json(out / f"{v.stem}.report.json")
        assert report["outcome"] == "success"
    assert tk.load_json(out / "v48k6ch.report.json")["input"]["channels"] == 6


def test_language_is_detected_once_on_speech(tmp_path, data_dir, base_env):
    """A Spanish clip after 20 s of silence: detection runs on the speech, not the silent intro."""
    clip = data_dir / "fleurs-es-002.ogg"
    ref = next(r["reference_text"] for r in tk.read_manifest() if r["file"] == clip.name)
    wav = tmp_path / "late_spanish.wav"
    lf = tk.make_longform([(clip, ref)], wav, lead_silence=20.0)
    out = tmp_path / "out"
    proc = smapd("transcribe", str(wav), "-o", str(out), env=base_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = tk.load_json(out / "late_spanish.report.json")
    assert report["language"]["code"] == "es", report["language"]
    assert tk.wer(lf.reference_text, (out / "late_spanish.txt").read_text()) < 0.35
    assert report["chunks"][0]["start"] >= 15.0, "the silent intro was fed to the decoder"


def test_translate_task(tmp_path, data_dir, base_env):
    out = tmp_path / "out"
    proc = smapd("transcribe", str(data_dir / "fleurs-es-002.ogg"), "-o", str(out), "--task", "translate",
                 "--formats", "txt", env=base_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (out / "fleurs-es-002.txt").read_text().lower()
    assert sum(w in text.split() for w in ("the", "and", "of", "is", "to", "in", "a")) >= 2, text
    assert not (out / "fleurs-es-002.srt").exists()


def test_sequential_mode_and_fixed_cuts(tmp_path, data_dir, base_env):
    """USE_PARALLEL_TRANSCRIPTION=false gives one slot with all cores; SMAPD_VAD=false SMAP's fixed cuts."""
    clip = data_dir / "librispeech-1320-122617-0001.flac"
    env = dict(base_env, USE_PARALLEL_TRANSCRIPTION="false", SMAPD_VAD="false", SMAPD_CHUNK_SECONDS="5")
    out = tmp_path / "out"
    proc = smapd("transcribe", str(clip), "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = tk.load_json(out / f"{clip.stem}.report.json")
    assert report["engine"]["workers"] == 1 and report["engine"]["cpu_threads"] == (os.cpu_count() or 1)
    starts = [c["start"] for c in report["chunks"]]
    assert starts == [5.0 * i for i in range(len(starts))] and len(starts) == 3


def test_word_timestamps_in_json(tmp_path, data_dir, base_env):
    out = tmp_path / "out"
    clip = data_dir / "ljspeech-LJ001-0001.wav"
    proc = smapd("transcribe", str(clip), "-o", str(out), "--word-timestamps", "true", env=base_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = tk.load_json(out / f"{clip.stem}.json")
    words = [w for s in data["segments"] for w in s["words"]]
    assert len(words) > 10
    assert all(s["start"] - 1e-3 <= w["start"] <= w["end"] <= s["end"] + 1e-3
               for s in data["segments"] for w in s["words"])
    assert words[-1]["end"] <= 9.7 + 0.2  # the clip is 9.66 s long


PARTIAL_CLIPS = ("fleurs-en-006.ogg", "librispeech-121-127105-0000.flac", "ljspeech-LJ001-0001.wav",
                 "librispeech-8555-284447-0000.flac")  # each 9.6-10.8 s: one clip a chunk at 12 s


def test_a_chunk_that_fails_gives_a_partial_job_with_the_gap_marked_in_every_output(tmp_path, data_dir, base_env):
    """Four clips, one a chunk; the worker is killed (SIGKILL) while it transcribes chunk 2 and retries are
    off, so chunk 2 fails for real and the others do not: exit 3, outcome partial, and the gap is marked
    where a reader looks: a txt line, an srt and a vtt cue over the chunk, an entry under json "gaps";
    the words of the other chunks are all there."""
    clips = [(data_dir / f, tk.reference_text(data_dir / f, data_dir)) for f in PARTIAL_CLIPS]
    wav = tmp_path / "partial.wav"
    lf = tk.make_longform(clips, wav, seed=3, pause_range=(3.0, 4.0), long_pause_every=0, room_tone=True)
    env = dict(base_env, MAX_PARALLEL_WORKERS="1", SMAPD_CHUNK_RETRIES="0", SMAPD_CHUNK_SECONDS="12",
               SMAPD_LANGUAGE="en")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "smapd.cli", "transcribe", str(wav), "-o", str(out)],
                            env=env, cwd=tk.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, killed = [], []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if not killed and "Transcribing chunk 2 " in line:  # dispatched to the one worker just now
                killed = [w for w in tk.children(proc.pid) if tk.pid_alive(w)]
                for w in killed:
                    os.killpg(w, signal.SIGKILL)
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(log)
    assert killed, "chunk 2 never started:\n" + err[-3000:]
    assert code == 3, f"exit {code}, not 3 (partial):\n{err[-3000:]}"
    report = tk.load_json(out / "partial.report.json")
    assert report["outcome"] == "partial", report["error"]
    status = [c["status"] for c in report["chunks"]]
    assert status[1] == "failed" and status.count("failed") == 1 and len(status) >= 3, report["chunks"]
    gap = report["chunks"][1]
    assert "SIGKILL" in (gap["error"] or ""), gap
    assert report["totals"]["chunks_failed"] == 1

    txt = (out / "partial.txt").read_text()
    marks = [ln for ln in txt.splitlines() if ln.startswith("[untranscribed")]
    assert len(marks) == 1 and marks[0].startswith(f"[untranscribed {gap['start']:.1f}-{gap['end']:.1f} s: chunk 2: "), txt
    for sub, parse in (("srt", tk.parse_srt), ("vtt", tk.parse_vtt)):
        cues = parse((out / f"partial.{sub}").read_text())
        over = [c for c in cues if c[2].startswith("[untranscribed")]
        assert len(over) == 1 and abs(over[0][0] - gap["start"]) < 0.01 and abs(over[0][1] - gap["end"]) < 0.01, \
            (sub, over, gap)
    data = json.loads((out / "partial.json").read_text())
    assert [(g["chunk"], g["start"], g["end"]) for g in data["gaps"]] == [(2, gap["start"], gap["end"])], data["gaps"]
    assert all(not (gap["start"] <= s["start"] < gap["end"]) for s in data["segments"]), "text inside the gap"
    outside = [s for s in lf.spans if s["speech_end"] <= gap["start"] or s["speech_start"] >= gap["end"]]
    assert 2 <= len(outside) < len(lf.spans), ([(s["start"], s["end"]) for s in lf.spans], gap)
    segments = [(s["start"], s["end"], s["text"]) for s in data["segments"]]
    for span in outside:  # every clip outside the gap is transcribed
        text = tk.cue_words_in_span(segments, span["start"], span["end"], slack=0.0)
        assert tk.word_recall(span["text"], text) >= 0.6, (span["file"], text, txt)
