"""runner.run_claim's end of a job, through a real Spool on a tmp dir: the runner builds the outputs
and the report, spool.finish publishes (report last) and archives, or fails; transient write errors
are retried under the live lease; a node whose claim was taken over publishes nothing.

``runner.execute`` (the transcription) is replaced by a canned result: these are fast unit tests
of the finish path; the real model runs through it in tests/test_daemon.py.
"""
from __future__ import annotations

import errno
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from smapd import report, runner
from smapd.engine import EngineSpec
from smapd.models import AudioInfo, Outcome, Segment, Transcript
from smapd.runner import JobConfig, JobResult
from smapd.settings import Settings
from smapd.spool import REPORT_SUFFIX, Claim, Spool, fsio


def canned(outcome: Outcome) -> Any:
    """An ``execute`` that returns what a real one would for ``outcome``."""
    def execute(path: Path, pool: Any, config: Any, *, job: report.JobInfo, display_name: str, **_: Any) -> JobResult:
        assert path.parent.name == "processing" and job.attempts, "the claimed file and its attempt log"
        if outcome is Outcome.FAILED:
            rec = report.build(None, input=report.input_info(display_name, 5), job=job, error="not audio.")
            return JobResult(outcome, {}, rec, rec.error)
        tr = Transcript((Segment(0.0, 1.0, "hello."),), (), "en", 0.9, AudioInfo(1.0, 16000, 1, "pcm", "wav"))
        rec = report.build(tr, input=report.input_info(display_name, 5), job=job, error=None,
                           outputs={".txt": "x.txt"})
        return JobResult(outcome, {".txt": b"hello.\n"}, rec, None, tr)
    return execute


@pytest.fixture
def sp(tmp_path: Path) -> Spool:
    s = Spool(tmp_path, "n1", lease_seconds=0.5)
    s.ensure_layout()
    (s.inbox / "talk.wav").write_bytes(b"audio")
    return s


CONFIG = JobConfig(engine=EngineSpec(kind="command", model=""), workers=1,
                   **runner.reloadable(Settings.model_construct()))  # the defaults; no engine runs


def run(sp: Spool, claim: Claim, lost: threading.Event | None = None) -> str:
    return runner.run_claim(claim, sp, None, CONFIG, node=sp.node, lost=lost or threading.Event(),  # type: ignore[arg-type]
                            cancelled=threading.Event())


def test_a_success_is_published_report_last_and_archived(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "execute", canned(Outcome.SUCCESS))
    claim = sp.claim("talk.wav")
    assert claim and run(sp, claim) == "done"
    assert sorted(p.name for p in sp.outbox.iterdir()) == ["talk.report.json", "talk.txt"]
    r = json.loads((sp.outbox / f"talk{REPORT_SUFFIX}").read_bytes())
    assert r["outputs"] == {".txt": "talk.txt"} and r["job"]["output_stem"] == "talk"
    assert [a["node"] for a in r["job"]["attempts"]] == ["n1"] and "attempts" not in r
    assert [p.name for p in sp.archive.iterdir()] == [f"{claim.job_id}.talk.wav"]
    assert not any(any(d.iterdir()) for d in (sp.processing, sp.stems, sp.jobs, sp.tmp))


def test_a_failure_goes_to_failed_with_one_report(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "execute", canned(Outcome.FAILED))
    claim = sp.claim("talk.wav")
    assert claim and run(sp, claim) == "failed"
    name = f"{claim.job_id}.talk.wav"
    assert sorted(p.name for p in sp.failed.iterdir()) == [name, name + REPORT_SUFFIX]
    r = json.loads((sp.failed / (name + REPORT_SUFFIX)).read_bytes())
    assert r["error"] == "not audio." and r["job"]["output_stem"] is None and r["outputs"] == {}
    assert len(r["job"]["attempts"]) == 1 and "attempts" not in r
    assert not any(sp.outbox.iterdir()) and not any(sp.stems.iterdir())


def test_a_transient_publish_error_is_retried_under_the_lease(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full once: the job keeps its claim and publishes on the retry (no attempt spent)."""
    monkeypatch.setattr(runner, "execute", canned(Outcome.SUCCESS))
    real, calls = fsio.publish, []

    def publish(*args: Any) -> dict[str, Path]:
        calls.append(args[1])
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)
    monkeypatch.setattr(fsio, "publish", publish)
    claim = sp.claim("talk.wav")
    assert claim and run(sp, claim) == "done"
    assert calls == ["talk", "talk"]  # the same stem both times
    assert json.loads((sp.outbox / f"talk{REPORT_SUFFIX}").read_bytes())["job"]["attempt"] == 1


def test_a_node_whose_claim_was_taken_over_publishes_nothing(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inv. 6: the job ran past its lease (no heartbeats) and another node took the claim over."""
    claim = sp.claim("talk.wav")
    assert claim
    other = Spool(sp.root, "n2", lease_seconds=0.5)

    def slow_execute(*args: Any, **kwargs: Any) -> JobResult:
        deadline = threading.Event()
        while not other.recoverable():
            deadline.wait(0.05)
        assert other.recover(other.recoverable()[0]) is not None
        return canned(Outcome.SUCCESS)(*args, **kwargs)
    monkeypatch.setattr(runner, "execute", slow_execute)
    assert run(sp, claim) == "lost"
    assert not any(sp.outbox.iterdir()) and not any(sp.stems.iterdir()) and not any(sp.archive.iterdir())
    [taken] = [c for c, _ in other.claims()]
    assert taken.node == "n2" and taken.attempt == 2
