"""Issue 10 through real `smapd run` processes, the real model and real signals: chunk checkpoints
(a killed owner's successor and a restarted node resume), graceful hand-back (the next claim of the
same bytes adopts the checkpoints), and shared chunks (two nodes make one file's chunks; a helper
killed mid-chunk costs only that chunk). Every published text is compared with a single-node run
of the same file: it must be the same text, byte for byte.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import testkit as tk
from testkit import Node, SpoolView, kill_all

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def env(model_cache_dir: Path, **extra: object) -> dict[str, str]:
    return tk.daemon_env(model_cache_dir, MAX_PARALLEL_WORKERS=1, SMAPD_CPU_THREADS=1, SMAPD_FORMATS="txt,srt",
                         SMAPD_LANGUAGE="en", SMAPD_RESCAN_SECONDS=1, SMAPD_SETTLE_SECONDS=0.5,
                         SMAPD_LEASE_SECONDS=4, SMAPD_SHARE_MIN_CHUNKS=3, **extra)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About two minutes of real English speech: five chunks or so."""
    wav = tmp_path_factory.mktemp("ckpt") / "talk.wav"
    tk.make_longform(tk.manifest_clips("en"), wav, seed=11)
    return wav


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, recording: Path, model_dir: Path,
              model_cache_dir: Path) -> dict[str, str]:
    """What one node alone publishes for the recording (no faults, nothing shared)."""
    node, sp = tk.serve(tmp_path_factory.mktemp("single"), env(model_cache_dir, SMAPD_SHARE_CHUNKS="false"))
    try:
        sp.drop(recording, "talk.wav")
        out = sp.outcome("talk.wav", timeout=300)
    finally:
        kill_all(node)
    assert out.report["outcome"] == "success" and len(out.report["chunks"]) >= 4, out.report
    assert all(c["made_by"] == {"node": "n1", "attempt": 1, "helper": False} and not c["resumed"]
               for c in out.report["chunks"])
    return {"txt": out.text, "srt": (sp.outbox / "talk.srt").read_text()}


def checkpoints(sp: SpoolView) -> list[Path]:
    return sorted((sp.root / ".smapd" / "chunks").glob("*/done/*.json"))


def no_leftovers(sp: SpoolView, stem: str) -> None:
    """Nothing of the checkpoints stays behind or reaches outbox/ (the folder goes right after the
    report is published, when the original is archived)."""
    def left() -> list[str]:
        return sorted(str(p.relative_to(sp.root)) for p in (sp.root / ".smapd" / "chunks").rglob("*"))
    assert tk.wait_for(lambda: not left(), 10, 0.05), f"{left()}\n{sp.log_tails(6000)}"
    assert sorted(p.name for p in sp.outbox.iterdir()) == sorted(f"{stem}{s}" for s in (".txt", ".srt", ".report.json"))


@pytest.fixture
def node_pair(tmp_path: Path, model_dir: Path, model_cache_dir: Path) -> Iterator[tuple[Node, Node, SpoolView]]:
    spool = tmp_path / "spool"
    spool.mkdir()
    a, b = (Node(n, spool, tmp_path, env(model_cache_dir)) for n in ("a", "b"))
    a.launch()
    b.launch()
    try:
        yield a, b, SpoolView(spool, nodes=(a, b))
    finally:
        kill_all(a, b)


