#!/usr/bin/env python3
"""Side-by-side speed, memory and accuracy of `smapd transcribe` and plain faster-whisper calls.

Usage: python bench/bench_transcribe.py [--repeat 2] [--hour] [--only smapd,sequential,batched]

Builds one long English recording from ../shared/data/speech (or tests/data) with the long-form
tool's logic, then runs, one after the other on the same file and in the same run:
  smapd       `smapd transcribe` (silence-aware chunks on MAX_PARALLEL_WORKERS worker processes)
  sequential  WhisperModel.transcribe(cpu_threads=all cores), what a user would write first
  batched     BatchedInferencePipeline(batch_size=8)
Each variant runs in its own process; wall time, CPU seconds (user+system of the whole process
tree) and peak RSS (sum over the tree, sampled every 50 ms) are measured from outside.
--hour also decodes and chunks a 1-hour recording through smapd and prints its peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import testkit as helpers  # the test kit: installed with smapd (pip install -e .), or PYTHONPATH=.

ROOT = Path(__file__).resolve().parent.parent

SHARED = ROOT.parent / "shared" / "data" / "speech"

SEQUENTIAL = """
import sys, os
from faster_whisper import WhisperModel
m = WhisperModel(sys.argv[1], device="cpu", compute_type="int8", cpu_threads=os.cpu_count())
segs, info = m.transcribe(sys.argv[2], beam_size=5)
open(sys.argv[3], "w").write(" ".join(s.text for s in segs))
"""
BATCHED = """
import sys, os
from faster_whisper import WhisperModel, BatchedInferencePipeline
m = WhisperModel(sys.argv[1], device="cpu", compute_type="int8", cpu_threads=os.cpu_count())
segs, info = BatchedInferencePipeline(model=m).transcribe(sys.argv[2], beam_size=5, batch_size=8)
open(sys.argv[3], "w").write(" ".join(s.text for s in segs))
"""


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):  # children are listed under the thread that forked them
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total / 2**20


def measure(argv: list[str], env: dict[str, str] | None = None) -> dict:
    t0 = time.monotonic()
    before = os.times()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_mb(proc.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed:\n{err[-3000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall": time.monotonic() - t0, "cpu": cpu, "rss": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="use every English clip this many times")
    ap.add_argument("--only", default="smapd,sequential,batched")
    ap.add_argument("--hour", action="store_true", help="also measure peak RSS on a 1-hour recording")
    args = ap.parse_args()

    from smapd.model import ensure_embedded
    from smapd.settings import load_settings

    cache = load_settings().model_cache
    model = ensure_embedded(cache)
    data = SHARED if (SHARED / "manifest.tsv").is_file() else helpers.DATA_DIR
    work = Path(tempfile.mkdtemp(prefix="smapd-bench-"))
    wav = work / "long.wav"
    lf = helpers.make_longform(helpers.manifest_clips("en", data), wav, seed=7, repeat=args.repeat)
    print(f"recording: {lf.duration:.0f} s ({len(lf.spans)} clips from {data}), "
          f"{os.cpu_count()} cores, model {model}")

    rows = []
    for name in args.only.split(","):
        out = work / name
        out.mkdir()
        if name == "smapd":
            m = measure([sys.executable, "-m", "smapd.cli", "transcribe", str(wav), "-o", str(out),
                         "--progress", "log", "-q"], env=dict(os.environ, SMAPD_MODEL_CACHE=str(cache)))
            text = (out / "long.txt").read_text()
            report = json.loads((out / "long.report.json").read_text())
            note = f"{len(report['chunks'])} chunks, {report['engine']['workers']} workers"
        else:
            script = SEQUENTIAL if name == "sequential" else BATCHED
            m = measure([sys.executable, "-c", script, str(model), str(wav), str(out / "long.txt")])
            text = (out / "long.txt").read_text()
            note = "cpu_threads=all" if name == "sequential" else "batch_size=8"
        m.update(name=name, wer=helpers.wer(lf.reference_text, text), note=note)
        rows.append(m)
        print(f"  {name}: {m['wall']:.1f} s", flush=True)

    base = next((r for r in rows if r["name"] == "sequential"), rows[0])
    print()
    print(f"| variant | wall s | speed-up vs sequential | x real time | CPU s | peak RSS MB | WER | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['wall']:.1f} | {base['wall'] / r['wall']:.2f}x | {lf.duration / r['wall']:.1f} | "
              f"{r['cpu']:.1f} | {r['rss']:.0f} | {r['wer']:.1%} | {r['note']} |")

    if args.hour:
        hour = work / "hour.wav"
        reps = max(1, int(3600 / lf.duration) + 1)
        helpers.make_longform(helpers.manifest_clips("en", data), hour, seed=3, repeat=args.repeat * reps)
        code = ("import sys; from pathlib import Path; from smapd import audio; "
                "d = audio.decode(Path(sys.argv[1])); audio.level_speech(d.samples); "
                "c = audio.silence_chunks(d.samples, 30.0); print(d.info.duration, len(c))")
        m = measure([sys.executable, "-c", code, str(hour)])
        print(f"\n1-hour file ({hour.stat().st_size / 2**20:.0f} MB WAV): decode + level + VAD chunking "
              f"peak RSS {m['rss']:.0f} MB in {m['wall']:.1f} s (the int16 buffer alone is 110 MB)")


if __name__ == "__main__":
    main()
