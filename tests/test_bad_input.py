"""Bad input through `smapd transcribe`: a specific one-line error, a report, a non-zero exit, no traceback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import testkit as tk
from testkit import smapd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(model_cache_dir: Path, model_dir: Path) -> dict[str, str]:
    return tk.smapd_env(model_cache_dir, SMAPD_LANGUAGE="en")


def _bad_files(tmp: Path, data: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a fragment the error must contain)."""
    flac = data / "librispeech-2412-153948-0000.flac"
    return {
        "empty": (tk.write_empty(tmp / "empty.wav"), "empty (0 bytes)"),
        "random": (tk.write_random_bytes(tmp / "random.wav"), "not a readable audio or video file"),
        "text": (tk.write_text_as(tmp / "list.mp3"), "not a readable audio or video file"),
        "video": (tk.write_video_without_audio(tmp / "video.mp4"), "no audio track"),
        "header_only": (tk.write_truncated_copy(data / "ljspeech-LJ001-0001.wav", tmp / "hdr.wav", keep=44),
                        "no audio"),
        "truncated_flac_head": (tk.write_truncated_copy(flac, tmp / "head.flac", keep=30), ""),
    }


def test_each_bad_input_fails_clearly(tmp_path, data_dir, env):
    files = _bad_files(tmp_path, data_dir)
    out = tmp_path / "out"
    for name, (path, fragment) in files.items():
        proc = smapd("transcribe", str(path), "-o", str(out), env=env)
        assert proc.returncode == 1, (name, proc.returncode, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        line = [x for x in proc.stderr.splitlines() if x.startswith("smapd: ")]
        assert len(line) == 1 and str(path) in line[0], (name, proc.stderr[-1500:])
        assert fragment in line[0], (name, line[0])
        report = tk.load_json(out / f"{path.stem}.report.json")
        assert report["outcome"] == "failed" and fragment in report["error"], (name, report["error"])
        assert not (out / f"{path.stem}.txt").exists()


def test_missing_path_and_directory(tmp_path, env):
    proc = smapd("transcribe", str(tmp_path / "nope.wav"), str(tmp_path), "-o", str(tmp_path / "out"), env=env)
    assert proc.returncode == 1
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr
    assert "is a directory" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_unreadable_file(tmp_path, data_dir, env):
    """A file smapd may not read: root without CAP_DAC_OVERRIDE on a mode-000 file owned by nobody."""
    src = tmp_path / "secret.flac"
    shutil.copy(data_dir / "librispeech-2412-153948-0000.flac", src)
    os.chown(src, 65534, 65534)
    os.chmod(src, 0)
    out = tmp_path / "out"
    proc = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                           sys.executable, "-m", "smapd.cli", "transcribe", str(src), "-o", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"smapd: {src}: permission denied" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert tk.load_json(out / "secret.report.json")["outcome"] == "failed"


def test_truncated_file_keeps_what_decodes(tmp_path, data_dir, env):
    """A file cut in half: the first half is transcribed and the report says decoding stopped."""
    src = data_dir / "librispeech-1320-122617-0001.flac"
    cut = tk.write_truncated_copy(src, tmp_path / "half.flac", keep=0.5)
    out = tmp_path / "out"
    proc = smapd("transcribe", str(cut), "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = tk.load_json(out / "half.report.json")
    assert 3.0 < report["input"]["duration"] < 10.0
    assert (out / "half.txt").read_text().strip()


def test_silence_and_noise_give_empty_transcripts(tmp_path, env):
    """No hallucinated 'Thank you.' on silence or noise: success with an empty transcript."""
    files = [tk.write_silence_wav(tmp_path / "silence.wav", 40.0),
             tk.write_noise_wav(tmp_path / "noise.wav", 20.0, amplitude=0.05)]
    out = tmp_path / "out"
    proc = smapd("transcribe", *map(str, files), "-o", str(out), env=dict(env, SMAPD_LANGUAGE="auto"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in files:
        assert (out / f"{f.stem}.txt").read_text().strip() == "", f.name
        report = tk.load_json(out / f"{f.stem}.report.json")
        assert report["outcome"] == "success" and report["chunks"] == []
        assert tk.parse_srt((out / f"{f.stem}.srt").read_text()) == []


def test_bad_settings_exit_2_with_one_line(tmp_path, env):
    cases = {"MAX_PARALLEL_WORKERS": "lots", "CHUNK_TIMEOUT": "-1", "SMAPD_CHUNK_SECONDS": "90",
             "USE_PARALLEL_TRANSCRIPTION": "perhaps", "SMAPD_FORMATS": "txt,docx"}
    for name, value in cases.items():
        proc = smapd("transcribe", "x.wav", "-o", str(tmp_path), env=dict(env, **{name: value}))
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and repr(value) in lines[0], (name, proc.stderr)
    conf = tmp_path / "smapd.env"
    conf.write_text("MAX_CONCURRENT_JOBS=0\n")
    proc = smapd("transcribe", "x.wav", env=dict(env, SMAPD_CONFIG=str(conf)))
    assert proc.returncode == 2 and "MAX_CONCURRENT_JOBS='0'" in proc.stderr, proc.stderr


def test_corrupt_model_is_a_clear_error(tmp_path, model_dir, env, data_dir):
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    with open(bad / "model.bin", "r+b") as f:
        f.truncate(1000)
    proc = smapd("transcribe", str(data_dir / "fleurs-en-003.ogg"), "-o", str(tmp_path),
                 env=dict(env, SMAPD_MODEL=str(bad)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot load the Whisper model" in proc.stderr
    cache = tmp_path / "cache"
    shutil.copytree(model_dir, cache / "whisper-base-ct2")
    with open(cache / "whisper-base-ct2" / "model.bin", "ab") as f:
        f.write(b"x")
    proc = smapd("transcribe", str(data_dir / "fleurs-en-003.ogg"), "-o", str(tmp_path),
                 env=dict(env, SMAPD_MODEL_CACHE=str(cache)))
    assert proc.returncode == 2 and "changed size" in proc.stderr, proc.stderr[-2000:]
