#!/usr/bin/env python3
"""Side-by-side speed, memory and accuracy of `smapd transcribe` and plain faster-whisper calls.

Usage: python bench/bench_transcribe.py [--rounds 2] [--seeds 7,11,23] [--variants ...] [--hour]

Builds long English recordings from ../shared/data/speech with ../shared/tools/make_longform.py
(one per seed: other orders and pauses), then runs every variant on every recording in whole
processes (start-up and model load included), in interleaved rounds (the order rotates each round,
so a busy neighbour on a shared machine hurts every variant alike), and prints per recording the
medians: wall s, the ratio to sequential beam 5 and to batched in the same decode mode, x real
time, CPU s (user+system of the process tree), peak RSS (sum over the tree, sampled every 50 ms),
WER (../shared/tools/wer.py) and srt timing recall (../shared/tools/srt_timing.py).

Variants: smapd (defaults), smapd-b5, smapd-greedy (`smapd transcribe --beam-size 5|1`);
seq-b5, seq-greedy (WhisperModel.transcribe, cpu_threads=2); batched-b5, batched-greedy
(BatchedInferencePipeline, batch_size=8, cpu_threads=2).
--hour also runs smapd and batched once on a 1-hour recording (speed with length).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

from testkit import speech_dir

ROOT = Path(__file__).resolve().parent.parent
SHARED = speech_dir().parents[1]  # ../shared, found by the test kit (shared/data/speech -> shared)

FASTER_WHISPER = """
import sys, os
from faster_whisper import WhisperModel, BatchedInferencePipeline
model, wav, out, mode, beam = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
m = WhisperModel(model, device="cpu", compute_type="int8", cpu_threads=2)
if mode == "batched":
    segs, info = BatchedInferencePipeline(model=m).transcribe(wav, beam_size=beam, batch_size=8)
else:
    segs, info = m.transcribe(wav, beam_size=beam)
def ts(t):
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
segs = list(segs)
open(out + ".txt", "w").write(" ".join(s.text.strip() for s in segs))
open(out + ".srt", "w").write("".join(f"{i}\\n{ts(s.start)} --> {ts(s.end)}\\n{s.text.strip()}\\n\\n"
                                      for i, s in enumerate(segs, 1)))
