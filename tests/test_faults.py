"""Engine faults under a real `smapd run` (issue 5): a hung worker, a crashing worker, worker
recycling, a missing or corrupt model, and a wedged pool that must stop the systemd watchdog pings.

Workers are found as the daemon's children in /proc (each sits in its own process group).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import testkit as tk
from testkit import NotifySocket, SpoolView, children

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLIP = tk.SHORT_CLIP
CLIP_TEXT = tk.reference_text(CLIP)


NODE_SETTINGS = {"SMAPD_FORMATS": "txt,json", "SMAPD_SETTLE_SECONDS": 2, "SMAPD_LEASE_SECONDS": 30,
                 "SMAPD_SHUTDOWN_GRACE_SECONDS": 5}


def base_env(model_cache_dir: Path, **extra: object) -> dict[str, str]:
    return tk.daemon_env(model_cache_dir, **{**NODE_SETTINGS, **extra})


def start_daemon(root: Path, env: dict[str, str]) -> tuple[tk.Node, SpoolView]:
    return tk.serve(root, env, name="f1")


def one_worker(pid: int, other_than: int | None = None, timeout: float = 60) -> int:
    """The daemon's (single) worker pid, waiting for one that is not ``other_than``."""
    found: list[int] = []

    def look() -> bool:
        found[:] = [c for c in children(pid) if c != other_than and tk.pid_alive(c)]
        return bool(found)

    assert tk.wait_for(look, timeout, 0.01), f"no worker under daemon {pid}"
    return found[0]


def drop_clip(sp, tmp: Path, name: str) -> None:
    src = tmp / f"src-{name}"
    shutil.copyfile(CLIP, src)
    sp.drop(src, name)


def test_hung_worker_is_killed_at_chunk_timeout_and_the_chunk_retried(tmp_path, model_dir, model_cache_dir):
    node, sp = start_daemon(tmp_path, base_env(model_cache_dir, CHUNK_TIMEOUT="4", SMAPD_CHUNK_RETRIES="1"))
    try:
        hung = one_worker(node.pid)
        os.kill(hung, signal.SIGSTOP)  # hangs: reads nothing, answers nothing
        t0 = time.monotonic()
        drop_clip(sp, tmp_path, "hang.ogg")
        report = sp.transcribed("hang.ogg", CLIP_TEXT)
        assert report["chunks"][0]["attempts"] == 2, report["chunks"]
        assert time.monotonic() - t0 >= 4
        assert tk.wait_gone(hung, 10), "the hung worker was not killed"
        fresh = one_worker(node.pid, other_than=hung)
        assert fresh != hung
        assert "no answer within CHUNK_TIMEOUT=4 s" in node.log_text()
        tk.assert_invariants(sp)
    finally:
        node.kill9()


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL"])
def test_crashing_worker_is_replaced_and_the_chunk_retried(tmp_path, model_dir, model_cache_dir, sig):
    node, sp = start_daemon(tmp_path, base_env(model_cache_dir, CHUNK_TIMEOUT="60"))
    try:
        victim = one_worker(node.pid)
        os.kill(victim, signal.SIGSTOP)  # hold it so that it dies with the chunk in hand
        drop_clip(sp, tmp_path, "crash.ogg")
        assert tk.wait_for(lambda: "Transcribing chunk 1" in node.log_text(), 30)
        time.sleep(0.3)
        os.kill(victim, sig)
        os.kill(victim, signal.SIGCONT)
        report = sp.transcribed("crash.ogg", CLIP_TEXT)
        assert report["chunks"][0]["attempts"] == 2, report["chunks"]
        assert f"was killed by {sig.name}" in node.log_text()
        assert one_worker(node.pid, other_than=victim) != victim
        drop_clip(sp, tmp_path, "after-crash.ogg")  # the replacement serves the next job
        report = sp.transcribed("after-crash.ogg", CLIP_TEXT)
        assert report["chunks"][0]["attempts"] == 1
        tk.assert_invariants(sp)
    finally:
        node.kill9()


def test_worker_recycled_after_max_chunks(tmp_path, model_dir, model_cache_dir):
    node, sp = start_daemon(tmp_path, base_env(model_cache_dir, SMAPD_WORKER_MAX_CHUNKS="2"))
    try:
        pids = [one_worker(node.pid)]
        for i in range(3):
            drop_clip(sp, tmp_path, f"recycle-{i}.ogg")
            sp.transcribed(f"recycle-{i}.ogg", CLIP_TEXT)
            if i == 1:
                assert tk.wait_for(lambda: "recycling worker w1: served 2 chunks" in node.log_text(), 20)
                pids.append(one_worker(node.pid, other_than=pids[0]))
        assert pids[1] != pids[0] and not tk.pid_alive(pids[0])
        assert node.log_text().count("recycling worker") == 1  # 3 chunks: one recycle so far
    finally:
        node.kill9()


def test_worker_recycled_above_max_rss(tmp_path, model_dir, model_cache_dir):
    node, sp = start_daemon(tmp_path, base_env(model_cache_dir, SMAPD_WORKER_MAX_RSS_MB="50"))
    try:
        first = one_worker(node.pid)
        drop_clip(sp, tmp_path, "rss.ogg")
        sp.transcribed("rss.ogg", CLIP_TEXT)
        assert tk.wait_for(lambda: "(SMAPD_WORKER_MAX_RSS_MB=50)" in node.log_text(), 20)
        assert one_worker(node.pid, other_than=first) != first
    finally:
        node.kill9()


# --------------------------------------------------------------------------------------------
# The model: missing or corrupt -> one clear line, exit 2, before READY
# --------------------------------------------------------------------------------------------


