#!/usr/bin/env python3
"""Streams of short files (issue 8, target 2): `smapd run`'s dispatch against a faster-whisper pool.

Usage: PYTHONPATH=$PWD .venv/bin/python bench/bench_stream.py [--rounds 2] [--files 30] [--mixed]

A stream of --files short real-speech files (2-12 s, every language of ../shared/data/speech), all
dropped at once (renamed into inbox/ together) into one `smapd run` that has already loaded its model,
timed from the drop to the last report. Variants, interleaved round by round:
  smapd-auto   `smapd run` with default settings (MAX_CONCURRENT_JOBS=auto)
  smapd-1      `smapd run` with MAX_CONCURRENT_JOBS=1 (the old default)
  fw-pool      faster-whisper over the files with ThreadPoolExecutor(2): one WhisperModel with
               num_workers=2 and cpu_threads=1 (two decodes at once, one core each: the fair
               2-core setup; cpu_threads=2 with two threads would oversubscribe), same beam size
               and language detection as smapd's defaults, model load not timed.
--mixed adds one run of smapd-auto on the same short files with a long-form of --long-repeat x 400 s (built from
the English clips with ../shared/tools/make_longform.py) dropped first: when each short file and the
long one finished, and how busy each engine slot was.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

from testkit import speech_dir

ROOT = Path(__file__).resolve().parent.parent
SPEECH = speech_dir()  # ../shared/data/speech, found by the test kit
SHARED = SPEECH.parents[1]
CACHE = Path(os.environ.get("SMAPD_MODEL_CACHE", ROOT / ".venv" / "smapd-model-cache"))

FW_POOL = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from faster_whisper import WhisperModel
model_dir, beam, files = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
model = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=1, num_workers=2)
def one(path):
    segments, info = model.transcribe(path, beam_size=beam)
    return " ".join(s.text for s in segments)
t0 = time.monotonic()
with ThreadPoolExecutor(2) as ex:
    texts = list(ex.map(one, files))
print(json.dumps({"wall": time.monotonic() - t0, "chars": sum(len(t) for t in texts)}))
"""


