"""Engine slots for real: CHUNK_TIMEOUT kills a hung engine's whole process group, a crashed worker
is replaced and its chunk retried, and the `command` engine drives a real external recognizer."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import testkit as tk
from smapd.engine import DecodeOptions, EngineSpec
from smapd.models import Chunk, ChunkStatus
from smapd.pool import Pool
from testkit import smapd

pytestmark = pytest.mark.slow


def test_hung_command_engine_is_killed_retried_and_reported(tmp_path, tools_dir, data_dir, model_cache_dir):
    """A chunk that hangs is killed within CHUNK_TIMEOUT + 5 s (with its children), retried, reported."""
    pids = tmp_path / "pids"
    env = tk.smapd_env(model_cache_dir, SMAPD_ENGINE="command", SMAPD_COMMAND=f"{tools_dir / 'sleepy-engine'} -f {{input}}",
                       CHUNK_TIMEOUT="3", SMAPD_CHUNK_RETRIES="1", SLEEPY_PID_FILE=str(pids), SMAPD_LANGUAGE="en",
                       MAX_PARALLEL_WORKERS="1")
    out = tmp_path / "out"
    started = time.monotonic()
    proc = smapd("transcribe", str(data_dir / "fleurs-en-003.ogg"), "-o", str(out), env=env)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert elapsed < 2 * (3 + 5) + 10, f"two attempts took {elapsed:.1f} s"
    report = tk.load_json(out / "fleurs-en-003.report.json")
    chunk = report["chunks"][0]
    assert chunk["status"] == "failed" and chunk["attempts"] == 2
    assert "CHUNK_TIMEOUT=3" in chunk["error"] and "killed" in chunk["error"]
    assert 6.0 <= chunk["seconds"] < 2 * (3 + 5)
    assert "CHUNK_TIMEOUT" in report["error"]
    lines = pids.read_text().split("\n")
    started_pids = [int(p) for line in lines if line for p in line.split()]
    assert len(started_pids) == 4, "two attempts, each a shell and its sleeping child"
    for pid in started_pids:
        assert tk.wait_gone(pid, 5), f"process {pid} of the hung engine survived the kill"


def test_command_engine_with_pocketsphinx(tmp_path, sphinx_transcribe, data_dir, model_cache_dir):
    clip = data_dir / "librispeech-2412-153948-0000.flac"
    ref = next(r["reference_text"] for r in tk.read_manifest() if r["file"] == clip.name)
    env = tk.smapd_env(model_cache_dir, SMAPD_ENGINE="command", SMAPD_LANGUAGE="en",
                       SMAPD_MODEL="/usr/share/pocketsphinx/model/en-us/en-us",
                       SMAPD_COMMAND=f"{sphinx_transcribe} -m {{model}} -f {{input}} -otxt -of {{output_base}}")
    out = tmp_path / "out"
    proc = smapd("transcribe", str(clip), "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (out / f"{clip.stem}.txt").read_text()
    assert tk.wer(ref, text) < 0.6, text  # pocketsphinx is far weaker than Whisper, but real
    report = tk.load_json(out / f"{clip.stem}.report.json")
    assert report["engine"]["name"] == "command" and report["outcome"] == "success"
    assert tk.parse_srt((out / f"{clip.stem}.srt").read_text())


def test_crashing_command_engine_fails_the_file_and_names_the_signal(tmp_path, tools_dir, data_dir, model_cache_dir):
    """The one chunk of a short clip dies of SIGSEGV: no chunk transcribed is a failure (exit 1), not a
    partial; the report names the signal. (A real partial job is tested in test_transcribe.py.)"""
    env = tk.smapd_env(model_cache_dir, SMAPD_ENGINE="command", SMAPD_COMMAND=str(tools_dir / "crashy-engine"),
                       SMAPD_LANGUAGE="en", SMAPD_CHUNK_RETRIES="0")
    out = tmp_path / "out"
    proc = smapd("transcribe", str(data_dir / "fleurs-en-003.ogg"), "-o", str(out), env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = tk.load_json(out / "fleurs-en-003.report.json")
    assert report["outcome"] == "failed" and len(report["chunks"]) == 1, report
    assert "SIGSEGV" in report["chunks"][0]["error"] or "signal 11" in report["chunks"][0]["error"], report


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    pcm = tk.decode_pcm16(tk.DATA_DIR / "librispeech-1320-122617-0001.flac")
    return pcm.astype(np.float32) / 32768.0


def test_killed_worker_is_replaced_and_chunk_retried(model_dir, speech):
    """SIGKILL the worker process mid-chunk: the slot restarts it and the chunk succeeds on attempt 2."""
    spec = EngineSpec(kind="faster-whisper", model=str(model_dir), cpu_threads=1)
    chunk = Chunk(index=1, start=0.0, end=len(speech) / 16000, speech=((0.0, len(speech) / 16000),))
    started = threading.Event()
    with Pool(spec, 1, chunk_timeout=60, retries=1) as pool:
        slot = pool.slots[0]
        first_pid = slot.pid
        fut = pool.transcribe("job", chunk, lambda: speech, DecodeOptions(language="en"),
                              on_start=lambda c, w: started.set())
        assert started.wait(30)
        os.kill(first_pid, signal.SIGKILL)
        result = fut.result(timeout=120)
        assert result.status is ChunkStatus.OK and result.attempts == 2, result
        assert "thought" in " ".join(s.text for s in result.segments).lower() or result.chars > 50
        assert slot.pid != first_pid and tk.pid_alive(slot.pid)
    assert not tk.pid_alive(first_pid)


def test_worker_timeout_kills_the_process(model_dir, speech):
    """A worker stopped (SIGSTOP: a hung engine) is killed at CHUNK_TIMEOUT and replaced.

    CHUNK_TIMEOUT=10, not less: the replacement decodes the 14 s clip under the same limit, and that
    takes ~2 s of CPU, which on a loaded 2-core machine has taken over 3 s of wall time."""
    spec = EngineSpec(kind="faster-whisper", model=str(model_dir), cpu_threads=1)
    chunk = Chunk(index=1, start=0.0, end=len(speech) / 16000)
    with Pool(spec, 1, chunk_timeout=10, retries=0) as pool:
        pid = pool.slots[0].pid
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        result = pool.transcribe("job", chunk, lambda: speech, DecodeOptions(language="en")).result(timeout=60)
        assert time.monotonic() - t0 < 10 + 5
        assert result.status is ChunkStatus.FAILED and "CHUNK_TIMEOUT=10" in (result.error or "")
        assert tk.wait_gone(pid, 5)
        assert pool.slots[0].pid != pid  # replaced, ready for the next chunk
        ok = pool.transcribe("job", chunk, lambda: speech, DecodeOptions(language="en")).result(timeout=120)
        assert ok.status is ChunkStatus.OK


def test_pool_serves_jobs_round_robin(tmp_path, tools_dir):
    """A huge job queued first does not starve a small one: slots alternate between jobs."""
    script = tmp_path / "echo-engine"
    script.write_text("#!/bin/sh\nfor a; do last=$a; done\necho chunk > \"$last.txt\"\n")
    script.chmod(0o755)
    spec = EngineSpec(kind="command", model="", command=f"{script} {{output_base}}")
    order: list[str] = []
    lock = threading.Lock()

    def note(job: str):
        def on_start(chunk, worker):
            with lock:
                order.append(job)
        return on_start

    audio = np.zeros(1600, dtype=np.float32)
    with Pool(spec, 1, chunk_timeout=10) as pool:
        gate = threading.Event()
        blocker = pool.transcribe("blocker", Chunk(0, 0, 0.1), lambda: (gate.wait(10), audio)[1], DecodeOptions())
        big = [pool.transcribe("big", Chunk(i, 0, 0.1), lambda: audio, DecodeOptions(), on_start=note("big"))
               for i in range(6)]
        small = [pool.transcribe("small", Chunk(i, 0, 0.1), lambda: audio, DecodeOptions(), on_start=note("small"))
                 for i in range(2)]
        gate.set()
        for f in [blocker, *big, *small]:
            assert f.result(timeout=30).status is ChunkStatus.OK
    assert order[:4] == ["big", "small", "big", "small"], order


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])  # field 10, minflt


def test_worker_reuses_its_memory_from_chunk_to_chunk(model_dir, speech):
    """A worker keeps what CTranslate2 frees (smapd.worker.keep_freed_memory): a second chunk faults in
    almost no fresh pages. glibc's defaults mmap() and unmap every 72 MB attention buffer, which
    measured ~127,000 page faults per 30 s window; this bound is 20x under that."""
    spec = EngineSpec(kind="faster-whisper", model=str(model_dir), cpu_threads=1)
    chunk = Chunk(index=1, start=0.0, end=len(speech) / 16000, speech=((0.0, len(speech) / 16000),))
    with Pool(spec, 1, chunk_timeout=60, retries=0) as pool:
        pid = pool.slots[0].pid
        assert pid is not None
        first = pool.transcribe("job", chunk, lambda: speech, DecodeOptions(language="en")).result(timeout=120)
        before = _minor_faults(pid)
        second = pool.transcribe("job", chunk, lambda: speech, DecodeOptions(language="en")).result(timeout=120)
        faults = _minor_faults(pid) - before
        assert first.status is second.status is ChunkStatus.OK
        assert [s.text for s in second.segments] == [s.text for s in first.segments]
        assert faults < 127_000 // 20, f"the second chunk faulted in {faults} pages"
