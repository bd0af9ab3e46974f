"""Fast unit tests of logic: chunking on synthetic VAD probabilities, settings, model assembly."""
from __future__ import annotations

import itertools
import multiprocessing
import os
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

import testkit as tk
from smapd import audio, chunking
from smapd.errors import ConfigError, ModelError
from smapd.model import MODEL_BIN_SIZE, ensure_embedded, verify_embedded
from smapd.settings import load_settings, plan_workers

STEP = chunking.FRAME / audio.RATE


def _probs(spans: list[tuple[float, float]], duration: float, quiet: float = 0.0) -> np.ndarray:
    """Frame probabilities: 0.95 inside the speech spans, ``quiet`` elsewhere."""
    p = np.full(int(duration / STEP), quiet, dtype=np.float32)
    for s, e in spans:
        p[int(s / STEP):int(e / STEP)] = 0.95
    return p


def _chunks(spans, duration, limit=30.0, quiet=0.0):
    samples = np.zeros(int(duration * audio.RATE), dtype=np.int16)
    return chunking.silence_chunks(samples, limit, probs=_probs(spans, duration, quiet))


def test_cuts_fall_in_pauses_and_respect_the_limit():
    # 12 sentences of 4 s with 1.5 s pauses, then one 3 s pause
    spans, t = [], 1.0
    for i in range(12):
        spans.append((t, t + 4.0))
        t += 4.0 + (3.0 if i == 5 else 1.5)
    chunks = _chunks(spans, t + 1.0)
    assert len(chunks) >= 3
    for c in chunks:
        assert c.end - c.start <= 30.0 + 1e-6
    for a, b in itertools.pairwise(chunks):
        cut = b.start
        assert not any(s + 0.05 < cut < e - 0.05 for s, e in spans), f"cut at {cut} inside speech"
        assert a.end <= b.start + 1e-6
    covered = [s for s in spans if any(c.start <= s[0] and s[1] <= c.end for c in chunks)]
    assert covered == spans, "every sentence lies whole inside one chunk"


def test_over_long_speech_is_cut_at_its_quietest_point():
    p = _probs([(0.0, 70.0)], 70.0)
    dip = int(25.0 / STEP)  # inside the first cut window (15-30 s)
    p[dip - 3:dip + 3] = 0.3  # a breath, still "speech" for the VAD
    chunks = chunking.silence_chunks(np.zeros(70 * audio.RATE, dtype=np.int16), 30.0, probs=p)
    assert all(c.end - c.start <= 30.0 + 1e-6 for c in chunks)
    assert any(abs(c.start - 25.0) < 0.5 for c in chunks), [c.start for c in chunks]


def test_silence_and_noise_without_speech_give_no_chunks():
    assert _chunks([], 60.0) == []
    assert _chunks([], 60.0, quiet=0.3) == []  # "maybe speech" never reaches the threshold


def test_dead_silence_is_skipped_but_quiet_speech_is_kept():
    # speech, 20 s of digital silence, speech; a stretch of low (0.2) probability stays in
    p = _probs([(1.0, 8.0), (30.0, 36.0)], 40.0)
    p[int(10 / STEP):int(13 / STEP)] = 0.2
    chunks = chunking.silence_chunks(np.zeros(40 * audio.RATE, dtype=np.int16), 30.0, probs=p)
    assert chunks[0].start == 0.0 and chunks[-1].end >= 36.0
    assert not any(c.start < 20.0 < c.end for c in chunks), "a 17 s dead silence was fed to the decoder"
    assert any(c.start <= 10.0 and 13.0 <= c.end for c in chunks), "quiet stretch dropped"