def _bad_model_dirs(tmp: Path, model_dir: Path) -> dict[str, dict[str, str]]:
    corrupt = tmp / "corrupt-model"
    corrupt.mkdir()
    for p in model_dir.iterdir():
        if p.name != "model.bin":
            shutil.copyfile(p, corrupt / p.name)
    with open(model_dir / "model.bin", "rb") as src, open(corrupt / "model.bin", "wb") as dst:
        dst.write(src.read(1 << 20))  # the first MB of a 140 MB file
    cache = tmp / "corrupt-cache"
    shutil.copytree(corrupt, cache / model_dir.name)
    return {
        "missing dir": {"SMAPD_MODEL": str(tmp / "no-such-model")},
        "corrupt dir": {"SMAPD_MODEL": str(corrupt)},
        "corrupt embedded cache": {"SMAPD_MODEL": "embedded", "SMAPD_MODEL_CACHE": str(cache)},
    }


def test_missing_or_corrupt_model_fails_at_start_before_ready(tmp_path, model_dir, model_cache_dir):
    for label, extra in _bad_model_dirs(tmp_path, model_dir).items():
        notify = NotifySocket(tmp_path / f"notify-{label.replace(' ', '-')}")
        try:
            env = base_env(
                model_cache_dir,
                SMAPD_SPOOL_DIR=str(tmp_path / "spool"),
                SMAPD_NODE="m1",
                NOTIFY_SOCKET=str(notify.path),
                **extra,
            )
            proc = subprocess.run(
                [sys.executable, "-m", "smapd.cli", "run"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=tk.REPO,
                check=False,
            )
        finally:
            notify.close()
        assert proc.returncode == 2, (label, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (label, proc.stderr[-3000:])
        lines = [x for x in proc.stderr.splitlines() if x.startswith("smapd: ")]
        assert len(lines) == 1 and "model" in lines[0].lower(), (label, proc.stderr[-2000:])
        assert not notify.lines("READY=1"), (label, notify.messages)


# --------------------------------------------------------------------------------------------
# A wedged pool stops the watchdog pings
# --------------------------------------------------------------------------------------------

STALL_ALLOWANCE = 60.0  # smapd/pool.py stalled_seconds(): CHUNK_TIMEOUT + 60 s before "stalled"


@pytest.mark.timeout(240)
def test_wedged_pool_stops_the_watchdog_pings(tmp_path, model_dir, model_cache_dir):
    """The worker hangs (CHUNK_TIMEOUT=3 kills it) and its replacement hangs while loading the model
    (the slot waits up to 600 s for it): the pool makes no progress, so past CHUNK_TIMEOUT + 60 s the
    main loop must stop sending WATCHDOG=1. Once the replacement is let go, the pings resume."""
    notify = NotifySocket(tmp_path / "notify")
    node, sp = start_daemon(
        tmp_path,
        base_env(model_cache_dir, CHUNK_TIMEOUT="3", NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000"),
    )
    try:
        assert tk.wait_for(lambda: len(notify.pings()) >= 3, 15), notify.messages
        first = one_worker(node.pid)
        os.kill(first, signal.SIGSTOP)
        drop_clip(sp, tmp_path, "wedge.ogg")
        assert tk.wait_for(lambda: "Transcribing chunk 1" in node.log_text(), 30)
        t0 = time.monotonic()
        second = one_worker(node.pid, other_than=first, timeout=20)  # the replacement, still loading
        os.kill(second, signal.SIGSTOP)
        assert tk.wait_for(
            lambda: "the engine pool is stalled" in node.log_text(), 3 + STALL_ALLOWANCE + 20
        )
        t_stall = time.monotonic()
        healthy = notify.pings(t0, t0 + 3 + STALL_ALLOWANCE - 5)
        assert len(healthy) >= 20, "pings stopped while the pool was still within its allowance"
        time.sleep(6)
        assert notify.pings(t_stall + 0.5, time.monotonic()) == [], "WATCHDOG=1 sent while the pool is wedged"
        os.kill(second, signal.SIGCONT)  # unwedge: it loads, the chunk is retried, pings come back
        sp.transcribed("wedge.ogg", CLIP_TEXT, timeout=60)
        t_back = time.monotonic()
        assert tk.wait_for(lambda: notify.pings(t_back), 10), "the pings did not resume"
    finally:
        node.kill9()
        notify.close()


# --------------------------------------------------------------------------------------------
# A transient spool fault with one node
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root for a bind mount")
def test_transient_publish_failure_on_a_single_node_is_retried(tmp_path, model_dir, model_cache_dir):
    """outbox/ read-only (a read-only bind mount: root ignores chmod) while a job publishes: the job
    keeps its claim (lease refreshed) and retries publishing; once outbox/ is writable again it
    finishes, without spending one of the file's attempts."""
    node, sp = start_daemon(tmp_path, base_env(model_cache_dir, SMAPD_LEASE_SECONDS="6"))
    out = str(sp.outbox)
    mounted = False
    try:
        subprocess.run(["mount", "--bind", out, out], check=True)
        mounted = True
        subprocess.run(["mount", "-o", "remount,bind,ro", out], check=True)
        drop_clip(sp, tmp_path, "ro-outbox.ogg")
        assert tk.wait_for(lambda: "cannot publish yet" in node.log_text(), 60), node.log_text()[-2000:]
        time.sleep(8)  # longer than the 6 s lease: the claim must stay ours while we retry
        assert len(sp.claims()) == 1
        subprocess.run(["umount", out], check=True)
        mounted = False
        report = sp.transcribed("ro-outbox.ogg", CLIP_TEXT, timeout=30)
        assert report["job"]["attempt"] == 1
        tk.assert_invariants(sp, max_attempts=1)
    finally:
        if mounted:
            subprocess.run(["umount", out], check=False)
        node.kill9()