def short_files(count: int) -> list[tuple[Path, float]]:
    """``count`` clips of 2-12 s, languages interleaved (deterministic order)."""
    with open(SPEECH / "manifest.tsv", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if 2.0 <= float(r["seconds"]) <= 12.0]
    by_lang: dict[str, list[dict[str, str]]] = {}
    for r in sorted(rows, key=lambda r: r["file"]):
        by_lang.setdefault(r["language"], []).append(r)
    picked: list[tuple[Path, float]] = []
    while len(picked) < count:
        for lang in sorted(by_lang):
            group = by_lang[lang]
            r = group[len(picked) // len(by_lang) % len(group)]
            picked.append((SPEECH / r["file"], float(r["seconds"])))
    return picked[:count]


def cpu_busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


class Smapd:
    """One `smapd run` on its own spool, model loaded before anything is dropped."""

    def __init__(self, work: Path, name: str, **env: str) -> None:
        self.root = work / name / "spool"
        self.stage = work / name / "stage"
        self.stage.mkdir(parents=True)
        self.log = work / name / "daemon.log"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("SMAPD_") and k not in ("MAX_PARALLEL_WORKERS", "MAX_CONCURRENT_JOBS",
                                                                "CHUNK_TIMEOUT", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.env.update(PYTHONPATH=str(ROOT), SMAPD_SPOOL_DIR=str(self.root), SMAPD_NODE=name.replace("_", "-"),
                        SMAPD_MODEL_CACHE=str(CACHE), **env)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "smapd.cli", "run"], env=self.env, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while "ready: watching" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smapd did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def feed(self, files: list[Path]) -> dict[str, Any]:
        """Drop ``files`` at once; wait for every report; per-file finish times from the reports' mtimes."""
        names = []
        for i, src in enumerate(files):
            name = f"{i:03d}-{src.name}"
            shutil.copyfile(src, self.stage / name)
            names.append(name)
        busy0 = cpu_busy()
        t0 = time.time()
        for name in names:
            os.rename(self.stage / name, self.root / "inbox" / name)
        reports: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 1800
        while len(reports) < len(names):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"only {len(reports)}/{len(names)} reports:\n"
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            for where in ("outbox", "failed"):
                for n in os.listdir(self.root / where):
                    if n.endswith(".report.json") and n not in reports:
                        p = self.root / where / n
                        try:
                            reports[n] = {**json.loads(p.read_bytes()), "_done": p.stat().st_mtime - t0}
                        except (OSError, ValueError):
                            pass
            time.sleep(0.05)
        busy1 = cpu_busy()
        wall = max(r["_done"] for r in reports.values())
        per_worker: dict[str, float] = {}
        for r in reports.values():
            for c in r.get("chunks") or []:
                per_worker[c.get("worker") or "?"] = per_worker.get(c.get("worker") or "?", 0.0) + c["seconds"]
        return {"wall": wall, "reports": reports, "per_worker": per_worker,
                "cpu_busy": (busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1]),
                "failed": sum(1 for r in reports.values() if r["outcome"] == "failed")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_smapd(work: Path, name: str, files: list[Path], **env: str) -> dict[str, Any]:
    node = Smapd(work, name, **env)
    try:
        return node.feed(files)
    finally:
        node.stop()


def run_fw(files: list[Path], beam: int) -> dict[str, Any]:
    model = str(CACHE / "whisper-base-ct2")
    busy0 = cpu_busy()
    out = subprocess.run([sys.executable, "-c", FW_POOL, model, str(beam), json.dumps([str(f) for f in files])],
                         capture_output=True, text=True, check=True, timeout=1800)
    busy1 = cpu_busy()
    return {**json.loads(out.stdout.strip().splitlines()[-1]),
            "cpu_busy": (busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1])}


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--files", type=int, default=30)
    ap.add_argument("--mixed", action="store_true", help="also the mixed stream (a 10-minute file among them)")
    ap.add_argument("--long-repeat", type=int, default=2, help="make_longform --repeat for the long file (2: ~13 min)")
    ap.add_argument("--only", default="smapd-auto,smapd-1,fw-pool")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from smapd.settings import Settings

    beam = Settings.model_fields["beam_size"].default
    picked = short_files(args.files)
    files = [p for p, _ in picked]
    audio = sum(s for _, s in picked)
    print(f"{len(files)} files, {audio:.0f} s of audio; beam {beam}; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores", flush=True)
    variants = args.only.split(",")
    walls: dict[str, list[float]] = {v: [] for v in variants}
    busy: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        work = Path(tmp)
        for rnd in range(args.rounds):
            for v in variants if rnd % 2 == 0 else variants[::-1]:  # interleaved, order alternating
                if v == "smapd-auto":
                    r = run_smapd(work, f"auto{rnd}", files)
                elif v == "smapd-1":
                    r = run_smapd(work, f"one{rnd}", files, MAX_CONCURRENT_JOBS="1")
                else:
                    r = run_fw(files, beam)
                walls[v].append(r["wall"])
                busy[v].append(r["cpu_busy"])
                extra = f", {r['failed']} failed" if r.get("failed") else ""
                if "chars" in r:
                    extra += f", {r['chars']} characters of text"
                if r.get("per_worker"):
                    extra += ", slots busy " + " ".join(f"{w} {t / r['wall']:.0%}" for w, t in sorted(r["per_worker"].items()))
                print(f"  round {rnd + 1} {v}: {r['wall']:.1f} s (machine CPU busy {r['cpu_busy']:.0%}{extra})",
                      flush=True)
        base = median(walls["fw-pool"]) if walls.get("fw-pool") else None
        print("\n| variant | wall s (median) | audio s per wall s | vs fw-pool | machine CPU busy |")
        print("|---|---|---|---|---|")
        for v in variants:
            w = median(walls[v])
            ratio = f"{base / w:.2f}x" if base else "-"
            print(f"| {v} | {w:.1f} | {audio / w:.1f} | {ratio} | {median(busy[v]):.0%} |")
        if args.mixed:
            mixed(work, picked, args.long_repeat)


def mixed(work: Path, picked: list[tuple[Path, float]], repeat: int) -> None:
    long_path = work / "longform.wav"
    subprocess.run([sys.executable, str(SHARED / "tools" / "make_longform.py"), "--language", "en",
                    "--repeat", str(repeat), "--seed", "11", str(SPEECH / "manifest.tsv"), str(long_path)],
                   check=True, capture_output=True, timeout=600)
    with wave.open(str(long_path)) as w:
        long_seconds = w.getnframes() / w.getframerate()
    files = [long_path] + [p for p, _ in picked]  # the long one first: the short ones must not wait for it
    r = run_smapd(work, "mixed", files)
    done = {rep["input"]["name"]: rep["_done"] for rep in r["reports"].values()}
    long_done = done.pop("000-longform.wav")
    shorts = sorted(done.values())
    before = sum(1 for t in shorts if t < long_done)
    audio = long_seconds + sum(s for _, s in picked)
    print(f"\nmixed stream: one {long_seconds:.0f} s long-form dropped first, then {len(shorts)} short files "
          f"({audio:.0f} s of audio in all), smapd run with default settings")
    print(f"  wall {r['wall']:.1f} s, {audio / r['wall']:.1f} audio s per wall s, machine CPU busy {r['cpu_busy']:.0%}")
    print(f"  long-form done at {long_done:.1f} s; short files done at median {median(shorts):.1f} s, "
          f"last {shorts[-1]:.1f} s; {before}/{len(shorts)} finished before the long-form")
    for w, s in sorted(r["per_worker"].items()):
        print(f"  slot {w}: busy {s:.1f} s of {r['wall']:.1f} s ({s / r['wall']:.0%})")


if __name__ == "__main__":
    main()
