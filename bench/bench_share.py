#!/usr/bin/env python3
"""Chunk checkpoints and shared chunks (issue 10), measured with real `smapd run` nodes on one spool.

Usage: PYTHONPATH=$PWD .venv/bin/python bench/bench_share.py [--minutes 20] [--rounds 1] [--seed 41]

One long-form of real English speech (``--minutes``, built from ../shared/data/speech with
testkit.make_longform, seed ``--seed``), dropped into a spool whose nodes have loaded their model;
timed from the drop to the report. Every node has one worker with one thread (MAX_PARALLEL_WORKERS=1,
SMAPD_CPU_THREADS=1), so two nodes use this machine's two cores the way two one-core machines would.
Variants, interleaved round by round, each on a fresh spool:

  one-node         one node, checkpoints on (the default)
  one-node-nockpt  one node, SMAPD_CHECKPOINTS=false: the checkpoints' overhead is the ratio of the two
  two-nodes        two nodes: the owner offers its chunks, the other one helps
  kill-owner       two nodes; the owner is killed (SIGKILL, daemon and workers) once 80% of the chunks
                   have checkpoints; the other node makes the chunks on offer as a helper, then takes
                   the claim over when its lease (30 s here, KILL_LEASE) runs out and resumes.
                   Printed: the chunks in flight on the owner at the kill, and the chunks the
                   takeover made (the target: no more than in flight + 1)

Printed per variant: wall seconds, x real time, speed-up over one-node, chunks made by the helper,
chunks resumed and redone, and the bytes the helper read from the spool per second of audio it
made, against the input file's own bytes per audio second. The texts of all variants are compared
with one-node's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import testkit as tk
from smapd.spool.names import parse_claim
from testkit import Node, kill_all, speech_dir

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SMAPD_MODEL_CACHE", Path.home() / ".cache" / "smapd"))
VARIANTS = ("one-node", "one-node-nockpt", "two-nodes", "kill-owner")
KILL_LEASE = 30  # SMAPD_LEASE_SECONDS of kill-owner (the default is 120; the others use 10)


def node_env(**extra: object) -> dict[str, str]:
    settings: dict[str, object] = {"SMAPD_LEASE_SECONDS": 10, **extra}
    return tk.daemon_env(CACHE, MAX_PARALLEL_WORKERS=1, SMAPD_CPU_THREADS=1, SMAPD_LANGUAGE="en",
                         SMAPD_FORMATS="txt,srt", SMAPD_RESCAN_SECONDS=1, SMAPD_SETTLE_SECONDS=0.5, **settings)


def done_chunks(spool: Path) -> list[Path]:
    return list((spool / ".smapd" / "chunks").glob("*/done/*.json"))


def run_variant(variant: str, wav: Path, work: Path) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=work))
    spool = root / "spool"
    spool.mkdir()
    extra: dict[str, object] = {"SMAPD_CHECKPOINTS": "false"} if variant == "one-node-nockpt" else {}
    if variant == "kill-owner":
        extra["SMAPD_LEASE_SECONDS"] = KILL_LEASE  # time for the helper to make what was on offer
    names = ["a"] if variant.startswith("one-node") else ["a", "b"]
    nodes = [Node(n, spool, root, node_env(**extra)) for n in names]
    try:
        for n in nodes:
            n.launch()
        time.sleep(6)  # every node has written a heartbeat: the owner knows it has a peer
        out: dict[str, Any] = {"variant": variant}
        t0 = time.monotonic()
        tmp = spool / "inbox" / ".talk.wav.part"
        shutil.copyfile(wav, tmp)
        os.rename(tmp, spool / "inbox" / "talk.wav")
        report_path = spool / "outbox" / "talk.report.json"
        if variant == "kill-owner":
            total = None
            while total is None:  # the plan tells how many chunks there are
                plans = list((spool / ".smapd" / "chunks").glob("*/plan.json"))
                total = len(json.loads(plans[0].read_text())["chunks"]) if plans else None
                time.sleep(0.2)
            while len(done_chunks(spool)) < 0.8 * total:
                time.sleep(0.1)
            claim = next(p.name for p in (spool / "processing").iterdir())
            parsed = parse_claim(claim)
            owner = next(n for n in nodes if parsed is not None and n.name == parsed.node)
            taken = list((spool / ".smapd" / "chunks").glob("*/taken/*"))
            done = {p.stem for p in done_chunks(spool)}
            suffix = f".{owner.name.encode().hex()}"
            out["in_flight"] = sum(1 for p in taken if p.name.endswith(suffix) and ".a1." in p.name
                                   and p.name.split(".")[0] not in done)
            out["done_at_kill"] = len(done)
            owner.kill9()
        while not report_path.exists():
            time.sleep(0.2)
        out["wall"] = time.monotonic() - t0
        report = json.loads(report_path.read_text())
        out["report"] = report
        out["text"] = (spool / "outbox" / "talk.txt").read_text()
        helped = [json.loads(p.read_text()).get("helped") or {} for p in (spool / ".smapd" / "nodes").glob("*.json")]
        out["help_bytes"] = sum(h.get("bytes_read", 0) for h in helped)
        out["help_audio"] = sum(h.get("audio_seconds", 0.0) for h in helped)
        if variant == "kill-owner":
            out["made_after_takeover"] = sum(1 for c in report["chunks"]
                                             if ((c["made_by"] or {}).get("attempt") or 0) >= 2)
        return out
    finally:
        kill_all(*nodes)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=41)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    work = Path(tempfile.mkdtemp(prefix="bench-share-"))
    try:
        clips = tk.manifest_clips("en", speech_dir())
        wav = work / "talk.wav"
        lf = tk.make_longform(clips, wav, seed=args.seed, repeat=max(1, math.ceil(args.minutes * 60 / 400)),
                              target_seconds=args.minutes * 60)
        print(f"long-form: {lf.duration:.0f} s of English speech (seed {args.seed}), {wav.stat().st_size:,} bytes; "
              f"nodes of 1 worker x 1 thread; lease 10 s ({KILL_LEASE} s in kill-owner)", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                res = run_variant(v, wav, work)
                runs[v].append(res)
                print(f"  round {r + 1} {v}: {res['wall']:.1f} s", flush=True)
        base = statistics.median(x["wall"] for x in runs.get("one-node") or runs[variants[0]])
        ref = (runs.get("one-node") or runs[variants[0]])[0]["text"]
        bps = wav.stat().st_size / lf.duration
        print()
        print("| variant | wall s | x real time | speed-up vs one-node | chunks | helped | resumed | redone | "
              "helper bytes / audio s | same text |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for v in variants:
            xs = runs[v]
            wall = statistics.median(x["wall"] for x in xs)
            t = xs[0]["report"]["totals"]
            audio = sum(x["help_audio"] for x in xs)
            per = f"{sum(x['help_bytes'] for x in xs) / audio:,.0f} (input {bps:,.0f})" if audio else "-"
            print(f"| {v} | {wall:.1f} | {lf.duration / wall:.1f} | {base / wall:.2f}x | {len(xs[0]['report']['chunks'])} | "
                  f"{t['chunks_helped']} | {t['chunks_resumed']} | {t['chunks_redone']} | {per} | "
                  f"{all(x['text'] == ref for x in xs)} |")
        if "one-node" in runs and "one-node-nockpt" in runs:
            on, off = (statistics.median(x["wall"] for x in runs[k]) for k in ("one-node", "one-node-nockpt"))
            print(f"\ncheckpoint overhead on one node: {100 * (on / off - 1):+.1f}% of the wall time")
        for x in runs.get("kill-owner", []):
            print(f"kill-owner: {x['done_at_kill']} of {len(x['report']['chunks'])} chunks done at the kill, "
                  f"{x['in_flight']} in flight on the owner; the takeover made {x['made_after_takeover']} "
                  f"(bound: in flight + 1 = {x['in_flight'] + 1}); attempt {x['report']['job']['attempt']}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
