#!/usr/bin/env python3
"""The chaos run (issue 5): several `smapd run` nodes on one spool, fed short real-speech clips and
hostile files while a driver does harm at random moments; then every DESIGN.md §1 invariant is
checked and one summary line is printed.

    python bench/chaos.py                      # 300 files (3 of them big), 3 nodes, a random seed (printed)
    python bench/chaos.py --seed 1234 --files 40 --big 1 --minutes 4

Big files (``--big``, issue 10): recordings of 200-230 s joined from the speech clips, dropped at
spread-out moments among the small ones. They are long enough to be shared (SMAPD_SHARE_MIN_CHUNKS
chunks of 30 s): the owner offers their chunks and idle nodes help. After each one the feeder drops
nothing for up to ``--lull`` seconds while it is in flight, since a node helps only when inbox/ has
nothing for it.

Faults, one at a time, at random moments while files are being dropped:

- ``kill``: SIGKILL a node's daemon and its workers' process groups (a machine that crashes); the
  node is restarted a few seconds later and must recover its own dead claims at once.
- ``stop``: SIGSTOP a daemon for longer than the lease, then SIGCONT. Another node must take its
  claims over; the woken node must notice and publish nothing for them.
- ``worker``: SIGKILL one engine worker's process group mid-chunk (replaced, chunk retried).
- ``full``: fill the spool's filesystem (a tmpfs of ``--spool-mb`` mounted for the run) with one
  big file until ENOSPC, hold it, delete it.
- ``ro``: make outbox/ unwritable: a read-only bind mount of outbox/ over itself, so every
  create/rename into it fails with EROFS/EXDEV even for root (chmod does not stop root), then
  unmount it.

Hostile entries (empty, random bytes, text, video without audio, header only, a truncated FLAC,
a dangling symlink, a FIFO, a directory) are dropped among the good files; each must end in
failed/ with a report naming the reason.

Kill and stop faults are aimed at a node that holds claims at that moment where one does; with
``--require kill,stop`` the faults go on (while files remain) until each of those kinds has hit
such a node at least once. While a big job is in flight they are aimed at it: the first fault after
it begins (and most later ones) hits its owner (the node its claim in processing/ names) or one of
its helpers (a node with a ``taken/<i>.h<pid>.<hex(node)>`` entry in ``.smapd/chunks/<job>/`` whose
chunk has no ``done/<i>.json`` yet); with ``--require-shared kill,stop`` each of those kinds must
hit an owner or helper of a shared job mid-job, and while one of them is still owed and a big file
is in flight no fault is done until its owner or a helper is seen (an unaimed stop, a lease and
more, could span the whole shared job). If one is never hit, the problem line gives each big
file's life: dropped, owner and helpers seen, done, and the faults during it. A fault aimed at a shared job may also be a full
disk or a read-only outbox/ (its checkpoints, offers, helpers' results and publishing fail); those
count as hitting a shared job when one is in flight.

Checks at the end (DESIGN.md §1, testkit.invariants): every dropped name is in exactly one of
inbox/, processing/, archive/, failed/ (inv. 1; at the end: archive/ or failed/); exactly one report
per input (inv. 2); no temp or partial file in outbox/, every output listed by a report exists and
is older than its report (inv. 3); no claim left in processing/ (inv. 4/5); every published report
comes from the last claim of its job that the run saw in processing/ and its original is archived
once, so a stopped node whose claims were taken over published nothing, not even over the new
owner's outputs (inv. 6, from the spool, not the logs); no report with more attempts than
SMAPD_MAX_ATTEMPTS (inv. 7); good files transcribed (success, non-empty .txt) and each of them
published that way; hostile files failed with the expected reason (inv. 9); every published
report has a result for every chunk, indexes 1..n, each chunk ok or a failed chunk marked as a gap
in the outputs, totals that count what the chunks say (inv. 10); every big file published once,
success, every chunk ok; ``.smapd/chunks/`` empty at the end (no checkpoint left behind for a
finished job) and no checkpoint in outbox/. Exit status 0 only if all hold and the required fault
kinds hit their targets.

The last line is the summary::

    files 300 · transcribed 288 · failed-as-expected 12 · lost 0 · duplicated 0 · orphaned claims 0 ·
    faults 30 · max recovery 22 s · throughput 0.78 files/s · chunks redone 4 · resumed jobs 3

(one line; ``chunks redone``: the sum of ``totals.chunks_redone`` over the published reports,
``resumed jobs``: the published reports with ``totals.chunks_resumed`` > 0). The line before it
says how the big files went: chunks helped, resumed and redone, and the faults that hit an owner
or a helper of a shared job mid-job.

The speech comes from ``--speech DIR``, else $TESTKIT_SPEECH_DIR, else shared/data/speech next to
the checkout (or a folder above it), else tests/data.

Needs root for the tmpfs and the bind mount; without it the spool is a plain temp directory and
the ``full`` and ``ro`` faults are skipped (a note says so).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import testkit as tk
from smapd.spool.chunks import HELPER, parse_taken
from testkit import Node, Seen, SpoolView

GOOD_FORMATS = ("wav", "wav44st", "flac", "ogg", "opus", "mp3", "m4a", "flac-as-wav")


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class Drop:
    name: str
    kind: str  # good format or hostile kind
    good: bool
    fragment: str = ""  # what the failed report's error must contain (hostile)
    piece: int = -1  # which cut piece of speech (good files)
    big: bool = False  # a recording of a few minutes: its chunks are shared (issue 10)
    dropped_at: float = 0.0
    done_at: float | None = None
    # big: when the monitor first and last saw a node own or help its job, and which nodes
    roles_seen: tuple[float, float] | None = None
    role_nodes: set[str] = field(default_factory=set)


def make_pieces(rng: random.Random, work: Path, count: int, d: Path) -> list[Path]:
    """``count`` 16 kHz mono WAV pieces of 2-5 s cut from the speech part of the English clips in ``d``."""
    clips = [p for p, _ in tk.manifest_clips("en", d) if p.exists()]
    pcms = []
    for p in clips:
        pcm = tk.decode_pcm16(p)
        a, b = tk.speech_bounds(pcm)
        if b - a >= 2 * tk.RATE:
            pcms.append(pcm[a:b])
    pieces = []
    for i in range(count):
        for _ in range(100):  # a piece that is mostly speech: a good file must have words to find
            pcm = rng.choice(pcms)
            dur = min(len(pcm), int(rng.uniform(2.0, 5.0) * tk.RATE))
            start = rng.randrange(0, len(pcm) - dur + 1)
            if voiced_fraction(pcm[start : start + dur]) >= 0.6:
                break
        pad = np.zeros(int(0.2 * tk.RATE), dtype=np.int16)
        pieces.append(
            tk.write_pcm16_wav(
                work / f"piece{i:03d}.wav", np.concatenate([pad, pcm[start : start + dur], pad])
            )
        )
    return pieces


def make_big(rng: random.Random, work: Path, k: int, d: Path) -> Path:
    """Big file ``k``: a recording of 200-230 s (at least SMAPD_SHARE_MIN_CHUNKS=6 chunks of 30 s, so
    it is shared) joined from a random half of the short English clips in ``d``, in an order and with
    pauses of its own seed; FLAC or WAV."""
    short = {r["file"] for r in tk.read_manifest(d / "manifest.tsv") if float(r["seconds"] or 0) <= 20}
    clips = [(p, t) for p, t in tk.manifest_clips("en", d) if p.exists() and p.name in short]
    chosen = rng.sample(clips, max(1, len(clips) // 2))
    wav = work / f"big{k}.wav"
    tk.make_longform(chosen, wav, seed=rng.randrange(10**6), target_seconds=rng.uniform(200, 230))
    return wav if k % 2 else tk.encode_audio(wav, work / f"big{k}.flac", "flac")


def voiced_fraction(pcm: np.ndarray, window: float = 0.05) -> float:
    """Fraction of 50 ms windows whose RMS is above a tenth of the loudest window's."""
    w = int(window * tk.RATE)
    n = len(pcm) // w
    if n == 0:
        return 0.0
    rms = np.sqrt(np.mean(pcm[: n * w].astype(np.float64).reshape(n, w) ** 2, axis=1))
    return float(np.mean(rms > 0.1 * rms.max())) if rms.max() > 0 else 0.0


