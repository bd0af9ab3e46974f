"""The report schema (smapd/report.py): every kind of report has every key, with the right nulls.

Success, partial and the runner's failures are built the way runner.execute builds them; the spool's
own failures (refused entry, given up after MAX_ATTEMPTS, repaired after a crash) come from a real
Spool on a tmp dir. No model, no audio.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from smapd import __version__, report
from smapd.models import AudioInfo, Chunk, ChunkResult, ChunkStatus, Segment, Transcript
from smapd.report import EngineInfo, JobInfo, Measured
from smapd.spool import REPORT_SUFFIX, Spool
from smapd.writers import FORMATS

SCHEMA: dict[str, set[str] | None] = {
    "report_version": None, "smapd": None, "host": None, "created": None, "outcome": None, "error": None,
    "input": {"name", "size", "sha256", "duration", "codec", "container", "sample_rate", "channels", "raw"},
    "language": {"code", "probability"},
    "engine": {"name", "model", "device", "compute_type", "workers", "cpu_threads", "beam_size", "chunk_seconds",
               "chunk_timeout", "vad", "command"},
    "chunks": None,
    "totals": {"wall_seconds", "cpu_seconds", "peak_rss_mb", "real_time_factor", "success_rate", "chunks_ok",
               "chunks_failed", "speech_seconds", "stage_seconds", "chunks_resumed", "chunks_helped",
               "chunks_redone"},
    "job": {"id", "attempt", "node", "claimed_as", "original_name", "output_stem", "attempts", "warning", "profile",
            "options"},
    "outputs": None,
}
CHUNK_KEYS = {"index", "start", "end", "attempts", "seconds", "status", "chars", "error", "worker",
              "decoded_seconds", "language", "language_probability", "signals", "made_by", "resumed", "redone"}
ENGINE = EngineInfo(name="faster-whisper", model="base", device="cpu", compute_type="int8", workers=2,
                    cpu_threads=1, beam_size=1, chunk_seconds=30.0, chunk_timeout=120.0, vad=True)
ATTEMPTS = ({"attempt": 1, "node": "n1", "pid": 42, "how": "claimed from inbox/"},)
JOB = JobInfo(id="0123456789ab", attempt=1, node="n1", claimed_as="talk.mp3__n1_0123456789ab_a1_p42",
              original_name="talk.mp3", attempts=ATTEMPTS)


def check_schema(r: dict[str, Any]) -> None:
    """Every documented key, no other, JSON without NaN; attempts only once (under job)."""
    assert set(r) == set(SCHEMA)
    for key, inner in SCHEMA.items():
        if inner is not None:
            assert set(r[key]) == inner, key
    assert all(set(c) == CHUNK_KEYS for c in r["chunks"])
    assert r["report_version"] == 1 and r["smapd"] == __version__ and r["host"] and r["created"]
    assert isinstance(r["job"]["attempts"], list) and "attempts" not in r
    json.loads(json.dumps(r, allow_nan=False))


def transcript(statuses: list[ChunkStatus], warning: str | None = None) -> Transcript:
    chunks: list[ChunkResult] = []
    segments: list[Segment] = []
    for i, status in enumerate(statuses):
        seg = (Segment(i * 30.0 + 1, i * 30.0 + 3, f"words {i}."),) if status is ChunkStatus.OK else ()
        segments += seg
        chunks.append(ChunkResult(Chunk(i, i * 30.0, i * 30.0 + 30), status, 1 if seg else 2, 4.0, seg,
                                  None if seg else "timed out after 120 s", "w0"))
    return Transcript(tuple(segments), tuple(chunks), "en", 0.987654, AudioInfo(30.0 * len(statuses), 44100, 2,
                      "mp3", "mp3"), speech_seconds=20.0, timings={"decode": 0.51234}, warning=warning)


def built(tr: Transcript | None, error: str | None = None) -> dict[str, Any]:
    """What runner.execute builds."""
    files = [".txt", ".srt"] if tr is not None and error is None else []
    return report.build(tr, input=report.input_info("talk.mp3", 1234, "ab" * 32), job=JOB, error=error,
                        engine=ENGINE, measured=Measured(12.0, 23.5, 812.345),
                        outputs={s: "talk" + s for s in files}).as_dict()


def test_success_report_keys_and_values() -> None:
    r = built(transcript([ChunkStatus.OK] * 4))
    check_schema(r)
    assert r["outcome"] == "success" and r["error"] is None
    assert r["input"] == {"name": "talk.mp3", "size": 1234, "sha256": "ab" * 32, "duration": 120.0, "codec": "mp3",
                          "container": "mp3", "sample_rate": 44100, "channels": 2, "raw": None}
    assert r["language"] == {"code": "en", "probability": 0.9877}
    assert r["totals"]["real_time_factor"] == 10.0  # 120 s of audio in 12 s of wall time
    assert r["totals"]["peak_rss_mb"] == 812.3 and r["totals"]["stage_seconds"] == {"decode": 0.512}
    assert r["totals"]["success_rate"] == 100.0 and r["totals"]["chunks_ok"] == 4
    assert r["job"]["attempts"] == list(ATTEMPTS) and r["job"]["warning"] is None
    assert r["job"]["output_stem"] is None and r["outputs"] == {".txt": "talk.txt", ".srt": "talk.srt"}
    assert r["engine"]["name"] == "faster-whisper" and r["engine"]["command"] is None


def test_published_as_names_the_outputs_and_the_stem() -> None:
    rec = report.build(transcript([ChunkStatus.OK]), input=report.input_info("talk.mp3"), job=JOB, error=None)
    r = rec.published_as("talk.2", [".txt", ".json"]).as_dict()
    check_schema(r)
    assert r["outputs"] == {".txt": "talk.2.txt", ".json": "talk.2.json"} and r["job"]["output_stem"] == "talk.2"


def test_partial_report_summarises_the_failed_chunks_and_keeps_the_warning() -> None:
    r = built(transcript([ChunkStatus.OK, ChunkStatus.FAILED, ChunkStatus.OK], warning="decoding stopped at 80 s"))
    check_schema(r)
    assert r["outcome"] == "partial" and "1 of 3 chunks" in r["error"] and "timed out" in r["error"]
    assert r["totals"]["chunks_failed"] == 1 and r["totals"]["success_rate"] == 66.7
    assert r["chunks"][1]["status"] == "failed" and r["chunks"][1]["attempts"] == 2
    assert r["job"]["warning"] == "decoding stopped at 80 s"


@pytest.mark.parametrize("kind", ["bad input", "no chunk transcribed"])
def test_runner_failures_have_every_key(kind: str) -> None:
    if kind == "bad input":
        r = built(None, error="the input is not audio: no audio stream found")
        assert r["chunks"] == [] and r["input"]["duration"] is None and r["language"] == {"code": None,
                                                                                             "probability": None}
        assert r["totals"]["real_time_factor"] is None and r["totals"]["success_rate"] == 0.0
    else:
        r = built(transcript([ChunkStatus.FAILED] * 2), error="no chunk could be transcribed (2 failed)")
        assert len(r["chunks"]) == 2 and r["totals"]["chunks_failed"] == 2
    check_schema(r)
    assert r["outcome"] == "failed" and r["outputs"] == {} and r["job"]["attempts"] == list(ATTEMPTS)
    assert r["totals"]["wall_seconds"] == 12.0


def test_a_name_that_is_not_utf8_is_shown_with_u_fffd_and_kept_in_raw() -> None:
    name = os.fsdecode(b"caf\xe9.wav")
    r = json.loads(report.build(None, input=report.input_info(name), job=JobInfo(original_name=name),
                                error="x").to_json())
    check_schema(r)
    assert r["input"]["name"] == "caf\ufffd.wav" and bytes(r["input"]["raw"]) == b"caf\xe9.wav"
    assert r["job"]["original_name"] == "caf\ufffd.wav"


def test_the_spools_own_failures_have_every_key(tmp_path: Path) -> None:
    """Refused entry, given up after MAX_ATTEMPTS, and repaired after a crash: the same schema."""
    sp = Spool(tmp_path, "n1", lease_seconds=0.05, max_attempts=1)
    sp.ensure_layout()
    os.mkfifo(sp.inbox / "pipe.wav")
    refused = sp.refuse("pipe.wav")
    assert refused is not None
    (sp.inbox / "poison.wav").write_bytes(b"x")
    claim = sp.claim("poison.wav")
    assert claim is not None
    died = Spool(tmp_path, "n1", lease_seconds=0.05, max_attempts=1)  # this node after a restart
    [dead] = died.recoverable()
    assert died.recover(dead) is None  # attempt 1 of 1 was used up
    (sp.failed / "0123456789ab.lost.wav").write_bytes(b"x")  # a crash between the rename and the report
    time.sleep(0.1)  # older than a lease by the spool clock (its ctime counts, so no utime)
    assert sp.repair() == 1
    got = {p.name: json.loads(p.read_bytes()) for p in sp.failed.glob(f"*{REPORT_SUFFIX}")}
    assert len(got) == 3
    for r in got.values():
        check_schema(r)
        assert r["outcome"] == "failed" and r["error"] and r["chunks"] == [] and r["outputs"] == {}
        assert r["engine"] == dict.fromkeys(SCHEMA["engine"] or ())
    by_input = {r["input"]["name"]: r for r in got.values()}
    assert "FIFO" in by_input["pipe.wav"]["error"] and by_input["pipe.wav"]["job"]["attempt"] == 0
    gave_up = by_input["poison.wav"]
    assert "gave up after 1 attempts" in gave_up["error"]
    assert [a["node"] for a in gave_up["job"]["attempts"]] == ["n1"] and gave_up["job"]["id"] == claim.job_id
    assert by_input["lost.wav"]["job"]["id"] == "0123456789ab"


def test_the_spools_stems_cover_every_output_format() -> None:
    from smapd.spool.names import OUTPUT_SUFFIXES

    assert set(FORMATS.values()) | {REPORT_SUFFIX} <= set(OUTPUT_SUFFIXES)
