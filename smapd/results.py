"""Chunks and chunk results as JSON objects, for the checkpoints in the spool (issue 10).

A round trip gives back an equal ``Chunk`` and ``ChunkResult`` (times are kept as they were: the
plan a takeover reads back cuts at exactly the same samples).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from smapd.models import Chunk, ChunkResult, ChunkStatus, DecodeSignals, Segment, Word


def chunk_to_dict(c: Chunk) -> dict[str, Any]:
    return {"index": c.index, "start": c.start, "end": c.end, "speech": [list(s) for s in c.speech],
            "pieces": [list(p) for p in c.pieces]}


def chunk_from_dict(d: dict[str, Any]) -> Chunk:
    return Chunk(index=int(d["index"]), start=float(d["start"]), end=float(d["end"]),
                 speech=tuple((float(a), float(b)) for a, b in d.get("speech", ())),
                 pieces=tuple((float(a), float(b)) for a, b in d.get("pieces", ())))


def result_to_dict(r: ChunkResult) -> dict[str, Any]:
    return {"chunk": chunk_to_dict(r.chunk), "status": r.status.value, "attempts": r.attempts, "seconds": r.seconds,
            "segments": [{"start": s.start, "end": s.end, "text": s.text,
                          "words": [[w.start, w.end, w.text, w.probability] for w in s.words]} for s in r.segments],
            "error": r.error, "worker": r.worker, "cpu_seconds": r.cpu_seconds,
            "language": list(r.language) if r.language else None,
            "signals": dataclasses.asdict(r.signals) if r.signals else None, "rss_mb": r.rss_mb,
            "made_by": dict(r.made_by) if r.made_by else None, "redone": r.redone}


def result_from_dict(d: dict[str, Any]) -> ChunkResult:
    """A checkpointed result. Raises KeyError/TypeError/ValueError on a malformed one."""
    language = d.get("language")
    return ChunkResult(
        chunk=chunk_from_dict(d["chunk"]), status=ChunkStatus(d["status"]), attempts=int(d["attempts"]),
        seconds=float(d["seconds"]),
        segments=tuple(Segment(float(s["start"]), float(s["end"]), str(s["text"]),
                               tuple(Word(float(a), float(b), str(t), float(p)) for a, b, t, p in s["words"]))
                       for s in d["segments"]),
        error=d.get("error"), worker=d.get("worker"), cpu_seconds=float(d.get("cpu_seconds") or 0.0),
        language=(str(language[0]), float(language[1])) if language else None,
        signals=DecodeSignals(**d["signals"]) if d.get("signals") else None, rss_mb=float(d.get("rss_mb") or 0.0),
        made_by=d.get("made_by"), redone=bool(d.get("redone")))
