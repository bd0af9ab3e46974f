"""The completion hook: argv splitting before substitution, process groups, timeouts, at-least-once.

Real processes throughout: the hook is a real script that records its argv; a hung hook's child is a
real process whose death we check.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from smapd.errors import ConfigError
from smapd.hooks import HookEvent, Hooks, expand, parse_template
from smapd.settings import load_settings

RECORDER = """#!/usr/bin/env python3
import json, os, sys
out = os.environ["HOOK_OUT"]
with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "pgid": os.getpgid(0), "pid": os.getpid(),
               "env_outcome": os.environ.get("SMAPD_HOOK_OUTCOME")}, f)
print("recorded", len(sys.argv) - 1, "arguments")
"""


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        time.sleep(0.05)


@pytest.fixture
def recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    script = tmp_path / "record-hook"
    script.write_text(RECORDER.replace("/usr/bin/env python3", sys.executable))
    script.chmod(0o755)
    out = tmp_path / "calls"
    out.mkdir()
    monkeypatch.setenv("HOOK_OUT", str(out))
    return script, out


def _calls(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def _event(job: str = "0123456789ab", name: str = "talk.wav", outcome: str = "success") -> HookEvent:
    return HookEvent(job=job, outcome=outcome, report=f"/spool/outbox/{name}.report.json", input=name,
                     stem="talk", node="n1")


def test_template_is_split_before_substitution() -> None:
    argv = parse_template("/usr/local/bin/notify --report {report} 'two words' {outcome}")
    hostile = "$(touch pwned).wav"
    assert expand(argv, {"report": f"/x/{hostile}", "outcome": "a;b"}) == [
        "/usr/local/bin/notify", "--report", f"/x/{hostile}", "two words", "a;b"]
    assert expand(["{input}"], {"input": "x\n--flag.wav"}) == ["x\n--flag.wav"]


def test_empty_template_means_no_hook() -> None:
    assert load_settings(on_done="  ").on_done.strip() == ""
    with pytest.raises(ValueError, match="no command"):
        parse_template("  ")


@pytest.mark.parametrize("bad, words", [("notify 'unbalanced", "No closing quotation"),
                                         ("notify {reprot}", "unknown placeholder {reprot}; allowed: {report}")])
def test_bad_templates_are_one_line_setting_errors(bad: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_template(bad)
    with pytest.raises(ConfigError) as e:
        load_settings(on_done=bad)
    assert str(e.value).startswith(f"setting SMAPD_ON_DONE={bad!r} is invalid: ") and words in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["$(touch pwned).wav", "a;b.wav", "x\n--flag.wav", "sp ace 'q\".wav"])
def test_each_hostile_name_arrives_as_one_argument(tmp_path: Path, recorder: tuple[Path, Path], name: str) -> None:
    script, out = recorder
    hooks = Hooks(f"{script} {{input}} {{outcome}} {{job}}", 10, tmp_path, tmp_path / "hooks", "n1", _write)
    hooks.expect("0123456789ab", name)
    hooks.fire(_event(name=name, outcome="partial"))
    _wait_for(lambda: len(_calls(out)) == 1)
    hooks.close()
    call = _calls(out)[0]
    assert call["argv"] == [name, "partial", "0123456789ab"]
    assert call["env_outcome"] == "partial"
    assert call["pgid"] == call["pid"], "the hook runs in its own process group"
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    assert list((tmp_path / "hooks").iterdir()) == [], "the intent is gone once the hook ran"
    assert hooks.ran == 1 and hooks.failed == 0


def test_a_hung_hook_is_killed_with_its_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = tmp_path / "hang"
    script.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\nwait\n")
    script.chmod(0o755)
    hooks = Hooks(str(script), 1.0, tmp_path, tmp_path / "hooks", "n1", _write)
    hooks.expect("0123456789ab", "talk.wav")
    started = time.monotonic()
    hooks.fire(_event())
    _wait_for(lambda: hooks.ran == 1, timeout=15)
    hooks.close()
    assert time.monotonic() - started < 10
    assert hooks.failed == 1
    child = int(pidfile.read_text())
    _wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2])


def test_a_failing_or_missing_hook_is_counted_not_raised(tmp_path: Path) -> None:
    hooks = Hooks("/nonexistent/hook {job}", 5, tmp_path, tmp_path / "hooks", "n1", _write)
    hooks.expect("0123456789ab", "talk.wav")
    hooks.fire(_event())
    _wait_for(lambda: hooks.ran == 1)
    hooks2 = Hooks("false", 5, tmp_path, tmp_path / "hooks", "n1", _write)
    hooks2.expect("0123456789ac", "talk.wav")
    hooks2.fire(_event(job="0123456789ac"))
    _wait_for(lambda: hooks2.ran == 1)
    hooks.close()
    hooks2.close()
    assert (hooks.failed, hooks2.failed) == (1, 1)


def test_released_job_owes_no_hook(tmp_path: Path, recorder: tuple[Path, Path]) -> None:
    script, out = recorder
    hooks = Hooks(str(script), 5, tmp_path, tmp_path / "hooks", "n1", _write)
    hooks.expect("0123456789ab", "talk.wav")
    hooks.forget("0123456789ab")
    assert hooks.sweep(set(), lambda owner: True, lambda intent: _event(intent["job"])) == 0
    hooks.close()
    assert _calls(out) == []


def test_sweep_runs_what_a_dead_node_owed_exactly_once(tmp_path: Path, recorder: tuple[Path, Path]) -> None:
    """Node A claimed two jobs and died: one finished before the hook ran (pending intent), one while
    its hook ran (A's marker). Two live nodes sweep at once: each hook runs exactly once more."""
    script, out = recorder
    intents = tmp_path / "hooks"
    dead = Hooks(str(script), 5, tmp_path, intents, "nodeA", _write)
    dead.expect("aaaaaaaaaaaa", "one.wav")
    dead.expect("bbbbbbbbbbbb", "two.wav")
    dead.expect("cccccccccccc", "three.wav")  # still claimed in processing/: its owner will fire
    os.rename(intents / "bbbbbbbbbbbb.json", intents / "bbbbbbbbbbbb.json.nodeA-999999")
    dead.close()
    nodes = [Hooks(f"{script} {{job}}", 5, tmp_path, intents, name, _write) for name in ("n2", "n3")]
    finished = {"aaaaaaaaaaaa", "bbbbbbbbbbbb"}
    started = sum(n.sweep({"cccccccccccc"}, lambda owner: owner.startswith("nodeA-"),
                          lambda intent: _event(intent["job"]) if intent["job"] in finished else None) for n in nodes)
    _wait_for(lambda: len(_calls(out)) == 2)
    for n in nodes:
        n.close()
    assert started == 2
    assert sorted(c["argv"][0] for c in _calls(out)) == sorted(finished)
    assert sorted(p.name for p in intents.iterdir()) == ["cccccccccccc.json"]


def test_sweep_leaves_a_live_owners_running_hook_alone(tmp_path: Path, recorder: tuple[Path, Path]) -> None:
    script, out = recorder
    intents = tmp_path / "hooks"
    intents.mkdir()
    (intents / "aaaaaaaaaaaa.json.n1-4242").write_text(json.dumps({"job": "aaaaaaaaaaaa", "input": "a.wav"}))
    hooks = Hooks(str(script), 5, tmp_path, intents, "n2", _write)
    assert hooks.sweep(set(), lambda owner: False, lambda intent: _event(intent["job"])) == 0
    hooks.close()
    assert _calls(out) == []
