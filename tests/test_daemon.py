"""Issue 3, proved with real `smapd run` processes on temp spools, the real model and real clips.

Each DESIGN.md §1 invariant has a test here that fails if it breaks (numbers in the test names'
docstrings). Daemons are started once per group (module fixtures) and always killed, with their
workers' process groups, in the finalizers. Waits are ``tk.wait_for`` with timeouts.

Groups:
- ``solo``: one node (2 workers, MAX_CONCURRENT_JOBS=2): drops by rename / slow write / open writer /
  writes no inotify event reveals, bad and odd entries, name collisions, `smapd status`, two jobs on one pool.
- ``cluster``: three nodes on one spool, c2 with its clock 10 min fast and c3 10 min slow (a
  sitecustomize that shifts time.time), c3 polling only: the claim race, skewed clocks, kill -9
  takeover by another node, SIGSTOP past the lease.
- own daemons: kill -9 in every attempt (poison, MAX_ATTEMPTS, own dead claims at once, orphan
  workers), sdnotify + SIGHUP + SIGTERM finishing in the grace, SIGTERM handing back (a second
  signal: test_daemon_defects.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import testkit as tk
from testkit import Node, NotifySocket, SpoolView, input_name, kill_all

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

CLIP = tk.SHORT_CLIP
CLIP_TEXT = tk.reference_text(CLIP)
SETTLE = 1.5
RESCAN = 1.0
SKEW = 600.0  # seconds: c2 runs 10 minutes fast, c3 10 minutes slow
RACE_FILES = 51

SITECUSTOMIZE = '''\
"""Test only: shift this process's time.time() by $SMAPD_TEST_CLOCK_SKEW seconds (a node whose clock drifted)."""
import os
import sys
import time

_skew = float(os.environ.get("SMAPD_TEST_CLOCK_SKEW") or 0)
if _skew:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _skew
    time.time_ns = lambda: _time_ns() + int(_skew * 1e9)
    print(f"test clock skew: time.time() is {_skew:+g} s off", file=sys.stderr, flush=True)