def render_good(piece: Path, fmt: str, dst_dir: Path, stem: str) -> Path:
    """``piece`` as format ``fmt``; returns the file (its name carries the suffix to drop it under)."""
    if fmt == "wav":
        dst = dst_dir / f"{stem}.wav"
        shutil.copyfile(piece, dst)
    elif fmt == "wav44st":
        dst = tk.write_speech_variant(piece, dst_dir / f"{stem}.wav", rate=44100, channels=2)
    elif fmt == "flac":
        dst = tk.encode_audio(piece, dst_dir / f"{stem}.flac", "flac")
    elif fmt == "ogg":
        # PyAV's native vorbis encoder is "experimental" and refuses to open; Opus in Ogg it is
        dst = tk.encode_audio(
            piece, dst_dir / f"{stem}.ogg", "libopus", rate=16000, container_format="ogg"
        )
    elif fmt == "opus":
        dst = tk.encode_audio(
            piece, dst_dir / f"{stem}.opus", "libopus", rate=48000, layout="stereo", container_format="ogg"
        )
    elif fmt == "mp3":
        dst = tk.encode_audio(piece, dst_dir / f"{stem}.mp3", "libmp3lame", rate=22050)
    elif fmt == "m4a":
        dst = tk.encode_audio(piece, dst_dir / f"{stem}.m4a", "aac", container_format="mp4")
    elif fmt == "flac-as-wav":  # a lying extension
        tmp = tk.encode_audio(piece, dst_dir / f"{stem}.tmp.flac", "flac")
        dst = tmp.rename(dst_dir / f"{stem}.wav")
    else:
        raise ValueError(fmt)
    return dst


HOSTILE = {  # kind -> (suffix, expected fragment of the failed report's error)
    "empty": (".wav", "empty (0 bytes)"),
    "random": (".wav", "not a readable audio or video file"),
    "text": (".mp3", "not a readable audio or video file"),
    "video": (".mp4", "no audio track"),
    "header-only": (".wav", "no audio"),
    "truncated-flac": (".flac", ""),
    "dangling-symlink": (".wav", "symbolic link"),
    "fifo": (".wav", "FIFO"),
    "directory": ("", "directory"),
}


def make_hostile(kind: str, dst: Path, piece: Path, seed: int) -> None:
    """Create the hostile entry ``dst`` (for non-regular kinds: directly, they cannot be copied)."""
    if kind == "empty":
        tk.write_empty(dst)
    elif kind == "random":
        tk.write_random_bytes(dst, 32 * 1024, seed=seed)
    elif kind == "text":
        tk.write_text_as(dst)
    elif kind == "video":
        tk.write_video_without_audio(dst, seconds=1.0)
    elif kind == "header-only":
        tk.write_truncated_copy(piece, dst, keep=44)
    elif kind == "truncated-flac":
        flac = tk.encode_audio(piece, dst.with_name(dst.name + ".src.flac"), "flac")
        tk.write_truncated_copy(flac, dst, keep=30)
        flac.unlink()
    elif kind == "dangling-symlink":
        os.symlink(f"/nonexistent/chaos-{seed}.wav", dst)
    elif kind == "fifo":
        os.mkfifo(dst)
    elif kind == "directory":
        dst.mkdir()
        (dst / "inside.wav").write_bytes(b"")
    else:
        raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    node: str | None
    started: float
    ended: float = 0.0
    inflight: tuple[str, ...] = ()
    held: tuple[str, ...] = ()  # kill/stop: the claims its node held the moment the signal went
    recovered_at: float | None = None
    # kill/stop: what its node was to the shared (big) jobs in flight the moment the signal went,
    # ("owner", name) or ("helper", name); full/ro: ("during", name) for each big job in flight
    shared: tuple[tuple[str, str], ...] = ()