def test_fixed_chunks_are_smap_cuts():
    assert [(c.start, c.end) for c in chunking.fixed_chunks(65.0, 30.0)] == [(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]


def test_decode_takes_16k_mono_pcm_as_it_is_and_resamples_the_rest(tmp_path):
    """A 16 kHz mono int16 WAV (what smapd and most recorders for speech write) is taken sample
    for sample without the resampler; other rates and layouts are still resampled to it."""
    rng = np.random.default_rng(3)
    x = 0.2 * rng.standard_normal(audio.RATE * 7)
    plain = tk.write_wav(tmp_path / "plain.wav", x)
    with wave.open(str(plain)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    assert np.array_equal(audio.decode(plain).samples, pcm)
    stereo = tk.write_wav(tmp_path / "stereo.wav", np.stack([x, x], axis=1), rate=44100)
    d = audio.decode(stereo)
    seconds = len(x) / 44100
    assert abs(len(d.samples) / audio.RATE - seconds) < 0.01, "44.1 kHz resampled to 16 kHz"
    assert 0.5 < np.abs(d.samples).astype(float).mean() / np.abs(pcm).astype(float).mean() < 2
    assert d.info.sample_rate == 44100 and d.info.channels == 2


def test_level_speech_raises_quiet_parts_only():
    t = np.arange(audio.RATE * 4) / audio.RATE
    loud = (0.3 * np.sin(2 * np.pi * 220 * t[:audio.RATE * 2]) * 32767).astype(np.int16)
    quiet = (0.001 * np.sin(2 * np.pi * 220 * t[:audio.RATE * 2]) * 32767).astype(np.int16)
    samples = np.concatenate([loud, np.zeros(audio.RATE * 2, np.int16), quiet])
    before = samples.copy()
    audio.level_speech(samples)
    assert np.array_equal(samples[:audio.RATE], before[:audio.RATE]), "loud speech changed"
    assert np.abs(samples[-audio.RATE:]).max() > 20 * np.abs(before[-audio.RATE:]).max()
    assert np.abs(samples[audio.RATE * 2 + 12000:audio.RATE * 3]).max() == 0, "digital silence stays silent"


def test_level_speech_levels_the_end_of_a_long_file_too():
    """Past 2**24 samples (17.5 min) a float32 arange of positions repeats its start: every 60 s
    block then got the gain of its first sample, so the quiet speakers of the rest of a 1-hour
    recording were left at -64 dBFS and the VAD and the decoder lost them."""
    rate, minutes = audio.RATE, 19
    samples = np.zeros(rate * 60 * minutes, np.int16)
    t = np.arange(rate * 2) / rate
    quiet = (0.001 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    at = rate * 60 * minutes - rate * 40  # 18 min 20 s: inside the block that starts at 18 min
    samples[at:at + len(quiet)] = quiet
    block = rate * 60 * 18  # where the leveler's 60 s block begins: loud there (a gain of 1)
    samples[block - rate:block + rate] = (0.3 * np.sin(2 * np.pi * 220 * np.arange(2 * rate) / rate) * 32767).astype(np.int16)
    audio.level_speech(samples)
    middle = samples[at + rate // 2:at + rate * 3 // 2]
    assert np.abs(middle).max() > 20 * np.abs(quiet).max(), np.abs(middle).max()


# --- settings ------------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("SMAPD_") or k in ("MAX_PARALLEL_WORKERS", "USE_PARALLEL_TRANSCRIPTION",
                                           "MAX_CONCURRENT_JOBS", "CHUNK_TIMEOUT"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_smap_names_and_prefixed_names(clean_env):
    clean_env.setenv("MAX_PARALLEL_WORKERS", "1")
    clean_env.setenv("CHUNK_TIMEOUT", "45")
    clean_env.setenv("MAX_CONCURRENT_JOBS", "3")
    clean_env.setenv("SMAPD_LANGUAGE", "DE")
    s = load_settings()
    assert (s.max_parallel_workers, s.chunk_timeout_seconds, s.max_concurrent_jobs, s.language) == (1, 45.0, 3, "de")
    assert plan_workers(s).workers == 1


def test_defaults_and_auto_plan(clean_env):
    s = load_settings()
    plan = plan_workers(s)
    assert s.chunk_timeout_seconds == max(120.0, 4 * s.chunk_seconds)
    assert 1 <= plan.workers <= plan.cores and plan.workers * plan.cpu_threads <= plan.cores
    clean_env.setenv("USE_PARALLEL_TRANSCRIPTION", "false")
    plan = plan_workers(load_settings())
    assert plan.workers == 1 and plan.cpu_threads == plan.cores


def test_env_file_and_precedence(clean_env, tmp_path):
    conf = tmp_path / "smapd.env"
    conf.write_text("MAX_CONCURRENT_JOBS=4\nSMAPD_BEAM_SIZE=2\n")
    clean_env.setenv("SMAPD_CONFIG", str(conf))
    clean_env.setenv("SMAPD_BEAM_SIZE", "3")  # the environment wins over the file
    s = load_settings()
    assert s.max_concurrent_jobs == 4 and s.beam_size == 3
    (tmp_path / ".env").write_text("MAX_CONCURRENT_JOBS=7\n")
    clean_env.delenv("SMAPD_CONFIG")
    assert load_settings().max_concurrent_jobs == 7


@pytest.mark.parametrize("name,value", [("MAX_PARALLEL_WORKERS", "0"), ("CHUNK_TIMEOUT", "soon"),
                                        ("SMAPD_WATCH", "magic"), ("SMAPD_NODE", "a/b")])
def test_bad_values_name_the_setting(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert name in str(e.value) and repr(value) in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file_is_one_line(clean_env, tmp_path):
    clean_env.setenv("SMAPD_CONFIG", str(tmp_path / "nope.env"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings()


# --- the embedded model ------------------------------------------------------------------------

def _assemble(cache: str) -> str:
    return str(ensure_embedded(Path(cache)))


@pytest.mark.slow
def test_model_assembly_is_atomic_when_two_processes_race(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.map(_assemble, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    verify_embedded(Path(paths[0]))
    assert [p.name for p in tmp_path.iterdir()] == ["whisper-base-ct2"], "temp dirs left behind"


@pytest.mark.slow
def test_corrupt_model_is_detected(tmp_path, model_dir):
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    with open(bad / "model.bin", "r+b") as f:
        f.seek(MODEL_BIN_SIZE // 2)
        f.write(b"\0" * 16)
    with pytest.raises(ModelError, match="SHA-256"):
        verify_embedded(bad)


# --- the lease of a file smapd does not own -------------------------------------------------------

_LEASE_SNIPPET = """
import sys, time
from pathlib import Path
from smapd.spool import Spool
s = Spool(Path(sys.argv[1]), "n1", lease_seconds=3)
c = s.claim("theirs.wav")
assert c is not None, "claim failed"
time.sleep(2); s.heartbeat(c); time.sleep(2)
other = Spool(Path(sys.argv[1]), "n2", lease_seconds=3)  # another node: judges by the lease alone
assert other.recoverable() == [], "a refreshed lease looks stale"
print("ok")
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_lease_of_a_file_owned_by_another_user(tmp_path):
    """The service user cannot touch a 0644 file someone else dropped: the lease must still refresh."""
    import subprocess
    import sys

    from smapd.spool import Spool

    Spool(tmp_path, "n1").ensure_layout()
    dropped = tmp_path / "inbox" / "theirs.wav"
    dropped.write_bytes(b"RIFF")
    os.chown(dropped, 65534, 65534)
    dropped.chmod(0o644)
    proc = subprocess.run(["setpriv", "--bounding-set=-fowner,-dac_override", sys.executable, "-c", _LEASE_SNIPPET,
                           str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
