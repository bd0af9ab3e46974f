"""Node status (.smapd/nodes/), the spool-wide view `smapd status` shows, and pruning."""
from __future__ import annotations

import json
import os
import shutil
import stat
from typing import Any

from smapd.models import JobState
from smapd.spool import fsio, names
from smapd.spool.claims import Claims
from smapd.spool.layout import Layout
from smapd.spool.leases import Clock, lease_stamp

DAY = 86400.0


class Nodes:
    """What the nodes of one spool report about themselves, and the housekeeping any node may do."""

    def __init__(self, layout: Layout, clock: Clock, claims: Claims, node: str) -> None:
        self.layout, self.clock, self.claims, self.node = layout, clock, claims, node

    def write_heartbeat(self, status: dict[str, Any]) -> None:
        """Publish this node's status (jobs in progress, chunk progress, ...) in .smapd/nodes/<node>.json."""
        fsio.atomic_write(self.layout.node_status(self.node),
                          fsio.json_bytes({"node": self.node, "pid": os.getpid(), **status}), self.layout.tmp)

    def read_nodes(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every node's last heartbeat with its ``age`` in seconds by the spool clock."""
        now = self.clock.now_or_local()[0] if now is None else now
        out = []
        for p in sorted(self.layout.nodes.glob("*.json")):
            try:
                data, st = json.loads(p.read_bytes()), p.stat()
            except (OSError, ValueError):
                continue
            out.append({**data, "node": data.get("node", p.stem), "age": round(now - st.st_mtime, 1)})
        return out

    def list_state(self, failures: int = 10) -> dict[str, Any]:
        """What `smapd status` shows, JSON-ready: ``waiting`` files, ``processing`` claims (``age`` is
        the lease age; ``running`` since the attempt began; ``stale``: recoverable by any node now),
        recent ``failures`` newest first, and ``nodes`` with their last heartbeat ``age``. Ages are
        seconds by the spool clock (``clock`` says "local" where the spool is read-only and the probe
        cannot be written)."""
        now, clock = self.clock.now_or_local()
        waiting = []
        for profile, e in self._listing(JobState.INBOX):
            with fsio.quiet():
                if not names.is_ignored(e.name):
                    st = e.stat(follow_symlinks=False)
                    waiting.append({"name": names.display(e.name), "profile": profile, "size": st.st_size,
                                    "age": round(now - st.st_mtime, 1), "sidecar": names.is_sidecar(e.name)})
        claims = []
        for c, st in self.claims.scan():
            stamp = lease_stamp(st, self.layout.lease(c.job_id))
            began = self.claims.attempts(c)[-1].get("at") or stamp
            claims.append({"job_id": c.job_id, "name": names.display(c.original_name), "node": c.node, "pid": c.pid,
                           "attempt": c.attempt, "age": round(now - stamp, 1), "profile": c.profile,
                           "running": round(now - began, 1),
                           "stale": self.claims.leases.expired(stamp, now)})
        recent = []
        failed = self.layout.dir(JobState.FAILED)
        reports = [p for p in failed.glob(f"*{names.REPORT_SUFFIX}")] + \
            [p for p in failed.glob(f"*/*{names.REPORT_SUFFIX}") if p.parent.parent == failed]
        for p in sorted(reports, key=lambda p: p.stat().st_mtime, reverse=True):
            with fsio.quiet():
                r = json.loads(p.read_bytes())
                recent.append({"name": (r.get("input") or {}).get("name"), "report": names.display(p.name),
                               "profile": p.parent.name if p.parent != failed else None,
                               "error": r.get("error"), "age": round(now - p.stat().st_mtime, 1)})
            if len(recent) >= failures:
                break
        return {"spool": str(self.layout.root), "clock": clock, "waiting": sorted(waiting, key=lambda f: -f["age"]),
                "processing": claims, "failures": recent, "nodes": self.read_nodes(now)}

    def prune(self, retention_days: float) -> int:
        """Delete archive/ files older than ``retention_days`` by the spool clock (0 keeps forever); also
        drop temp files and job records that crashes left in .smapd/ for over a day.

        Returns:
            How many archive files were deleted.
        """
        now, removed = self.clock.now(), 0
        live = {c.job_id for c, _ in self.claims.scan()}
        for p in [*self.layout.tmp.iterdir(), *(p for p in self.layout.jobs.iterdir()
                                                 if p.name[:12] not in live and ".sidecar." not in p.name)]:
            with fsio.quiet():
                if now - os.lstat(p).st_mtime > DAY:
                    p.unlink()
        for p in (self.layout.chunks.iterdir() if self.layout.chunks.is_dir() else ()):  # checkpoints of a file handed back and never claimed again
            with fsio.quiet():
                if p.name not in live and now - os.lstat(p / "job.json").st_mtime > DAY:
                    shutil.rmtree(p, ignore_errors=True)
        if retention_days <= 0:
            return 0
        for _, e in self._listing(JobState.ARCHIVE):
            with fsio.quiet():
                st = e.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > retention_days * DAY:
                    os.unlink(e.path)
                    removed += 1
        return removed

    def _listing(self, state: JobState) -> list[tuple[str | None, os.DirEntry[str]]]:
        """The entries of a state dir and of its sub-folders (one level, never through a symlink) with
        their folder as the profile (`smapd status` may run without the profiles file: a sub-folder
        of inbox/ that is no profile's shows its files until a node refuses it)."""
        out: list[tuple[str | None, os.DirEntry[str]]] = []
        with os.scandir(self.layout.dir(state)) as entries:
            for e in entries:
                if not e.is_dir(follow_symlinks=False):
                    out.append((None, e))
                    continue
                with fsio.quiet(), os.scandir(e.path) as inner:
                    out.extend((e.name, i) for i in inner)
        return out