@dataclass
class Run:
    args: argparse.Namespace
    rng: random.Random
    root: Path
    spool: Path
    mounted: bool
    nodes: list[Node] = field(default_factory=list)
    drops: dict[str, Drop] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    feeding_done: threading.Event = field(default_factory=threading.Event)
    stop_all: threading.Event = field(default_factory=threading.Event)
    notes: list[str] = field(default_factory=list)
    ro_mounted: bool = False
    faulting: threading.Event = field(default_factory=threading.Event)  # a fault is being done
    aim: threading.Event = field(default_factory=threading.Event)  # a big job no fault has aimed at began
    aimed: set[str] = field(default_factory=set)  # the big files a fault was aimed at
    fill: Path | None = None
    errors: list[str] = field(default_factory=list)

    seen: dict[str, Seen] = field(default_factory=dict)  # job id -> its latest claim seen in processing/

    @property
    def sp(self) -> SpoolView:
        return SpoolView(self.spool, self.nodes)

    def shared_roles(self) -> dict[str, list[tuple[str, str]]]:
        """Node name -> what it is to each big job in flight now: ``("owner", name)`` (its claim in
        processing/ names the node, and the job's checkpoint folder exists: the job has begun) or
        ``("helper", name)`` (a ``taken/<i>.h<pid>.<hex(node)>`` entry of that node's current life
        whose chunk has no ``done/<i>.json`` yet)."""
        roles: dict[str, list[tuple[str, str]]] = {}
        pids = {n.name: n.pid for n in self.nodes if n.alive()}
        chunks = self.spool / ".smapd" / "chunks"
        for c in self.sp.claim_names():
            d = self.drops.get(c.original)
            if d is None or not d.big or c.node is None:
                continue
            board = chunks / c.job
            if (board / "job.json").exists():
                roles.setdefault(c.node, []).append(("owner", c.original))
            with contextlib.suppress(OSError):
                for entry in os.listdir(board / "taken"):
                    t = parse_taken(board / "taken" / entry)  # the spool's own parser: one format
                    if t is None or t.kind != HELPER or (board / "done" / f"{t.index}.json").exists():
                        continue
                    if pids.get(t.node) == t.n and fresh(t.path, self.args.lease) \
                            and ("helper", c.original) not in roles.get(t.node, []):
                        roles.setdefault(t.node, []).append(("helper", c.original))
        return roles

    def note_claims(self) -> None:
        """Record each job's latest claim in processing/ (what inv. 6 is judged against at the end)."""
        now = time.time()
        for c in self.sp.claim_names():
            last = self.seen.get(c.job)
            if c.attempt is not None and c.node is not None and (last is None or c.attempt > last.attempt):
                self.seen[c.job] = Seen(c.attempt, c.node, now)


def fresh(path: Path, lease: float) -> bool:
    """Whether a helper's ``taken/`` entry is within its lease: one it left behind when it could not
    write the chunk's checkpoint (a full disk) is stale, and the owner makes that chunk once it is."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return time.time() - max(st.st_mtime, st.st_ctime) <= lease


def feed(run: Run, pieces: list[Path], bigs: list[Path], stage: Path) -> None:
    """Drop the inputs in random bursts, keeping a backlog so faults hit files in flight."""
    try:
        _feed(run, pieces, bigs, stage)
    except Exception as e:
        run.errors.append(f"feeder crashed: {e!r}")
        raise
    finally:
        run.feeding_done.set()


def _feed(run: Run, pieces: list[Path], bigs: list[Path], stage: Path) -> None:
    rng = random.Random(run.rng.random())
    n = run.args.files
    n_hostile = max(len(HOSTILE), round(n * run.args.hostile)) if n >= 20 else min(len(HOSTILE), n // 4)
    kinds = [("hostile", k) for k in (list(HOSTILE) * n)[:n_hostile]]
    kinds += [("good", GOOD_FORMATS[i % len(GOOD_FORMATS)]) for i in range(n - len(kinds) - len(bigs))]
    rng.shuffle(kinds)
    for k in range(len(bigs)):  # spread out over the first four fifths (the last one waits for faults)
        kinds.insert(round((k + 1) * 0.8 * n / (len(bigs) + 1)), ("big", str(k)))
    inbox = run.spool / "inbox"
    for i, (what, kind) in enumerate(kinds):
        if run.stop_all.is_set():
            break
        while not run.stop_all.is_set():  # keep a backlog of about 3 files per node, no more
            backlog = len(os.listdir(inbox)) + len(run.sp.claims_of())
            if backlog < 3 * len(run.nodes):
                break
            time.sleep(0.2)
        if i >= 0.8 * n:  # the last fifth waits for the faults still owed, so that files remain to harm
            until = time.monotonic() + 3 * run.args.gap_max
            while not run.stop_all.is_set() and time.monotonic() < until and faults_owed(run):
                time.sleep(0.2)
        stem = f"c{i:04d}-{kind}"
        piece_no = rng.randrange(len(pieces))
        piece = pieces[piece_no]
        if what == "big":
            until = time.monotonic() + 30  # drop it between faults, so that the next one can aim at it
            while run.faulting.is_set() and time.monotonic() < until and not run.stop_all.is_set():
                time.sleep(0.2)
            src = bigs[int(kind)]
            d = Drop(f"c{i:04d}-big{kind}{src.suffix}", "big", True, big=True)
            _retry_enospc(run, lambda src=src, d=d: _drop_file(run, src, d, in_place=False))
            d.dropped_at = time.monotonic()
            run.drops[d.name] = d
            lull(run, d)
            continue
        if what == "hostile":
            suffix, fragment = HOSTILE[kind]
            d = Drop(stem + suffix, kind, False, fragment)
            _retry_enospc(run, lambda d=d, piece=piece, i=i: _drop_hostile(run, d, piece, i))
        else:
            src = render_good(piece, kind, stage, stem)
            d = Drop(src.name, kind, True, piece=piece_no)
            in_place = rng.random() < 0.15
            _retry_enospc(run, lambda src=src, d=d, ip=in_place: _drop_file(run, src, d, in_place=ip))
        d.dropped_at = time.monotonic()
        run.drops[d.name] = d
        time.sleep(rng.expovariate(1.0 / run.args.drop_gap) if rng.random() < 0.7 else 0.0)


def lull(run: Run, d: Drop) -> None:
    """Drop nothing more while the big file ``d`` is in flight (up to ``--lull`` s): a node helps
    other nodes' jobs only when inbox/ has nothing for it, so without a pause no chunk is shared."""
    until = time.monotonic() + run.args.lull
    while not run.stop_all.is_set() and time.monotonic() < until and d.done_at is None:
        time.sleep(0.2)