"""

VARIANTS = {  # name: (kind, beam size or None for smapd's default, decode mode for the ratios)
    "smapd": ("smapd", None, "default"),
    "smapd-b5": ("smapd", 5, "b5"),
    "smapd-greedy": ("smapd", 1, "greedy"),
    "seq-b5": ("sequential", 5, "b5"),
    "seq-greedy": ("sequential", 1, "greedy"),
    "batched-b5": ("batched", 5, "b5"),
    "batched-greedy": ("batched", 1, "greedy"),
}
LABELS = {
    "smapd": "smapd transcribe (defaults)", "smapd-b5": "smapd transcribe --beam-size 5",
    "smapd-greedy": "smapd transcribe --beam-size 1", "seq-b5": "WhisperModel.transcribe, beam 5, 2 threads",
    "seq-greedy": "WhisperModel.transcribe, greedy, 2 threads", "batched-b5": "BatchedInferencePipeline(8), beam 5",
    "batched-greedy": "BatchedInferencePipeline(8), greedy",
}


def tool(name: str) -> ModuleType:
    """One of ../shared/tools, imported from its file (they are scripts, not a package)."""
    sys.path.insert(0, str(SHARED / "tools"))  # srt_timing.py imports wer.py as a sibling
    spec = importlib.util.spec_from_file_location(name, SHARED / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    """Wall, CPU (the whole tree) and peak tree RSS of one command."""
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


def run_variant(name: str, wav: Path, out: Path, model: Path, cache: Path) -> dict:
    kind, beam, _ = VARIANTS[name]
    out.mkdir(parents=True, exist_ok=True)
    if kind == "smapd":
        argv = [sys.executable, "-m", "smapd.cli", "transcribe", str(wav), "-o", str(out), "--progress", "log", "-q"]
        if beam is not None:
            argv += ["--beam-size", str(beam)]
        env = dict(os.environ, SMAPD_MODEL_CACHE=str(cache), PYTHONPATH=str(ROOT))
        m = measure(argv, env)
        report = json.loads((out / f"{wav.stem}.report.json").read_text())
        m["chunks"] = len(report["chunks"])
    else:
        m = measure([sys.executable, "-c", FASTER_WHISPER, str(model), str(wav), str(out / wav.stem), kind,
                     str(beam)])
    wer, timing = tool("wer"), tool("srt_timing")
    m["wer"] = wer.wer(wer.words(wav.with_suffix(".txt").read_text()), wer.words((out / f"{wav.stem}.txt").read_text()))
    m["recall"] = timing.recall(json.loads(wav.with_suffix(".json").read_text()),
                                timing.cues(str(out / f"{wav.stem}.srt")))
    return m


def table(name: str, duration: float, rows: dict[str, list[dict]]) -> None:
    med = {v: {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "rss", "wer", "recall")}
           for v, runs in rows.items()}
    print(f"\n{name}: {duration:.0f} s, {len(next(iter(rows.values())))} rounds (medians)\n")
    print("| variant | wall s | vs sequential b5 | vs batched (same mode) | x real time | CPU s | peak RSS MB "
          "| WER | srt timing recall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, m in med.items():
        seq = med.get("seq-b5")
        mode = VARIANTS[v][2]
        batched = med.get("batched-greedy" if mode == "greedy" else "batched-b5")
        vs_seq = f"{seq['wall'] / m['wall']:.2f}x" if seq else "-"
        vs_b = f"{m['wall'] / batched['wall']:.2f}" if batched and VARIANTS[v][0] != "batched" else "-"
        print(f"| {LABELS[v]} | {m['wall']:.1f} | {vs_seq} | {vs_b} | {duration / m['wall']:.1f} | {m['cpu']:.1f} "
              f"| {m['rss']:.0f} | {m['wer']:.1%} | {m['recall']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", default="7,11,23", help="one long-form per seed (order and pauses)")
    ap.add_argument("--files", default="", help="comma-separated WAVs with make_longform's .txt/.json beside them")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--hour", action="store_true", help="also smapd vs batched on a 1-hour recording")
    ap.add_argument("--work", type=Path, default=None, help="keep recordings and outputs here")
    args = ap.parse_args()

    from smapd.model import ensure_embedded
    from smapd.settings import load_settings

    cache = load_settings().model_cache
    model = ensure_embedded(cache)
    work = args.work or Path(tempfile.mkdtemp(prefix="smapd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = SHARED / "data" / "speech" / "manifest.tsv"
    files = [Path(f) for f in args.files.split(",") if f]
    for seed in ([] if files else args.seeds.split(",")):
        wav = work / f"long-{seed}.wav"
        if not wav.exists():
            subprocess.run([sys.executable, str(SHARED / "tools" / "make_longform.py"), str(manifest), str(wav),
                            "--seed", seed], check=True, stdout=subprocess.DEVNULL)
        files.append(wav)
    if args.hour:
        hour = work / "hour.wav"
        if not hour.exists():
            subprocess.run([sys.executable, str(SHARED / "tools" / "make_longform.py"), str(manifest), str(hour),
                            "--seed", "5", "--repeat", "10"], check=True, stdout=subprocess.DEVNULL)
    variants = args.variants.split(",")
    print(f"{os.cpu_count()} cores, model {model}, load at start: {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[Path, dict[str, list[dict]]] = {f: {v: [] for v in variants} for f in files}
    for r in range(args.rounds):
        for f in files:
            order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: interleaved rounds
            for v in order:
                m = run_variant(v, f, work / f"out-{r}" / f.stem / v, model, cache)
                results[f][v].append(m)
                print(f"  round {r + 1} {f.name} {v}: {m['wall']:.1f} s, WER {m['wer']:.1%}, recall "
                      f"{m['recall']:.3f} (load {os.getloadavg()[0]:.2f})", flush=True)
    for f in files:
        import wave

        with wave.open(str(f)) as w:
            duration = w.getnframes() / w.getframerate()
        table(f.name, duration, results[f])
    if args.hour:
        rows = {v: [run_variant(v, hour, work / "out-hour" / v, model, cache)] for v in ("smapd", "batched-b5")}
        with wave.open(str(hour)) as w:
            table(hour.name, w.getnframes() / w.getframerate(), rows)
    print(f"\nload at end: {os.getloadavg()[0]:.2f} (a shared machine: compare ratios, not seconds)")


if __name__ == "__main__":
    main()