def test_a_killed_owner_and_a_handed_back_file_resume_from_their_checkpoints_with_the_same_text(
        tmp_path: Path, recording: Path, reference: dict[str, str], model_cache_dir: Path) -> None:
    node, sp = tk.serve(tmp_path, env(model_cache_dir, SMAPD_SHUTDOWN_GRACE_SECONDS=0.1))
    try:
        # kill -9 after two chunks: the restarted node takes its own dead claim over as attempt 2
        sp.drop(recording, "talk.wav")
        assert tk.wait_for(lambda: len(checkpoints(sp)) >= 2, 240, 0.05), sp.log_tails()
        node.kill9()
        kept = {p.name for p in checkpoints(sp)}
        node.launch()
        out = sp.outcome("talk.wav", timeout=300)
        r = out.report
        assert r["outcome"] == "success" and r["job"]["attempt"] == 2, r
        resumed = [c for c in r["chunks"] if c["resumed"]]
        assert {f"{c['index']}.json" for c in resumed} == kept
        assert all(c["made_by"]["attempt"] == 1 for c in resumed)
        made = [c for c in r["chunks"] if not c["resumed"]]
        assert all(c["made_by"] == {"node": "n1", "attempt": 2, "helper": False} for c in made)
        assert r["totals"]["chunks_resumed"] == len(kept) and r["totals"]["chunks_redone"] <= 1  # the one in flight
        assert out.text == reference["txt"] and (sp.outbox / "talk.srt").read_text() == reference["srt"]
        no_leftovers(sp, "talk")
        assert "resumed" in node.life_log() and "from checkpoints" in node.life_log()

        # SIGTERM with no grace: the file goes back to inbox/ under a new job; its next claim adopts
        # the checkpoints of the same bytes
        sp.drop(recording, "again.wav")
        assert tk.wait_for(lambda: len(checkpoints(sp)) >= 2, 240, 0.05), sp.log_tails()
        assert node.terminate(60) == 0
        assert sp.in_inbox("again.wav") and len(checkpoints(sp)) >= 2
        node.launch()
        again = sp.outcome("again.wav", timeout=300)
        assert again.report["job"]["attempt"] == 1 and again.report["totals"]["chunks_resumed"] >= 2, again.report
        assert again.text == reference["txt"]
    finally:
        kill_all(node)


def test_two_nodes_share_a_file_and_a_helper_killed_mid_chunk_costs_only_that_chunk(
        node_pair: tuple[Node, Node, SpoolView], recording: Path, reference: dict[str, str]) -> None:
    a, b, sp = node_pair
    sp.drop(recording, "talk.wav")
    status: list[str] = []

    def helping() -> bool:  # an operator sees which node makes which job's chunks
        status[:] = [subprocess.run([sys.executable, "-m", "smapd.cli", "status", "--spool", str(sp.root)],
                                    env=a.env, capture_output=True, text=True, timeout=60, check=True).stdout]
        return "chunks made by other nodes now" in status[0]
    assert tk.wait_for(helping, 240, 0.2), sp.log_tails()
    line = next(x for x in status[0].splitlines() if "  helping " in x)
    helper = a if line.split()[0] == a.name else b
    assert "with chunk" in line and "of talk.wav" in line, status[0]
    helper.kill9()  # mid-chunk: its taken/ entry stops being refreshed; the owner makes that chunk
    out = sp.outcome("talk.wav", timeout=300)
    r = out.report
    owner = r["job"]["node"]
    assert owner != helper.name and r["outcome"] == "success" and r["job"]["attempt"] == 1, r
    assert all(c["status"] == "ok" for c in r["chunks"])
    assert out.text == reference["txt"] and (sp.outbox / "talk.srt").read_text() == reference["srt"]
    no_leftovers(sp, "talk")
    # the helper's unfinished chunk was made again by the owner (redone), nothing else was lost
    assert r["totals"]["chunks_redone"] >= 1 and r["totals"]["chunks_redone"] <= 2, r["totals"]

    # back to life, the helper shares the next file: the owner publishes chunks it did not make
    helper.launch()
    sp.drop(recording, "shared.wav")
    shared = sp.outcome("shared.wav", timeout=300)
    made_by = {(c["made_by"]["node"], c["made_by"]["helper"]) for c in shared.report["chunks"]}
    assert len({n for n, _ in made_by}) == 2 and shared.report["totals"]["chunks_helped"] >= 1, made_by
    assert shared.text == reference["txt"]
    log = (a if shared.report["job"]["node"] != a.name else b).life_log()
    assert "helping" in log and "Completed in" in log
    report = json.loads((sp.outbox / "shared.report.json").read_text())
    assert report["totals"]["chunks_ok"] == len(report["chunks"])