'''


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


NODE_SETTINGS = {"SMAPD_CPU_THREADS": 1, "SMAPD_FORMATS": "txt", "SMAPD_WATCH": "inotify",
                 "SMAPD_RESCAN_SECONDS": RESCAN, "SMAPD_SETTLE_SECONDS": SETTLE, "SMAPD_LEASE_SECONDS": 10,
                 "SMAPD_SHUTDOWN_GRACE_SECONDS": 30}


def make_env(model_cache_dir: Path, **extra: object) -> dict[str, str]:
    return tk.daemon_env(model_cache_dir, **{**NODE_SETTINGS, **extra})


def listdir(d: Path) -> list[str]:
    return os.listdir(d)


def claim_latency(sp: SpoolView, name: str, since: float, timeout: float = 10) -> float:
    """Seconds from ``since`` until ``name`` left inbox/ (claimed)."""
    assert tk.wait_for(lambda: not sp.in_inbox(name), timeout, 0.005), f"{name} was not claimed"
    return time.monotonic() - since


def speech_pieces(out_dir: Path, count: int, seconds: float = 1.6) -> list[Path]:
    """``count`` short WAV cuts of the English clips (different audio, all real speech)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces: list[Path] = []
    n = int(seconds * tk.RATE)
    while len(pieces) < count:
        for clip, _ in tk.manifest_clips("en"):
            pcm = tk.decode_pcm16(clip)
            lead, _trail = tk.speech_bounds(pcm)
            for start in range(lead, len(pcm) - n, n):
                if len(pieces) >= count:
                    return pieces
                pieces.append(tk.write_pcm16_wav(out_dir / f"piece-{len(pieces):03d}.wav", pcm[start:start + n]))
    return pieces


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("daemon-stage")


@pytest.fixture(scope="module")
def long_clip(stage: Path) -> Path:
    """~30 s of speech (three clips): one chunk that keeps a worker busy for seconds."""
    clips = tk.manifest_clips("en")[2:5]
    pcm = np.concatenate([tk.decode_pcm16(p) for p, _ in clips])
    return tk.write_pcm16_wav(stage / "long.wav", pcm)


# --------------------------------------------------------------------------------------------
# One node: intake, bad and odd entries, collisions, status, two jobs on one pool
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, model_cache_dir: Path) -> Iterator[tuple[Node, SpoolView]]:
    root = tmp_path_factory.mktemp("solo")
    spool = root / "spool"  # not created: `smapd run` makes the layout
    env = make_env(model_cache_dir, MAX_PARALLEL_WORKERS="2", MAX_CONCURRENT_JOBS="2",
                   SMAPD_FORMATS="txt,srt,vtt,json")
    node = Node("solo", spool, root, env)
    try:
        node.launch()
        yield node, SpoolView(spool, nodes=(node,))
    finally:
        kill_all(node)


def test_drop_by_rename_is_claimed_within_a_second_and_gets_every_output(solo: tuple[Node, SpoolView]) -> None:
    """Inv. 1, 3: outputs txt/srt/vtt/json + report in outbox/, the original (byte-identical) in archive/."""
    _node, sp = solo
    for d in ("inbox", "processing", "outbox", "archive", "failed", ".smapd"):
        assert (sp.root / d).is_dir(), f"the daemon did not create {d}/"
    t0 = sp.drop(CLIP, "talk.ogg")
    latency = claim_latency(sp, "talk.ogg", t0)
    assert latency < 1.0, f"claimed {latency:.2f} s after the rename into inbox/"
    report = sp.transcribed("talk.ogg", CLIP_TEXT)
    assert report["outputs"] == {s: f"talk{s}" for s in (".txt", ".srt", ".vtt", ".json")}
    for s in (".txt", ".srt", ".vtt", ".json", ".report.json"):
        assert (sp.outbox / f"talk{s}").stat().st_size > 0
    assert tk.parse_srt((sp.outbox / "talk.srt").read_text()) and tk.parse_vtt((sp.outbox / "talk.vtt").read_text())
    json.loads((sp.outbox / "talk.json").read_bytes())
    job = report["job"]
    assert job["attempt"] == 1 and job["node"] == "solo" and job["output_stem"] == "talk"
    archived = sp.archive / f"{job['id']}.talk.ogg"
    assert archived.read_bytes() == CLIP.read_bytes()
    assert tk.wait_for(lambda: sp.locations("talk.ogg") == ["archive"], 5), sp.locations("talk.ogg")
    assert not [n for n in listdir(sp.outbox) if n.startswith(".")], "temp files left in outbox/"


def test_slow_in_place_write_is_not_claimed_before_the_writer_is_done(solo: tuple[Node, SpoolView]) -> None:
    """Inv. 8: a writer appending for ~4 s (pauses shorter than SETTLE) is never claimed early; after
    its close-write the file is claimed within a second, and the whole file is transcribed."""
    _node, sp = solo
    data = CLIP.read_bytes()
    path = sp.inbox / "slow.ogg"
    pieces = 12
    step = len(data) // pieces + 1
    with open(path, "wb") as f:
        for i in range(pieces):
            f.write(data[i * step:(i + 1) * step])
            f.flush()
            # pace the writer (0.35 s < SETTLE) and watch for an early claim at the same time
            assert not tk.wait_for(lambda: not sp.in_inbox("slow.ogg"), 0.35, 0.01), \
                f"claimed after {i + 1}/{pieces} pieces, while still being written"
    closed = time.monotonic()
    assert claim_latency(sp, "slow.ogg", closed) < 1.0, "not claimed within 1 s of close-write"
    report = sp.transcribed("slow.ogg", CLIP_TEXT)
    assert report["input"]["size"] == len(data)


IGNORED = [".hidden.ogg", "a.ogg.part", "b.ogg.partial", "c.ogg.tmp", "d.ogg.crdownload", "e.ogg~",
           ".nfs0000000000abcd00000001", ".syncthing.f.ogg.tmp"]


def test_temp_and_dot_names_are_never_claimed_and_the_final_rename_is(solo: tuple[Node, SpoolView]) -> None:
    """Inv. 8: names writers use while a file is incomplete are left alone, however long they sit
    there (complete audio, settled, close-written); renaming one to its final name is the ready signal."""
    _node, sp = solo
    for name in IGNORED:
        shutil.copyfile(CLIP, sp.inbox / name)
    assert not tk.wait_for(lambda: set(IGNORED) - set(listdir(sp.inbox)), SETTLE + 2 * RESCAN + 1, 0.05), \
        f"claimed an ignored name: {set(IGNORED) - set(listdir(sp.inbox))}"
    assert not sp.claims()
    t0 = time.monotonic()
    os.rename(sp.inbox / "a.ogg.part", sp.inbox / "a.ogg")
    assert claim_latency(sp, "a.ogg", t0) < 1.0
    sp.transcribed("a.ogg", CLIP_TEXT)
    for name in set(IGNORED) - {"a.ogg.part"}:
        (sp.inbox / name).unlink()


def test_writer_that_keeps_the_file_open_is_claimed_once_settled(solo: tuple[Node, SpoolView]) -> None:
    """Inv. 8: no close-write ever comes; the file is ready once size and mtime held for SETTLE."""
    _node, sp = solo
    data = CLIP.read_bytes()
    f = open(sp.inbox / "open.ogg", "wb")  # noqa: SIM115 - held open on purpose
    try:
        f.write(data[: len(data) // 2])
        f.flush()
        assert not tk.wait_for(lambda: not sp.in_inbox("open.ogg"), 1.0, 0.01), "claimed mid-write"
        f.write(data[len(data) // 2:])
        f.flush()
        last = time.monotonic()
        latency = claim_latency(sp, "open.ogg", last, timeout=SETTLE + RESCAN + 5)
        assert SETTLE - 0.2 <= latency <= SETTLE + RESCAN + 2, latency
    finally:
        f.close()
    report = sp.transcribed("open.ogg", CLIP_TEXT)
    assert report["input"]["size"] == len(data)


def test_writes_no_inotify_event_reveals_are_found_by_the_rescan(solo: tuple[Node, SpoolView]) -> None:
    """What NFS does to inotify, locally: the file is hard-linked into inbox/ (one create event, not
    "ready") and written through its other name, so inbox/'s watch sees no modify and no close-write.
    The rescan must not claim it while it grows and must find it within SETTLE + RESCAN once complete."""
    _node, sp = solo
    data = CLIP.read_bytes()
    outside = sp.stage / "nfs-writer.ogg"
    with open(outside, "wb") as f:
        os.link(outside, sp.inbox / "remote.ogg")
        for i in range(6):
            f.write(data[i * len(data) // 6:(i + 1) * len(data) // 6])
            f.flush()
            assert not tk.wait_for(lambda: not sp.in_inbox("remote.ogg"), 0.4, 0.01), "claimed mid-write"
    done = time.monotonic()
    latency = claim_latency(sp, "remote.ogg", done, timeout=SETTLE + RESCAN + 5)
    # not before SETTLE: no close-write reached inbox/'s watch, so only the settle rule could make it ready
    assert SETTLE - 0.2 <= latency <= SETTLE + RESCAN + 1.5, latency
    report = sp.transcribed("remote.ogg", CLIP_TEXT)
    assert report["input"]["size"] == len(data)


def test_corrupt_file_lands_in_failed_with_a_one_sentence_report(solo: tuple[Node, SpoolView]) -> None:
    """Inv. 1, 2: the original in failed/<job>.<name>, one report saying why; nothing in outbox/."""
    _node, sp = solo
    bad = tk.write_random_bytes(sp.stage / "noise-src", seed=5)
    sp.drop(bad, "broken.mp3")
    where, report, _ = sp.outcome("broken.mp3")
    assert where == "failed" and report["outcome"] == "failed"
    error = report["error"]
    assert error and "\n" not in error and "Traceback" not in error and len(error) < 300, error
    assert ". " not in error.rstrip(". "), f"more than one sentence: {error!r}"
    assert "not a readable audio or video file" in error
    job = report["job"]["id"]
    assert (sp.failed / f"{job}.broken.mp3").read_bytes() == bad.read_bytes()
    assert (sp.failed / f"{job}.broken.mp3.report.json").is_file()
    assert not [n for n in listdir(sp.outbox) if n.startswith("broken")]
    assert sp.locations("broken.mp3") == ["failed"]


def test_non_regular_entries_are_refused_never_followed_and_never_block(solo: tuple[Node, SpoolView],
                                                                         tmp_path: Path) -> None:
    """Inv. 9: symlinks (to a file, /etc/shadow, dangling, to a directory), a FIFO and a sub-directory
    go to failed/ as they are, with a report; nothing is read through them; the daemon keeps serving."""
    node, sp = solo
    target_file = tmp_path / "real.ogg"
    shutil.copyfile(CLIP, target_file)
    target_dir = tmp_path / "somedir"
    target_dir.mkdir()
    (target_dir / "inside.ogg").write_bytes(CLIP.read_bytes())
    entries = {
        "link-file.ogg": ("a symbolic link", lambda p: os.symlink(target_file, p)),
        "link-shadow.wav": ("a symbolic link", lambda p: os.symlink("/etc/shadow", p)),
        "dangling.mp3": ("a symbolic link", lambda p: os.symlink(tmp_path / "nowhere.mp3", p)),
        "link-dir": ("a symbolic link", lambda p: os.symlink(target_dir, p)),
        "pipe.wav": ("a FIFO", os.mkfifo),
        "subdir": ("a directory", lambda p: (p.mkdir(), (p / "x.ogg").write_bytes(CLIP.read_bytes()))),
    }
    for name, (_, make) in entries.items():
        make(sp.inbox / name)
    sp.drop(CLIP, "after-fifo.ogg")  # a FIFO opened for reading would block the daemon here
    for name, (kind, _) in entries.items():
        where, report, _ = sp.outcome(name, timeout=20)
        assert where == "failed" and kind in report["error"] and "never follows" in report["error"], report
        moved = [n for n in listdir(sp.failed) if n.endswith("." + name)]
        assert len(moved) == 1, moved
        st = os.lstat(sp.failed / moved[0])
        if kind == "a symbolic link":
            assert os.path.islink(sp.failed / moved[0])  # the link itself, not a copy of its target
        elif kind == "a FIFO":
            import stat as _stat

            assert _stat.S_ISFIFO(st.st_mode)
    sp.transcribed("after-fifo.ogg", CLIP_TEXT)
    assert target_file.read_bytes() == CLIP.read_bytes() and (target_dir / "inside.ogg").exists()
    assert not [n for n in listdir(sp.outbox) if n.startswith(("link", "dangling", "pipe", "subdir"))]
    shadow_hint = "root:"  # /etc/shadow's first line; it must never be read into a report
    assert not any(shadow_hint in json.dumps(r) for _, r in sp.reports())
    assert node.alive()


ODD_NAMES = [
    "two  spaces and 'quotes' \"too\".ogg",
    "new\nline.ogg",
    os.fsdecode(b"latin1-\xe9t\xe9-\xff.ogg"),  # not UTF-8: surrogate-escaped str, any bytes round-trip
    "ünïcödé 日本語.ogg",
    "x" * (255 - len(".ogg")) + ".ogg",  # NAME_MAX exactly
]


def test_odd_names_get_outputs_and_keep_the_original_name_in_archive(solo: tuple[Node, SpoolView]) -> None:
    _node, sp = solo
    assert len(os.fsencode(ODD_NAMES[-1])) == 255
    for name in ODD_NAMES:
        sp.drop(CLIP, name)
    for name in ODD_NAMES:
        report = sp.transcribed(name, CLIP_TEXT, timeout=90)
        job = report["job"]
        for suffix, out in report["outputs"].items():
            assert (sp.outbox / out).is_file() and "\n" not in out, (name, suffix, out)
        assert (sp.outbox / f"{job['output_stem']}.report.json").is_file()
        archived = sp.archived(job["id"])
        assert len(archived) == 1, archived
        if len(os.fsencode(name)) + 13 <= 243:  # names that fit are kept whole: <job>.<name>
            assert archived[0] == f"{job['id']}.{name}", (archived, name)
        assert (sp.archive / archived[0]).read_bytes() == CLIP.read_bytes()


def test_name_collisions_never_overwrite_and_the_report_records_the_mapping(solo: tuple[Node, SpoolView],
                                                                             stage: Path) -> None:
    """talk.mp3 and talk.wav, and talk.mp3 dropped twice more: three stems, every output kept."""
    node, sp = solo
    wav = tk.write_speech_variant(CLIP, stage / "coll.wav")
    mp3 = tk.encode_audio(CLIP, stage / "coll.mp3", "libmp3lame")
    sp.drop(mp3, "dup.mp3")
    sp.drop(wav, "dup.wav")
    first = sp.transcribed("dup.mp3", CLIP_TEXT)
    sp.transcribed("dup.wav", CLIP_TEXT)
    sp.drop(mp3, "dup.mp3")  # the same name again, after the first one finished
    assert tk.wait_for(lambda: len(sp.reports_for("dup.mp3")) == 2, 60), node.log_text()[-2000:]
    assert tk.wait_for(lambda: len([n for n in listdir(sp.archive) if n.endswith(".dup.mp3")]) == 2, 10)
    reports = [r for _, r in sp.reports_for("dup.mp3")] + [r for _, r in sp.reports_for("dup.wav")]
    assert all(r["outcome"] == "success" for r in reports)
    stems = sorted(r["job"]["output_stem"] for r in reports)
    assert stems == ["dup", "dup.2", "dup.3"], stems
    assert len({r["job"]["id"] for r in reports}) == 3
    for r in reports:
        stem = r["job"]["output_stem"]
        assert r["outputs"][".txt"] == f"{stem}.txt"
        on_disk = json.loads((sp.outbox / f"{stem}.report.json").read_bytes())
        assert on_disk["job"]["id"] == r["job"]["id"], "a report was overwritten by another job's"
        assert len(sp.archived(r["job"]["id"])) == 1
    # the first two ran at once (MAX_CONCURRENT_JOBS=2): either may hold the plain stem; the later drop gets dup.3
    (again,) = [r for r in reports if r["job"]["id"] != first["job"]["id"] and r["input"]["name"] == "dup.mp3"]
    assert again["job"]["output_stem"] == "dup.3"
    assert len([n for n in listdir(sp.archive) if n.endswith(".dup.mp3")]) == 2


def test_status_shows_waiting_in_progress_failures_and_nodes_and_two_jobs_share_one_pool(
        solo: tuple[Node, SpoolView], long_clip: Path) -> None:
    """MAX_CONCURRENT_JOBS=2 with MAX_PARALLEL_WORKERS=2: two jobs in flight, still two worker processes
    (never jobs x workers); `smapd status --json` shows the third file waiting, both jobs with node and
    chunk progress, a recent failure, and the node's heartbeat age."""
    node, sp = solo
    sp.drop(tk.write_text_as(sp.stage / "list.txt"), "status-bad.wav")
    assert sp.outcome("status-bad.wav").where == "failed"
    workers = node.signal_workers(signal.SIGSTOP, expect=2)  # hold every chunk: the jobs stay in flight
    try:
        for name in ("st-a.wav", "st-b.wav", "st-c.wav"):
            sp.drop(long_clip, name)
        assert tk.wait_for(lambda: len(sp.claims()) == 2, 10), sp.claims()

        def status() -> dict[str, Any]:
            out = subprocess.run([sys.executable, "-m", "smapd.cli", "status", "--json", "--spool", str(sp.root)],
                                 env=node.env, capture_output=True, text=True, timeout=60, cwd=tk.REPO, check=True)
            return json.loads(out.stdout)

        seen: list[dict[str, Any]] = []

        def progress_reported() -> bool:
            seen[:] = [status()]
            jobs = [j for n in seen[0]["nodes"] if n["node"] == "solo" for j in n.get("jobs", [])]
            return len(jobs) == 2 and all(j["chunks_total"] >= 1 for j in jobs)

        assert tk.wait_for(progress_reported, 20, 0.5), seen
        st = seen[0]
        assert [w["name"] for w in st["waiting"]] == ["st-c.wav"]
        assert sorted(c["name"] for c in st["processing"]) == ["st-a.wav", "st-b.wav"]
        assert all(c["node"] == "solo" and c["attempt"] == 1 and not c["stale"] for c in st["processing"])
        for c in st["processing"]:  # inv. 4: the claimed name says who holds it, for which job and attempt
            assert f"{c['name']}__solo_{c['job_id']}_a1_p{node.pid}" in sp.claims(), (c, sp.claims())
        (me,) = [n for n in st["nodes"] if n["node"] == "solo"]
        assert 0 <= me["age"] < 5 and me["pid"] == node.pid
        assert all(j["chunks_done"] == 0 and j["chunks_total"] >= 1 for j in me["jobs"]), me["jobs"]
        assert any(f["name"] == "status-bad.wav" and f["error"] for f in st["failures"])
        alive = [w for w in node.workers() if tk.pid_alive(w)]
        assert sorted(alive) == sorted(workers), f"jobs x workers processes: {alive} (pool had {workers})"
        text = subprocess.run([sys.executable, "-m", "smapd.cli", "status", "--spool", str(sp.root)], env=node.env,
                              capture_output=True, text=True, timeout=60, cwd=tk.REPO, check=True).stdout
        assert "waiting: 1" in text and "in progress: 2" in text and "node solo" in text, text
    finally:
        for w in workers:
            with contextlib.suppress(OSError):
                os.killpg(w, signal.SIGCONT)
    for name in ("st-a.wav", "st-b.wav", "st-c.wav"):
        sp.transcribed(name, timeout=120)


# --------------------------------------------------------------------------------------------
# Three nodes on one spool: the claim race, skewed clocks, takeovers
# --------------------------------------------------------------------------------------------


class Cluster:
    def __init__(self, root: Path, model_cache_dir: Path) -> None:
        self.root = root
        spool = root / "spool"
        skew_dir = root / "skew"
        skew_dir.mkdir()
        (skew_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        base = make_env(model_cache_dir, SMAPD_LEASE_SECONDS="10")
        skewed = {"PYTHONPATH": f"{skew_dir}{os.pathsep}{tk.REPO}"}
        self.c1 = Node("c1", spool, root, base)
        self.c2 = Node("c2", spool, root, dict(base, **skewed, SMAPD_TEST_CLOCK_SKEW=str(SKEW)))
        self.c3 = Node("c3", spool, root, dict(base, **skewed, SMAPD_TEST_CLOCK_SKEW=str(-SKEW),
                                                SMAPD_WATCH="polling"))
        self.nodes = (self.c1, self.c2, self.c3)
        self.sp = SpoolView(spool, nodes=self.nodes)
        self.lease = 10.0

    def ensure_running(self) -> None:
        for n in self.nodes:
            n.cont()
        dead = [n for n in self.nodes if not n.alive()]
        for n in dead:
            n.start()
        for n in dead:
            if not n.wait_ready(120):
                pytest.fail(f"node {n.name} did not start:\n{n.log_text()[-3000:]}")

    def pause(self, *nodes: Node) -> None:
        for n in nodes:
            n.stop()

    def resume(self, *nodes: Node) -> None:
        for n in nodes:
            n.cont()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, model_cache_dir: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"), model_cache_dir)
    try:
        c.ensure_running()
        assert "time.time() is +600 s off" in c.c2.log_text() and "time.time() is -600 s off" in c.c3.log_text()
        yield c
    finally:
        kill_all(*c.nodes)


def test_claim_race_three_nodes_every_file_transcribed_exactly_once(cluster: Cluster, tmp_path: Path) -> None:
    """Inv. 1-4 under contention: 51 files, three nodes (two with clocks 10 min off, one polling).
    Exactly one report per input, distinct job ids, every attempt 1 (nobody stole a live claim),
    nothing left in inbox/ or processing/. Meanwhile a reader sees no partial file in outbox/ and
    no report before its outputs, and no input is ever in two places."""
    cluster.ensure_running()
    sp = cluster.sp
    pieces = speech_pieces(tmp_path / "pieces", RACE_FILES)
    names = [f"race-{i:03d}.wav" for i in range(RACE_FILES)]
    problems: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # inv. 1 and 3, observed from the outside while the nodes work
        while not stop.is_set():
            try:
                for n in listdir(sp.outbox):
                    if n.startswith("."):
                        continue  # atomic-write temp names are dot names; readers skip them
                    if n.endswith(".report.json"):
                        r = json.loads((sp.outbox / n).read_bytes())
                        missing = [o for o in r["outputs"].values() if not (sp.outbox / o).exists()]
                        if missing:
                            problems.append(f"report {n} published before its outputs {missing}")
                    elif n.endswith(".json"):
                        json.loads((sp.outbox / n).read_bytes())
                for name in names[::7]:
                    if len(sp.locations(name)) > 1:
                        problems.append(f"{name} in {sp.locations(name)}")
            except ValueError as e:
                problems.append(f"partial file seen in outbox/: {e}")
            except FileNotFoundError:
                pass
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, name="outbox-reader")
    watcher.start()
    try:
        for src, name in zip(pieces, names):
            sp.drop(src, name)
        done = tk.wait_for(lambda: len([r for r in sp.reports() if input_name(r[1]).startswith("race-")])
                                >= RACE_FILES, 240, 0.5)
    finally:
        stop.set()
        watcher.join(10)
    assert done, f"{len(sp.reports())} reports; logs:\n" + "\n".join(n.log_text()[-1500:] for n in cluster.nodes)
    assert not problems, problems[:5]
    reports = [(w, r) for w, r in sp.reports() if input_name(r).startswith("race-")]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for w, r in reports:
        assert w == "outbox" and r["outcome"] == "success", (w, r.get("error"))
        by_name.setdefault(input_name(r), []).append(r)
    assert sorted(by_name) == names
    assert all(len(v) == 1 for v in by_name.values()), {k: len(v) for k, v in by_name.items() if len(v) != 1}
    ids = [r["job"]["id"] for _, r in reports]
    assert len(set(ids)) == RACE_FILES
    assert all(r["job"]["attempt"] == 1 for _, r in reports), "a live claim was taken over"
    assert tk.wait_for(lambda: not [n for n in sp.claims()] and not [n for n in listdir(sp.inbox)], 10)
    assert all(sp.locations(n) == ["archive"] for n in names)
    tk.assert_invariants(sp, names, complete=False, max_attempts=1)
    workers = {r["job"]["node"] for _, r in reports}
    assert len(workers) >= 2, f"only {workers} worked"
    for n in cluster.nodes:
        assert "Traceback" not in n.log_text() and n.alive(), n.log_text()[-2000:]


def test_a_polling_only_node_finds_files_within_settle_and_rescan(cluster: Cluster) -> None:
    """c3 runs SMAPD_WATCH=polling (no inotify at all, as on an NFS client for other machines' writes):
    with the other nodes paused it still finds a dropped file within SETTLE + RESCAN (+ slack)."""
    cluster.ensure_running()
    c1, c2, c3, sp = cluster.c1, cluster.c2, cluster.c3, cluster.sp
    assert "inotify" not in c3.life_log()  # no inotify fallback warning: it never tried
    cluster.pause(c1, c2)
    try:
        t0 = sp.drop(CLIP, "polled.ogg")
        latency = claim_latency(sp, "polled.ogg", t0, timeout=SETTLE + RESCAN + 5)
        assert latency <= SETTLE + RESCAN + 1.5, latency
        assert any("__c3_" in n for n in sp.claims()) or sp.reports_for("polled.ogg")
        report = sp.transcribed("polled.ogg", CLIP_TEXT)
        assert report["job"]["node"] == "c3"
    finally:
        cluster.resume(c1, c2)


def test_skewed_clocks_neither_steal_live_claims_nor_miss_stale_ones(cluster: Cluster) -> None:
    """Inv. 5 (the spool clock). c1 holds a job for longer than the lease (its worker is stopped; the
    daemon keeps refreshing): c2, 10 min fast, must not take it. Then c1 dies (kill -9, workers too):
    c3, 10 min slow, must take it over once the lease ran out, as attempt 2, and finish it."""
    cluster.ensure_running()
    c1, c2, c3, sp = cluster.c1, cluster.c2, cluster.c3, cluster.sp
    cluster.pause(c2, c3)
    c1.signal_workers(signal.SIGSTOP)
    sp.drop(CLIP, "skew.ogg")
    assert tk.wait_for(lambda: any("__c1_" in n for n in sp.claims()), 10), sp.claims()
    cluster.resume(c2)  # its clock says every lease is 10 minutes old
    assert not tk.wait_for(lambda: not any("__c1_" in n and "_a1_" in n for n in sp.claims()),
                                cluster.lease + 5, 0.1), f"c2 stole a live claim: {sp.claims()}"
    cluster.pause(c2)
    kill_all(c1)
    killed = time.monotonic()
    cluster.resume(c3)  # its clock says every lease is 10 minutes younger than it is
    assert tk.wait_for(lambda: any("__c3_" in n for n in sp.claims()) or sp.reports_for("skew.ogg"),
                            cluster.lease + 20, 0.05), f"c3 never took the stale claim: {sp.claims()}\n" \
        + c3.log_text()[-2000:]
    took = time.monotonic() - killed
    assert took >= cluster.lease / 2, f"taken over {took:.1f} s after the owner died: before the lease ran out"
    report = sp.transcribed("skew.ogg", CLIP_TEXT, timeout=60)
    assert report["job"]["attempt"] == 2 and report["job"]["node"] == "c3"
    assert [a["node"] for a in report["job"]["attempts"]] == ["c1", "c3"]
    cluster.ensure_running()


def test_kill9_mid_job_another_node_finishes_it_as_attempt_2(cluster: Cluster) -> None:
    """Inv. 5, 7: c1 is killed (-9, with its workers) in the middle of a job; c2 finishes it."""
    cluster.ensure_running()
    c1, c2, c3, sp = cluster.c1, cluster.c2, cluster.c3, cluster.sp
    cluster.pause(c2, c3)
    c1.signal_workers(signal.SIGSTOP)
    sp.drop(CLIP, "crash.ogg")
    assert tk.wait_for(lambda: any("__c1_" in n for n in sp.claims()), 10), (sp.claims(), c1.log_text()[-2000:])
    kill_all(c1)
    cluster.resume(c2, c3)
    report = sp.transcribed("crash.ogg", CLIP_TEXT, timeout=cluster.lease + 40)
    assert report["job"]["attempt"] == 2 and report["job"]["node"] in ("c2", "c3")
    assert len(report["job"]["attempts"]) == 2 and report["job"]["attempts"][0]["node"] == "c1"
    assert sp.locations("crash.ogg") == ["archive"]
    cluster.ensure_running()


def test_a_node_stopped_past_its_lease_is_taken_over_and_publishes_nothing(cluster: Cluster) -> None:
    """Inv. 6: c1 is SIGSTOPped mid-job for longer than the lease; c2 takes the claim over and finishes;
    c1, woken, finishes its chunk, notices and publishes nothing. Both attempts share the job id and so
    the output stem: after c1's job has ended (its heartbeat in the spool lists it no more), the report
    must still be c2's attempt 2, byte for byte, and no output may have been rewritten."""
    cluster.ensure_running()
    c1, c2, c3, sp = cluster.c1, cluster.c2, cluster.c3, cluster.sp
    cluster.pause(c2, c3)
    workers = c1.signal_workers(signal.SIGSTOP)
    sp.drop(CLIP, "sleeper.ogg")
    assert tk.wait_for(lambda: "sleeper.ogg" in sp.claims_of("c1"), 10), sp.claims()
    cluster.pause(c1)
    cluster.resume(c2)
    report = sp.transcribed("sleeper.ogg", CLIP_TEXT, timeout=cluster.lease + 40)
    job = report["job"]
    assert job["attempt"] == 2 and job["node"] == "c2"
    published = {n: ((sp.outbox / n).read_bytes(), (sp.outbox / n).stat().st_mtime_ns)
                 for n in [*report["outputs"].values(), f"{job['output_stem']}.report.json"]}

    woken = time.time()
    cluster.resume(c1)
    for w in workers:
        os.killpg(w, signal.SIGCONT)  # c1's chunk completes now: c1 must still publish nothing

    def c1_job_ended() -> bool:
        status = sp.node_status("c1")  # rewritten every second, after c1 woke
        return bool(status and status["mtime"] > woken + 1
                    and not [j for j in status.get("jobs", []) if j.get("job_id") == job["id"]])

    assert tk.wait_for(c1_job_ended, 60, 0.2), (sp.node_status("c1"), c1.log_text()[-2000:])
    assert c1.alive(), "c1 died after losing its claim"
    now = {n: ((sp.outbox / n).read_bytes(), (sp.outbox / n).stat().st_mtime_ns) for n in published}
    assert now == published, "c1 rewrote outputs of the job it had lost: " + \
        str([n for n in published if now[n] != published[n]])
    (where, final), = sp.reports_for("sleeper.ogg")
    assert where == "outbox" and (final["job"]["node"], final["job"]["attempt"]) == ("c2", 2), final["job"]
    assert not [n for n in listdir(sp.outbox) if n.startswith("sleeper.2")], "c1 published under a new stem"
    tk.assert_invariants(sp, ["sleeper.ogg"], complete=False, seen={job["id"]: tk.Seen(2, "c2")})
    cluster.resume(c3)


# --------------------------------------------------------------------------------------------
# Own daemons: kill -9 in every attempt, restart recovery, orphan workers
# --------------------------------------------------------------------------------------------


def test_a_job_killed_in_every_attempt_ends_in_failed_after_max_attempts(tmp_path: Path, model_dir: Path,
                                                                          model_cache_dir: Path, long_clip: Path) -> None:
    """Inv. 7, and recovery of own dead claims at once: the node is killed -9 during each attempt and
    restarted; each restart takes its own dead claim back at startup (the lease is 120 s: no waiting),
    as the next attempt; after MAX_ATTEMPTS=3 the file goes to failed/ with a report listing every
    attempt. The first kill spares the workers: orphaned, they must exit by themselves."""
    env = make_env(model_cache_dir, SMAPD_LEASE_SECONDS="120", SMAPD_MAX_ATTEMPTS="3")
    node = Node("phoenix", tmp_path / "spool", tmp_path, env)
    try:
        node.launch()
        sp = SpoolView(tmp_path / "spool", nodes=(node,))
        sp.drop(long_clip, "poison.wav")
        for attempt in (1, 2, 3):
            t_life = time.monotonic()
            if attempt > 1:
                node.launch()
            assert node.log_has("poison.wav: job", 30) and tk.wait_for(
                lambda a=attempt: f"(attempt {a}, node phoenix)" in node.log_text(), 60, 0.02), node.log_text()[-2000:]
            if attempt > 1:
                assert time.monotonic() - t_life < 60, "own dead claim not recovered at once"
            assert tk.wait_for(lambda: "Transcribing chunk" in node.log_text().rsplit("(attempt", 1)[-1], 30, 0.02)
            workers = [w for w in node.workers() if tk.pid_alive(w)]
            assert workers
            if attempt == 1:
                node.proc.send_signal(signal.SIGKILL)  # the daemon only: its workers become orphans
                node.proc.wait()
                assert all(tk.wait_gone(w, 30) for w in workers), "orphaned workers kept running"
            else:
                kill_all(node)
            assert [n for n in sp.claims() if f"_a{attempt}_" in n], sp.claims()
        node.launch()  # finds attempt 3 dead: gives up
        where, report, _ = sp.outcome("poison.wav", timeout=30)
        assert where == "failed" and report["outcome"] == "failed"
        assert "gave up after 3 attempts" in report["error"], report["error"]
        attempts = report["job"]["attempts"]
        assert [a["attempt"] for a in attempts] == [1, 2, 3] and all(a["node"] == "phoenix" for a in attempts)
        assert len({a["pid"] for a in attempts}) == 3
        assert sp.locations("poison.wav") == ["failed"] and not sp.claims()
        assert len(sp.reports_for("poison.wav")) == 1
        # the node is healthy after giving up, and the next file goes through
        sp.drop(CLIP, "next.ogg")
        sp.transcribed("next.ogg", CLIP_TEXT)
    finally:
        kill_all(node)


# --------------------------------------------------------------------------------------------
# systemd notifications, SIGHUP, SIGTERM
# --------------------------------------------------------------------------------------------


def test_sdnotify_reload_and_sigterm_finishing_within_the_grace(tmp_path: Path, model_dir: Path,
                                                                 model_cache_dir: Path, long_clip: Path) -> None:
    """READY=1 only after the model is loaded and the first scan (a file waiting before start is
    already claimed), STATUS= lines, WATCHDOG=1 pings; SIGHUP: RELOADING=1 ... READY=1, SMAPD_FORMATS
    from the SMAPD_CONFIG file honoured by the next job, a restart-only setting logged as needing a
    restart; SIGTERM mid-job: STOPPING=1, no new claims, the job finishes within the grace, exit 0."""
    spool = tmp_path / "spool"
    sp_inbox = spool / "inbox"
    sp_inbox.mkdir(parents=True)
    shutil.copyfile(CLIP, sp_inbox / "early.ogg")
    os.utime(sp_inbox / "early.ogg", (time.time() - 60, time.time() - 60))  # waited while no node ran
    config = tmp_path / "smapd.env"
    config.write_text("SMAPD_FORMATS=txt,srt,vtt,json\nSMAPD_WORKER_MAX_CHUNKS=0\n")
    notify = NotifySocket(tmp_path / "notify.sock", sp_inbox)
    env = make_env(model_cache_dir, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000",
                   SMAPD_CONFIG=str(config), SMAPD_SHUTDOWN_GRACE_SECONDS="40")
    del env["SMAPD_FORMATS"]  # from the config file
    node = Node("notify", spool, tmp_path, env)
    try:
        node.launch()
        sp = SpoolView(spool, nodes=(node,))
        assert tk.wait_for(lambda: notify.lines("READY=1"), 10), notify.messages
        ready = next(m for m in notify.messages if m.line == "READY=1")
        assert "early.ogg" not in ready.inbox, "READY=1 before the first scan claimed the waiting file"
        report = sp.transcribed("early.ogg", CLIP_TEXT)
        assert set(report["outputs"]) == {".txt", ".srt", ".vtt", ".json"}
        t = time.monotonic()
        assert tk.wait_for(lambda: len(notify.lines("WATCHDOG=1", since=t)) >= 3, 8), notify.messages[-10:]
        assert notify.lines("STATUS="), notify.messages
        assert any("early.ogg" in s for s in notify.lines("STATUS=")), notify.lines("STATUS=")
        assert tk.wait_for(lambda: any(s.startswith("STATUS=idle") for s in notify.lines("STATUS=")), 5)

        config.write_text("SMAPD_FORMATS=txt\nSMAPD_WORKER_MAX_CHUNKS=7\n")
        t_hup = time.monotonic()
        node.proc.send_signal(signal.SIGHUP)
        assert tk.wait_for(lambda: "READY=1" in notify.lines(since=t_hup), 10), notify.messages[-10:]
        after = notify.lines(since=t_hup)
        assert after.index("RELOADING=1") < after.index("READY=1"), after
        assert node.log_has("worker_max_chunks changed but needs a restart", 5), node.log_text()[-1500:]
        assert "reloaded configuration: formats=txt" in node.log_text()
        sp.drop(CLIP, "after-hup.ogg")
        report = sp.transcribed("after-hup.ogg", CLIP_TEXT)
        assert report["outputs"] == {".txt": "after-hup.txt"}
        assert sorted(n for n in listdir(sp.outbox) if n.startswith("after-hup")) == \
            ["after-hup.report.json", "after-hup.txt"]

        sp.drop(long_clip, "stopping.wav")
        assert node.log_has("Transcribing chunk 1", 10) and tk.wait_for(
            lambda: "stopping.wav: job" in node.log_text(), 10)
        t_term = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.log_has("stopping: no new claims", 5)
        sp.drop(CLIP, "too-late.ogg")  # must not be claimed once stopping
        assert node.proc.wait(timeout=45) == 0, node.log_text()[-2000:]
        assert time.monotonic() - t_term < 40 + 5
        assert "STOPPING=1" in notify.lines(since=t_term)
        sp.transcribed("stopping.wav", timeout=1)
        assert sp.in_inbox("too-late.ogg") and not sp.claims()
    finally:
        kill_all(node)
        notify.close()


def test_sigterm_hands_an_unfinished_job_back_and_the_attempt_does_not_count(
        tmp_path: Path, model_dir: Path, model_cache_dir: Path) -> None:
    """First SIGTERM with a job that cannot finish in SMAPD_SHUTDOWN_GRACE_SECONDS: exit 0 within the
    grace, the file back in inbox/ under its name, the attempt not counted (the next run is attempt 1).
    Two signals (exit at once, the claim left in processing/, recovered as attempt 2 by a restart):
    test_daemon_defects.py, defect 4."""
    grace = 3.0
    env = make_env(model_cache_dir, SMAPD_SHUTDOWN_GRACE_SECONDS=str(grace), SMAPD_LEASE_SECONDS="120")
    node = Node("term", tmp_path / "spool", tmp_path, env)
    try:
        node.launch()
        sp = SpoolView(tmp_path / "spool", nodes=(node,))
        workers = node.signal_workers(signal.SIGSTOP)  # the job cannot progress
        sp.drop(CLIP, "handback.ogg")
        assert tk.wait_for(lambda: len(sp.claims()) == 1, 10)
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=grace + 15) == 0, node.log_text()[-2000:]
        assert time.monotonic() - t0 < grace + 10
        assert sp.in_inbox("handback.ogg") and not sp.claims(), (listdir(sp.inbox), sp.claims())
        assert (sp.inbox / "handback.ogg").read_bytes() == CLIP.read_bytes()
        assert all(tk.wait_gone(w, 10) for w in workers), "workers left running after exit"

        node.launch()  # takes the handed-back file as a fresh claim: attempt 1
        report = sp.transcribed("handback.ogg", CLIP_TEXT)
        assert report["job"]["attempt"] == 1 and len(report["job"]["attempts"]) == 1
    finally:
        kill_all(node)
