"""Issue 11 through real `smapd run` processes: the completion hook (hostile names as single
arguments, at least once across a node's death), the metrics file (read by promtool and a real
node_exporter), and progress in audio time (heartbeat, `smapd status`, `--prometheus`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import testkit as tk
from testkit import Node, SpoolView, kill_all
from testkit.prom import promtool_check, scrape_textfile

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

RECORDER = """#!{python}
import json, os, sys, time
out = {out!r}
time.sleep(float(os.environ.get("HOOK_SLEEP", "0")))
with open(os.path.join(out, f"{{os.getpid()}}.json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "node": os.environ.get("SMAPD_HOOK_NODE")}}, f)
print("hook saw", len(sys.argv) - 1, "arguments")
"""
HOSTILE = ["$(touch pwned).wav", "a;b.wav", "x\n--flag.wav"]


def recorder(root: Path) -> tuple[Path, Path]:
    out = root / "hook-calls"
    out.mkdir(exist_ok=True)
    script = root / "record-hook"
    script.write_text(RECORDER.format(python=sys.executable, out=str(out)))
    script.chmod(0o755)
    return script, out


def calls(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def env(model_cache_dir: Path, **extra: object) -> dict[str, str]:
    return tk.daemon_env(model_cache_dir, SMAPD_CPU_THREADS=1, SMAPD_FORMATS="txt", SMAPD_LANGUAGE="en",
                         SMAPD_WATCH="inotify", SMAPD_RESCAN_SECONDS=1, SMAPD_SETTLE_SECONDS=1,
                         SMAPD_LEASE_SECONDS=4, **extra)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model_dir: Path,
           model_cache_dir: Path) -> Iterator[tuple[Node, SpoolView, Path, Path]]:
    root = tmp_path_factory.mktemp("ops")
    script, out = recorder(root)
    textfiles = root / "textfiles"
    textfiles.mkdir()
    e = env(model_cache_dir, MAX_PARALLEL_WORKERS=1,
            SMAPD_ON_DONE=f"{script} --report {{report}} {{outcome}} {{input}} {{job}}",
            SMAPD_METRICS_FILE=textfiles / "smapd.prom", SMAPD_METRICS_SECONDS=0.5)
    node, sp = tk.serve(root, e, name="ops-1")
    try:
        yield node, sp, out, textfiles
    finally:
        kill_all(node)


def test_hook_gets_each_hostile_name_as_one_argument_and_metrics_count_the_jobs(
        served: tuple[Node, SpoolView, Path, Path], tmp_path: Path) -> None:
    node, sp, out, textfiles = served
    for name in HOSTILE:
        sp.drop(tk.SHORT_CLIP, name)
    bad = tmp_path / "not-audio.wav"
    bad.write_bytes(b"this is text, not audio" * 50)
    sp.drop(bad, "not-audio.wav")
    reports = {name: sp.outcome(name) for name in [*HOSTILE, "not-audio.wav"]}
    assert all(r.report["outcome"] == "success" for n, r in reports.items() if n != "not-audio.wav")
    assert reports["not-audio.wav"].where == "failed"
    assert tk.wait_for(lambda: len(calls(out)) == 4, 30), node.log_text()[-3000:]
    seen = {c["argv"][3]: c["argv"] for c in calls(out)}
    assert sorted(seen) == sorted([*HOSTILE, "not-audio.wav"]), "each name arrived as exactly one argument"
    for name, argv in seen.items():
        report = reports[name].report
        assert len(argv) == 5 and argv[0] == "--report"
        assert json.loads(Path(argv[1]).read_bytes())["job"]["id"] == report["job"]["id"] == argv[4]
        assert argv[2] == report["outcome"]
    assert not list(sp.root.parent.rglob("pwned")) and not (tk.REPO / "pwned").exists(), "a name ran as a command"
    assert node.log_has("hook: hook saw 5 arguments", 5)
    # the intent goes once the hook has exited, a moment after it wrote its call (a CI run saw one left)
    assert tk.wait_for(lambda: not list((sp.root / ".smapd" / "hooks").iterdir()), 15), \
        "every hook's intent is gone once it ran"

    prom = textfiles / "smapd.prom"

    def counted() -> bool:  # the metrics file is written every SMAPD_METRICS_SECONDS: the last hook's
        # result may reach it one write after the jobs do (a CI run read 3 hooks where 4 had run)
        s = samples(prom.read_text()) if prom.exists() else {}
        n = (("node", "ops-1"),)
        return s.get(("smapd_jobs_total", (*n, ("outcome", "success")))) == 3 \
            and s.get(("smapd_jobs_total", (*n, ("outcome", "failed")))) == 1 \
            and s.get(("smapd_hooks_total", (*n, ("result", "ok")))) == 4
    assert tk.wait_for(counted, 15), prom.read_text() if prom.exists() else "no metrics file"
    text = prom.read_text()
    assert promtool_check(text.encode()) == ""
    s = samples(scrape_textfile(textfiles))  # what Prometheus would get from node_exporter
    n = (("node", "ops-1"),)
    assert s[("node_textfile_scrape_error", ())] == 0
    assert s[("smapd_jobs_total", (*n, ("outcome", "failed")))] == 1
    assert s[("smapd_hooks_total", (*n, ("result", "ok")))] == 4
    clip = tk.decode_pcm16(tk.SHORT_CLIP).size / tk.RATE
    assert s[("smapd_audio_seconds_total", n)] == pytest.approx(3 * clip, abs=0.5)
    assert s[("smapd_chunk_seconds_count", n)] >= 3 and s[("smapd_worker_slots", (*n, ("state", "total")))] == 1
    assert s[("smapd_inbox_files", n)] == 0 and s[("smapd_jobs_in_flight", n)] == 0
    assert not [p for p in textfiles.iterdir() if p.name != "smapd.prom"], "a temp file was left for the collector"


def test_progress_in_audio_time_in_status_and_the_spool_wide_prometheus_view(
        served: tuple[Node, SpoolView, Path, Path], tmp_path: Path) -> None:
    node, sp, _out, textfiles = served
    clips = tk.manifest_clips("en")[:8]
    pcm = np.concatenate([tk.decode_pcm16(p) for p, _ in clips])
    longer = tk.write_pcm16_wav(tmp_path / "longer.wav", pcm)
    total = pcm.size / tk.RATE
    sp.drop(longer, "longer.wav")
    seen: list[dict] = []

    def moving() -> bool:
        status = sp.node_status("ops-1") or {}
        seen[:] = [j for j in status.get("jobs", []) if j["name"] == "longer.wav" and j["audio_done"] > 0]
        return bool(seen) and seen[0]["audio_done"] < seen[0]["audio_total"]
    assert tk.wait_for(moving, 120, 0.1), "no heartbeat showed the job part done"
    job = seen[0]
    assert job["audio_total"] == pytest.approx(total, abs=0.2) and job["eta"] is not None and not job["stalled"]
    shown = subprocess.run([sys.executable, "-m", "smapd.cli", "status", "--spool", str(sp.root)], env=node.env,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    line = next(x for x in shown.splitlines() if "longer.wav" in x)
    assert f"/ {int(total) // 60}:{int(total) % 60:02d}" in line and "ETA" in line, shown
    prom = subprocess.run([sys.executable, "-m", "smapd.cli", "status", "--prometheus", "--spool", str(sp.root)],
                          env=node.env, capture_output=True, timeout=60, check=True).stdout
    assert promtool_check(prom) == ""
    s = samples(prom.decode())
    assert s[("smapd_node_up", (("node", "ops-1"),))] == 1
    assert s[("smapd_spool_claims", (("node", "ops-1"), ("stale", "false")))] == 1
    node_file = samples((textfiles / "smapd.prom").read_text())
    key = ("smapd_job_audio_seconds", (("job", job["job_id"]), ("name", "longer.wav"), ("node", "ops-1")))
    assert tk.wait_for(lambda: key in samples((textfiles / "smapd.prom").read_text()), 5) or key in node_file
    assert sp.outcome("longer.wav").report["outcome"] == "success"


def test_a_hook_whose_node_dies_is_run_again_by_another_node(tmp_path: Path, model_dir: Path,
                                                             model_cache_dir: Path) -> None:
    """At least once: node A finishes a job and dies (kill -9) while its slow hook runs; node B, on
    the same spool, runs the hook again once A's heartbeat is a lease old."""
    script, out = recorder(tmp_path)
    template = f"{script} {{job}} {{outcome}}"
    spool = tmp_path / "spool"
    a = Node("hook-a", spool, tmp_path, {**env(model_cache_dir, SMAPD_ON_DONE=template), "HOOK_SLEEP": "120"})
    b = Node("hook-b", spool, tmp_path, env(model_cache_dir, SMAPD_ON_DONE=template))
    hook_pids: list[int] = []
    try:
        a.launch()
        sp = SpoolView(spool, nodes=(a, b))
        sp.drop(tk.SHORT_CLIP, "talk.ogg")
        report = sp.outcome("talk.ogg").report
        markers = spool / ".smapd" / "hooks"
        assert tk.wait_for(lambda: any(".json." in p.name for p in markers.iterdir()), 10), "A never ran its hook"
        hook_pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _runs(int(p), str(script))]
        a.kill9()
        for pid in hook_pids:  # the orphaned hook (its own session) would record a call much later
            os.kill(pid, 9)
        b.launch()
        assert tk.wait_for(lambda: len(calls(out)) == 1, 60), b.log_text()[-3000:]
        call = calls(out)[0]
        assert call["argv"] == [report["job"]["id"], "success"] and call["node"] == "hook-a"
        assert b.log_has("running the completion hook that hook-a-", 5)
        assert tk.wait_for(lambda: not list(markers.iterdir()), 10)
    finally:
        kill_all(a, b)


def _runs(pid: int, script: str) -> bool:
    try:
        return script.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
