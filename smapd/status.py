"""``smapd status``: what the spool holds and what every node is doing, from any machine.

Reads only the spool (inbox/, processing/, failed/ reports and .smapd/nodes/ heartbeats), so it
works wherever the spool is mounted, with or without a daemon on this machine.
"""
from __future__ import annotations

import json
from typing import Any


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def clock(seconds: float) -> str:
    """Audio time as ``12:40`` or ``1:02:05``."""
    t = int(max(0.0, seconds))
    return f"{t // 3600}:{t // 60 % 60:02d}:{t % 60:02d}" if t >= 3600 else f"{t // 60}:{t % 60:02d}"


def progress_text(job: dict[str, Any]) -> str:
    """A job's progress from its heartbeat entry: ``12:40 / 38:15 (chunk 14/60, ETA 3:10)``, with a
    STALLED flag once nothing moved for CHUNK_TIMEOUT."""
    chunks = f"chunk {job.get('chunks_done', 0)}/{job.get('chunks_total', 0)}"
    if job.get("audio_total"):
        eta = job.get("eta")
        text = f"{clock(job.get('audio_done') or 0)} / {clock(job['audio_total'])} ({chunks}" + \
            (f", ETA {clock(eta)})" if eta is not None else ")")
    else:
        text = chunks
    return text + ("  STALLED (no progress for longer than CHUNK_TIMEOUT)" if job.get("stalled") else "")


def _where(entry: dict[str, Any]) -> str:
    """A file's name with its profile (issue 11): ``talk.mp3 [profile meetings]``."""
    return f"{entry.get('name')} [profile {entry['profile']}]" if entry.get("profile") else str(entry.get("name"))


def render_text(state: dict[str, Any]) -> str:
    """A few aligned sections a tired operator can read at a glance."""
    lines = [f"spool {state['spool']}"]
    waiting = [w for w in state.get("waiting", []) if not w.get("sidecar")]
    lines.append(f"waiting: {len(waiting)}" + (": " + ", ".join(_where(w) for w in waiting[:10]) if waiting else "")
                 + (" ..." if len(waiting) > 10 else ""))
    progress = {j["job_id"]: j for n in state.get("nodes", []) for j in n.get("jobs", [])}
    claims = state.get("processing", [])
    lines.append(f"in progress: {len(claims)}")
    for c in claims:
        p = progress.get(c["job_id"], {})
        chunks = progress_text(p) if p else "no progress reported"
        stale = "  STALE (lease expired)" if c.get("stale") else ""
        lines.append(f"  {_where(c)}  node {c['node']}  attempt {c['attempt']}  {chunks}  "
                     f"lease age {_age(c.get('age'))}{stale}")
        helpers = sorted((str(n.get("node")), h["chunk"]) for n in state.get("nodes", [])
                         for h in n.get("helping", []) if h.get("job_id") == c["job_id"])
        if helpers:  # issue 10: other nodes making this job's chunks
            lines.append("    chunks made by other nodes now: " + ", ".join(f"{n} (chunk {i})" for n, i in helpers))
    failures = state.get("failures", [])
    lines.append(f"recent failures: {len(failures)}")
    for f in failures[:10]:
        lines.append(f"  {_where(f)}: {f.get('error') or 'see its report'}")
    nodes = state.get("nodes", [])
    lines.append(f"nodes: {len(nodes)}")
    for n in nodes:
        jobs = len(n.get("jobs", []))
        tag = "  (stopping)" if n.get("stopping") else ""
        helping = n.get("helping", [])
        helps = "  helping " + ", ".join(f"{h.get('owner')} with chunk {h.get('chunk')} of {h.get('name')}"
                                         for h in helping) if helping else ""
        lines.append(f"  {n.get('node')}  last heartbeat {_age(n.get('age'))} ago  {jobs} job(s)  "
                     f"{n.get('completed', 0)} done  {n.get('failed', 0)} failed{tag}{helps}")
    return "\n".join(lines)


def render_json(state: dict[str, Any]) -> str:
    return json.dumps(state, indent=2, default=str)