def _retry_enospc(run: Run, fn) -> None:
    while True:
        try:
            fn()
            return
        except OSError as e:
            if run.stop_all.is_set():
                raise
            log(f"drop failed ({e.strerror}); retrying")  # the spool is full: a fault holds it
            time.sleep(0.5)


def _drop_hostile(run: Run, d: Drop, piece: Path, seed: int) -> None:
    inbox = run.spool / "inbox"
    if d.kind in ("dangling-symlink", "fifo", "directory"):
        tmp = inbox / f".{d.name}.part"  # made under an ignored name, then renamed in: one event
        make_hostile(d.kind, tmp, piece, seed)
        os.rename(tmp, inbox / d.name)
    else:
        tmp = run.root / "stage-h" / d.name
        tmp.parent.mkdir(exist_ok=True)
        make_hostile(d.kind, tmp, piece, seed)
        _drop_file(run, tmp, d, in_place=False)


def _drop_file(run: Run, src: Path, d: Drop, in_place: bool) -> None:
    """Safe drop (copy to an ignored name, rename into inbox/) or, sometimes, a plain in-place write
    in three parts with pauses (the daemon must wait for close-write / the settle time)."""
    inbox = run.spool / "inbox"
    data = src.read_bytes()
    if in_place and data:
        # A write that fails (the spool is full) unlinks the file before closing it: its close-write
        # would tell the daemon that a (half-written) file is ready, and it would take it as a drop.
        fd = os.open(inbox / d.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for k in range(3):
                piece = memoryview(data)[k * len(data) // 3 : (k + 1) * len(data) // 3]
                while piece:
                    piece = piece[os.write(fd, piece):]
                time.sleep(0.3)
        except OSError:
            (inbox / d.name).unlink(missing_ok=True)  # nothing half-written stays behind
            raise
        finally:
            os.close(fd)
        return
    tmp = inbox / f".{d.name}.part"
    try:
        tmp.write_bytes(data)
        os.rename(tmp, inbox / d.name)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def monitor(run: Run) -> None:
    """Stamp each input's finishing time and each fault's recovery time; record the claims seen."""
    while not run.stop_all.is_set():
        run.note_claims()
        roles = run.shared_roles()
        now = time.monotonic()
        for node, rs in roles.items():
            for r, name in rs:
                d = run.drops.get(name)
                if d is not None:
                    d.roles_seen = (d.roles_seen or (now, now))[0], now
                    d.role_nodes.add(f"{r} {node}")
        if any(name not in run.aimed for rs in roles.values() for _, name in rs):
            run.aim.set()  # harm: a shared job began that no fault has aimed at yet
        done = run.sp.finished()
        for name in done:
            d = run.drops.get(name)
            if d is not None and d.done_at is None:
                d.done_at = now
        for f in run.faults:
            if f.recovered_at is None and f.ended and all(n in done for n in f.inflight):
                f.recovered_at = now
        time.sleep(0.25)


def harm(run: Run) -> None:
    """One fault at a time, at random moments, until the feeding is done."""
    rng = random.Random(run.rng.random())
    a = run.args
    kinds = ["kill", "stop", "worker", "full", "ro"]
    weights = [3, 2, 3, 2, 2]
    if not run.mounted:
        run.notes.append("no tmpfs/bind mounts (not root?): the 'full' and 'ro' faults were skipped")
        weights[3] = weights[4] = 0
    time.sleep(rng.uniform(2, 5))
    while not run.stop_all.is_set() and not (
        run.feeding_done.is_set() and not faults_owed(run)
    ):
        if run.feeding_done.is_set() and not run.sp.claims_of() and not os.listdir(run.spool / "inbox"):
            break  # nothing left to harm
        kind = rng.choices(kinds, weights)[0]
        live = [n for n in run.nodes if n.alive() and not n.stopped]
        holders = [n for n in live if run.sp.claims_of(n.name)]
        roles = run.shared_roles()
        # the owners and helpers of the shared jobs in flight (the first fault of each such job is
        # aimed at it); helpers first half the time (their chunks take seconds, the owner's job
        # a minute: without a preference they are rarely hit)
        targets = [n for n in live if n.name in roles]
        fresh = [n for n in targets if any(name not in run.aimed for _, name in roles[n.name])]
        targets = fresh or targets
        helpers = [n for n in targets if any(r == "helper" for r, _ in roles[n.name])]
        if not targets and unmet_shared(run) and any(d.big and d.done_at is None for d in run.drops.values()):
            # a big file is in flight and a kind is owed to a shared job: an unaimed fault now (a stop
            # lasts a lease and more) could span the whole of the job, so keep the harm for it
            run.aim.wait(0.5)
            continue
        aimed = False
        owed = [k for k in unmet_shared(run) + unmet(run) if k in ("kill", "stop")]
        if targets and len(live) >= 2 and (fresh or owed or rng.random() < 0.6):
            # a disk-full or read-only-outbox fault aimed at a shared job hits its checkpoints,
            # offers and helpers' results, or its publishing
            kind = rng.choice(owed) if owed else rng.choices(kinds[:2] + kinds[3:], weights[:2] + weights[3:])[0]
            aimed = True
        elif unmet(run) and holders and len(live) >= 2:
            kind = rng.choice(unmet(run))  # a required kind has not yet hit a node holding claims
        if kind in ("kill", "stop", "worker") and len(live) < 2:
            kind = "full" if run.mounted else "worker"
        node = rng.choice(live) if live else None
        if kind in ("kill", "stop") and aimed:
            node = rng.choice(helpers if helpers and rng.random() < 0.5 else targets)
        elif kind in ("kill", "stop") and holders:
            node = rng.choice(holders)  # harm where it costs: a node in the middle of a job
        if kind == "worker":
            busy = [n for n in live if n.workers()]
            node = rng.choice(busy) if busy else node
        f = Fault(kind, node.name if node and kind in ("kill", "stop", "worker") else None, time.monotonic())
        f.inflight = tuple(run.sp.claims_of(f.node))  # recovery: until all of these are finished
        if kind in ("full", "ro"):
            f.shared = tuple(("during", name) for name in sorted({n for rs in roles.values() for _, n in rs}))
        if aimed:
            run.aimed.update(name for n, rs in roles.items() for _, name in rs
                             if kind in ("full", "ro") or (node is not None and n == node.name))
        run.faults.append(f)
        run.faulting.set()
        try:
            _do_fault(run, f, node, rng)
        except Exception as e:  # noqa: BLE001 - the driver reports, never dies half-way
            run.errors.append(f"fault {kind} failed to apply: {e!r}")
        finally:
            run.faulting.clear()
        f.ended = time.monotonic()
        log(
            f"fault {len(run.faults)}: {kind}{' on ' + f.node if f.node else ''} "
            f"({f.ended - f.started:.1f} s, {len(f.inflight)} file(s) in flight"
            f"{f', {len(f.held)} claim(s) held by the node' if f.kind in ('kill', 'stop') else ''}"
            f"{''.join(f', {r} {n}' if r == 'during' else f', {r} of {n}' for r, n in f.shared)})"
        )
        run.aim.clear()
        if run.aim.wait(rng.uniform(a.gap_min, a.gap_max)):  # a shared job began: harm it mid-job
            time.sleep(rng.uniform(0.5, 2.5))


def faults_owed(run: Run) -> bool:
    """Whether ``--min-faults``, ``--require`` or ``--require-shared`` still asks for faults."""
    return len(run.faults) < run.args.min_faults or bool(unmet(run)) or bool(unmet_shared(run))


def unmet(run: Run) -> list[str]:
    """The ``--require`` kinds that have not yet hit a node holding claims."""
    return [k for k in run.args.require if not any(f.kind == k and f.held for f in run.faults)]


def unmet_shared(run: Run) -> list[str]:
    """The ``--require-shared`` kinds that have not yet hit an owner or helper of a shared job mid-job."""
    return [k for k in run.args.require_shared if not any(f.kind == k and hit_shared(f) for f in run.faults)]


def hit_shared(f: Fault) -> bool:
    """Whether a kill or stop fault hit the owner or a helper of a shared job in the middle of it."""
    return f.kind in ("kill", "stop") and any(r in ("owner", "helper") for r, _ in f.shared)


def _do_fault(run: Run, f: Fault, node: Node | None, rng: random.Random) -> None:
    lease = run.args.lease
    if f.kind in ("kill", "stop") and node is not None:
        f.held = tuple(run.sp.claims_of(node.name))
        f.shared = tuple(run.shared_roles().get(node.name, ()))  # read again: the moment the signal goes
    if f.kind == "kill":
        assert node is not None
        node.kill9()
        time.sleep(rng.uniform(2, 8))
        node.start()
        node.wait_ready(60)
    elif f.kind == "stop":
        assert node is not None
        node.stop()
        time.sleep(lease + rng.uniform(3, 8))
        node.cont()
    elif f.kind == "worker":
        assert node is not None
        pids = node.workers()
        if pids:
            with contextlib.suppress(OSError):
                os.killpg(rng.choice(pids), signal.SIGKILL)
    elif f.kind == "full":
        fill_spool(run)
        time.sleep(rng.uniform(3, 7))
        free_spool(run)
    elif f.kind == "ro":
        outbox_ro(run, True)
        time.sleep(rng.uniform(3, 7))
        outbox_ro(run, False)


def fill_spool(run: Run) -> None:
    run.fill = run.spool / "chaos-fill.bin"
    block = b"\0" * (4 << 20)
    with open(run.fill, "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
    with contextlib.suppress(OSError), open(run.fill, "ab") as f:  # and the last few KB
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def free_spool(run: Run) -> None:
    if run.fill is not None:
        run.fill.unlink(missing_ok=True)
        run.fill = None


def outbox_ro(run: Run, on: bool) -> None:
    out = str(run.spool / "outbox")
    if on and not run.ro_mounted:
        subprocess.run(["mount", "--bind", out, out], check=True)
        run.ro_mounted = True
        subprocess.run(["mount", "-o", "remount,bind,ro", out], check=True)
    elif not on and run.ro_mounted:
        subprocess.run(["umount", out], check=True)
        run.ro_mounted = False


def restore(run: Run) -> None:
    """Undo every fault: wake stopped nodes, restart dead ones, free space, outbox writable."""
    free_spool(run)
    with contextlib.suppress(OSError):
        outbox_ro(run, False)
    for n in run.nodes:
        if n.stopped:
            n.cont()
        if not n.alive():
            n.start()


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def check(run: Run) -> dict:
    """Every DESIGN.md §1 invariant over the final spool (testkit.invariants), and the chaos run's own
    expectations: good files transcribed and published by the last claim of their job, hostile ones
    failed with their reason. Returns the figures and the problems."""
    run.note_claims()
    sp = run.sp
    found = tk.check_spool(sp, list(run.drops), max_attempts=run.args.max_attempts, seen=run.seen)
    transcribed, published_once, failed_ok, takeovers = 0, 0, 0, 0
    good_failed, hostile_wrong = [], []
    chunks: Counter[str] = Counter()  # over the published reports: chunks redone, helped, resumed; jobs resumed
    big_ok, bigs = 0, []
    for name, d in run.drops.items():
        one = found.report(name)
        if d.big:
            ok, line = big_check(name, one, name in found.published_once)
            big_ok += ok
            bigs.append(line)
        if one is None:
            continue  # lost, or more than one report: check_spool said so
        where, r = one
        takeovers += where == "outbox" and ((r.get("job") or {}).get("attempt") or 0) > 1
        if where == "outbox":
            totals = r.get("totals") or {}
            chunks.update({k: totals.get(f"chunks_{k}") or 0 for k in ("redone", "helped", "resumed")})
            chunks["resumed jobs"] += (totals.get("chunks_resumed") or 0) > 0
        if d.good:
            if where == "outbox" and r["outcome"] == "success" and sp.text(r).strip():
                transcribed += 1
                published_once += name in found.published_once
            else:
                good_failed.append(f"{name} (piece {d.piece}): {where} {r.get('outcome')} {r.get('error')}")
        elif where == "failed" and d.fragment in (r.get("error") or ""):
            failed_ok += 1
        else:
            hostile_wrong.append(f"{name}: {where} {r.get('outcome')} {r.get('error')}")
    for i, line in enumerate(good_failed):  # did the same speech go through in another file?
        piece = int(line.split("(piece ", 1)[1].split(")", 1)[0])
        same = [n for n, d in run.drops.items() if d.good and d.piece == piece and n not in line]
        ok = sum(1 for n in same if n not in " ".join(good_failed))
        good_failed[i] = f"{line} [the same speech in {ok} of {len(same)} other files: transcribed]"
    problems = list(found.problems)
    if published_once != transcribed:
        problems.append(f"published by the last claim of their job: {published_once} of {transcribed} transcribed")
    hit = {k: sum(1 for f in run.faults if f.kind == k and f.held) for k in ("kill", "stop")}
    missing = unmet(run)
    if missing:
        problems.append(f"required faults never hit a node holding claims: {', '.join(missing)}")
    if unmet_shared(run):
        problems.append(f"required faults never hit an owner or helper of a shared job mid-job: "
                        f"{', '.join(unmet_shared(run))} ({'; '.join(big_timeline(run))})")
    problems += [f"big file {line}" for line in bigs if not line.startswith("ok ")]
    shared_hit = Counter(f"{f.kind} {r}" for f in run.faults if hit_shared(f) for r in {r for r, _ in f.shared})
    shared_hit.update(f.kind for f in run.faults if hit_shared(f) or (f.kind in ("full", "ro") and f.shared))
    tracebacks = sum(n.log_text().count("Traceback") for n in run.nodes)
    return {
        "lost": found.lost,
        "orphaned": found.orphaned,
        "unfinished": found.unfinished,
        "duplicated": sorted(found.duplicated),
        "transcribed": transcribed,
        "published_once": published_once,
        "failed_ok": failed_ok,
        "good_failed": good_failed,
        "hostile_wrong": hostile_wrong,
        "problems": problems,
        "takeovers": takeovers,
        "hit": hit,
        "tracebacks": tracebacks,
        "chunks": chunks,
        "bigs": bigs,
        "big_ok": big_ok,
        "shared_hit": shared_hit,
    }


def big_timeline(run: Run) -> list[str]:
    """Each big file's life as the monitor saw it, in seconds from the first drop: dropped, its
    owner and helpers seen (from - to), done; and the faults that overlapped it."""
    t0 = min((d.dropped_at for d in run.drops.values() if d.dropped_at), default=0.0)
    out = []
    for name, d in run.drops.items():
        if not d.big:
            continue
        end = d.done_at if d.done_at is not None else float("inf")
        seen = (f"seen {d.roles_seen[0] - t0:.0f}-{d.roles_seen[1] - t0:.0f} s ({', '.join(sorted(d.role_nodes))})"
                if d.roles_seen else "no owner or helper seen")
        during = [f"{i + 1} {f.kind}" for i, f in enumerate(run.faults)
                  if f.started < end and (f.ended or float("inf")) > d.dropped_at]
        out.append(f"{name}: dropped {d.dropped_at - t0:.0f} s, {seen}, "
                   f"done {'never' if d.done_at is None else f'{d.done_at - t0:.0f} s'}, "
                   f"faults during it: {', '.join(during) or 'none'}")
    return out


def big_check(name: str, one: tuple[str, dict] | None, once: bool) -> tuple[bool, str]:
    """A big file: published once, success, every chunk ok (and of at least two chunks: it was cut).
    Returns whether it holds and a line saying how it went (``ok ...`` when it holds)."""
    if one is None:
        return False, f"{name}: no single report"
    where, r = one
    cs = r.get("chunks") or []
    totals = r.get("totals") or {}
    makers = Counter(
        f"{m.get('node')} " + ("helper" if m.get("helper") else f"a{m.get('attempt')}")
        for c in cs if (m := c.get("made_by") or {})
    )
    how = (f"{name}: {where} {r.get('outcome')}, {(r.get('input') or {}).get('duration')} s, {len(cs)} chunks "
           f"(helped {totals.get('chunks_helped')}, resumed {totals.get('chunks_resumed')}, redone "
           f"{totals.get('chunks_redone')}; made by {', '.join(f'{k} {v}' for k, v in sorted(makers.items()))}), "
           f"attempt {(r.get('job') or {}).get('attempt')}")
    bad = [c.get("index") for c in cs if c.get("status") != "ok"]
    if where != "outbox" or r.get("outcome") != "success" or bad or len(cs) < 2 or not once:
        return False, f"{how}: not published once with every chunk ok (chunks not ok: {bad}, once: {once})"
    return True, f"ok {how}"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seed", type=int, default=None, help="replay a run (default: random, printed)")
    p.add_argument("--files", type=int, default=300, help="inputs to drop (good and hostile)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--minutes", type=float, default=30, help="give up (and fail) after this long")
    p.add_argument(
        "--hostile", type=float, default=0.04, help="fraction of hostile inputs (at least one of each kind)"
    )
    p.add_argument(
        "--min-faults",
        type=int,
        default=0,
        help="keep injecting faults until this many (while files remain; the last fifth of the files waits "
        "up to 3 fault gaps each for them)",
    )
    p.add_argument("--gap-min", type=float, default=3.0, help="seconds between faults, at least")
    p.add_argument("--gap-max", type=float, default=10.0, help="seconds between faults, at most")
    p.add_argument("--drop-gap", type=float, default=0.5, help="mean pause between drops (s)")
    p.add_argument("--lease", type=float, default=9.0, help="SMAPD_LEASE_SECONDS of the nodes")
    p.add_argument("--max-attempts", type=int, default=3, help="SMAPD_MAX_ATTEMPTS of the nodes")
    p.add_argument("--spool-mb", type=int, default=160, help="size of the tmpfs the spool lives on")
    p.add_argument("--beam-size", type=int, default=1, help="SMAPD_BEAM_SIZE (1: fastest)")
    p.add_argument("--model-cache", default=os.environ.get("SMAPD_MODEL_CACHE", ""))
    p.add_argument("--speech", default=None, help="speech clips with a manifest.tsv (default: see above)")
    p.add_argument(
        "--require",
        type=lambda v: [k for k in v.split(",") if k],
        default=[],
        help="fault kinds (kill,stop) that must hit a node holding claims; faults go on until they have",
    )
    p.add_argument(
        "--big",
        type=int,
        default=3,
        help="big files (200-230 s, shared between nodes) among the --files, at spread-out moments (0: none)",
    )
    p.add_argument(
        "--lull",
        type=float,
        default=45.0,
        help="after a big file, drop nothing for up to this long while it is in flight (s): idle nodes help",
    )
    p.add_argument(
        "--require-shared",
        type=lambda v: [k for k in v.split(",") if k],
        default=[],
        help="fault kinds (kill,stop) that must hit the owner or a helper of a shared job in the middle of it",
    )
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, spool copy)")
    return p.parse_args(argv)


def node_env(args: argparse.Namespace) -> dict[str, str]:
    return tk.daemon_env(
        args.model_cache or None,
        SMAPD_CPU_THREADS=1,
        MAX_CONCURRENT_JOBS=1,
        CHUNK_TIMEOUT=30,
        SMAPD_FORMATS="txt,srt",
        SMAPD_BEAM_SIZE=args.beam_size,
        SMAPD_LEASE_SECONDS=args.lease,
        SMAPD_SETTLE_SECONDS=1,
        SMAPD_MAX_ATTEMPTS=args.max_attempts,
        SMAPD_SHUTDOWN_GRACE_SECONDS=15,
        SMAPD_WATCH="auto",
        SMAPD_LOG_LEVEL="INFO",
    )


def keep_spool(spool: Path, dest: Path) -> None:
    """Copy the spool's regular files and directories (not FIFOs, sockets, links) for a post-mortem."""
    for dirpath, dirnames, filenames in os.walk(spool):
        rel = Path(dirpath).relative_to(spool)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            src = Path(dirpath) / name
            if src.is_file() and not src.is_symlink() and name != "chaos-fill.bin":
                with contextlib.suppress(OSError):
                    shutil.copy2(src, dest / rel / name)


def mount_tmpfs(path: Path, mb: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mb}m,mode=0755", "smapd-chaos", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return r.returncode == 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    print(
        f"chaos: seed {seed} (replay: python bench/chaos.py --seed {seed} --files {args.files} "
        f"--nodes {args.nodes} --big {args.big})",
        flush=True,
    )
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="smapd-chaos-"))
    spool = root / "spool"
    spool.mkdir()
    mounted = mount_tmpfs(spool, args.spool_mb)
    if not mounted:
        print(
            f"chaos: note: could not mount a tmpfs (needs root); the spool is a plain directory {spool}, "
            f"and the disk-full and read-only-outbox faults are skipped",
            flush=True,
        )
    run = Run(args, rng, root, spool, mounted)
    threads: list[threading.Thread] = []
    interrupted = []

    def on_signal(signum: int, frame: object) -> None:
        interrupted.append(signum)
        run.stop_all.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stage = root / "stage"
        stage.mkdir()
        pieces = make_pieces(rng, stage, max(8, min(60, args.files // 5)), tk.speech_dir(args.speech))
        bigs = [make_big(rng, stage, k, tk.speech_dir(args.speech)) for k in range(min(args.big, args.files // 4))]
        for sub in ("inbox", "processing", "outbox", "archive", "failed"):
            (spool / sub).mkdir(exist_ok=True)
        env = node_env(args)
        run.nodes = [Node(f"n{i + 1}", spool, root, env) for i in range(args.nodes)]
        for n in run.nodes:
            n.start()
        for n in run.nodes:
            if not n.wait_ready(180):
                print(n.log_text()[-3000:], file=sys.stderr)
                raise SystemExit(f"chaos: node {n.name} did not become ready")
        log(
            f"{args.nodes} nodes ready on {spool} ({'tmpfs ' + str(args.spool_mb) + ' MB' if mounted else 'plain dir'})"
        )
        t0 = time.monotonic()
        deadline = t0 + args.minutes * 60
        threads = [
            threading.Thread(target=fn, args=a, name=fn.__name__, daemon=True)
            for fn, a in ((feed, (run, pieces, bigs, stage)), (monitor, (run,)), (harm, (run,)))
        ]
        for t in threads:
            t.start()
        threads[2].join(timeout=max(0, deadline - time.monotonic()))
        threads[0].join(timeout=max(0, deadline - time.monotonic()))
        restore(run)
        for n in run.nodes:
            n.wait_ready(60)
        log("feeding and faults done; waiting for the spool to drain")
        tk.wait_for(
            lambda: (
                run.stop_all.is_set()
                or (
                    not [x for x in os.listdir(spool / "inbox")]
                    and not run.sp.claims_of()
                    and all(d.done_at is not None for d in run.drops.values())
                )
            ),
            max(0, deadline - time.monotonic()),
            0.5,
        )
        t_end = max([d.done_at for d in run.drops.values() if d.done_at] or [time.monotonic()])
        for n in run.nodes:
            n.terminate()
        run.stop_all.set()
        for t in threads:
            t.join(timeout=10)
        result = check(run)
        failed_run = any(
            result[k]
            for k in (
                "lost",
                "orphaned",
                "unfinished",
                "duplicated",
                "good_failed",
                "hostile_wrong",
                "problems",
            )
        ) or bool(run.errors)
        if mounted and (args.keep or failed_run):  # the tmpfs goes away: keep what explains a failure
            keep_spool(spool, root / "spool-copy")
    finally:
        run.stop_all.set()
        for n in run.nodes:
            with contextlib.suppress(OSError):
                n.cont()
            with contextlib.suppress(OSError):
                n.kill9()
        with contextlib.suppress(OSError):
            free_spool(run)
        with contextlib.suppress(OSError):
            outbox_ro(run, False)
        logs_dir = root
        if mounted:
            subprocess.run(["umount", str(spool)], check=False)
        for s, h in old.items():
            signal.signal(s, h)
    if interrupted:
        print("chaos: interrupted", file=sys.stderr)
        return 130
    # ------- the figures -------
    counts = Counter(f.kind for f in run.faults)
    recoveries = [f.recovered_at - f.started for f in run.faults if f.recovered_at and f.inflight]
    wall = t_end - t0
    n_done = result["transcribed"] + result["failed_ok"]
    for label, items in (
        ("LOST", result["lost"]),
        ("ORPHANED CLAIM", result["orphaned"]),
        ("UNFINISHED (still in inbox/)", result["unfinished"]),
        ("DUPLICATED", result["duplicated"]),
        ("GOOD FILE FAILED", result["good_failed"]),
        ("HOSTILE FILE NOT FAILED AS EXPECTED", result["hostile_wrong"]),
        ("PROBLEM", result["problems"]),
        ("DRIVER ERROR", run.errors),
    ):
        for it in items:
            print(f"chaos: {label}: {it}", flush=True)
    for note in run.notes:
        print(f"chaos: note: {note}")
    print(
        f"chaos: faults {len(run.faults)} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
        f"jobs published by a later attempt: {result['takeovers']}; "
        f"tracebacks in node logs: {result['tracebacks']}; node restarts: "
        f"{sum(n.lives - 1 for n in run.nodes)}; logs in {logs_dir}",
        flush=True,
    )
    print(
        f"chaos: published once, by the last claim of their job (from the spool): {result['published_once']} "
        f"of {result['transcribed']} transcribed; faults that hit a node holding claims: "
        f"kill {result['hit']['kill']}, stop {result['hit']['stop']}",
        flush=True,
    )
    for line in result["bigs"]:
        print(f"chaos: big file {line}", flush=True)
    c, h = result["chunks"], result["shared_hit"]
    print(
        f"chaos: shared jobs: {result['big_ok']} of {len(result['bigs'])} big files published once with every "
        f"chunk ok; chunks helped {c['helped']}, resumed {c['resumed']}, redone {c['redone']}; faults that hit "
        f"an owner or helper of a shared job mid-job: kill {h['kill']} (owner {h['kill owner']}, helper "
        f"{h['kill helper']}), stop {h['stop']} (owner {h['stop owner']}, helper {h['stop helper']}); "
        f"during a shared job: disk full {h['full']}, read-only outbox {h['ro']}",
        flush=True,
    )
    summary = (
        f"files {len(run.drops)} · transcribed {result['transcribed']} · failed-as-expected {result['failed_ok']} · "
        f"lost {len(result['lost'])} · duplicated {len(result['duplicated'])} · "
        f"orphaned claims {len(result['orphaned'])} · faults {len(run.faults)} · "
        f"max recovery {max(recoveries, default=0):.0f} s · throughput {n_done / wall if wall > 0 else 0:.2f} files/s"
        f" · chunks redone {c['redone']} · resumed jobs {c['resumed jobs']}"
    )
    print(summary, flush=True)
    bad = (
        result["lost"]
        or result["orphaned"]
        or result["unfinished"]
        or result["duplicated"]
        or result["good_failed"]
        or result["hostile_wrong"]
        or result["problems"]
        or run.errors
        or len(run.drops) < args.files
    )
    if not bad and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
