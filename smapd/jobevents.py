"""What a node's jobs tell the outside: the completion hook (``SMAPD_ON_DONE``) and the metrics file
(``SMAPD_METRICS_FILE``), fed by the daemon at each step of a job's life.

The daemon calls ``claimed`` when a job thread starts, ``finished`` when the runner has put the job
in archive/ or failed/, and, from its scheduler, ``sweep`` (hooks a dead node owed) and
``write_metrics``. Each is a no-op when its setting is empty.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from smapd.hooks import HookEvent, Hooks
from smapd.metrics import Metrics
from smapd.models import JobState
from smapd.report import Report
from smapd.settings import Settings
from smapd.spool import REPORT_SUFFIX, Claim, Spool, names
from smapd.spool.fsio import atomic_write
from smapd.spool.leases import pid_alive


class JobEvents:
    """The hook runner and the metrics of one node."""

    def __init__(self, settings: Settings, spool: Spool) -> None:
        self.spool, self.node, self.lease_seconds = spool, settings.node, settings.lease_seconds
        self.hooks = Hooks(settings.on_done, settings.hook_timeout, spool.root, spool.meta / "hooks",
                           settings.node, lambda path, data: atomic_write(path, data, spool.tmp)) \
            if settings.on_done.strip() else None
        self.metrics_file = Path(settings.metrics_file) if settings.metrics_file else None
        self.metrics = Metrics(settings.node)

    def claimed(self, claim: Claim) -> None:
        """A job thread starts on ``claim``: from now on a hook is owed when it finishes."""
        if self.hooks is not None:
            self.hooks.expect(claim.job_id, claim.original_name, claim.profile)

    def finished(self, claim: Claim, report_path: Path, report: Report) -> None:
        """The runner finished ``claim``: count it, and run the hook."""
        self.metrics.job_finished(report.as_dict())
        if self.hooks is not None:
            self.hooks.fire(HookEvent(job=claim.job_id, outcome=report.outcome, report=str(report_path),
                                      input=claim.original_name, stem=report.job.output_stem or "",
                                      node=self.node))

    def sweep(self) -> int:
        """Run the hooks of jobs that finished on a node that died before (or while) it ran them."""
        if self.hooks is None:
            return 0
        live = {c.job_id for c, _ in self.spool.claims()}
        return self.hooks.sweep(live, self._dead, self._locate)

    def write_metrics(self, jobs: Iterable[Mapping[str, Any]], *, busy: int, total: int, restarts: int,
                      timeouts: int, takeovers: int, helped: int = 0) -> None:
        """Set the gauges from the daemon's state and write the metrics file (atomically)."""
        if self.metrics_file is None:
            return
        hooks_ok = (self.hooks.ran - self.hooks.failed) if self.hooks else 0
        self.metrics.set_state(waiting=self.spool.waiting_count(), oldest_age=self.spool.oldest_waiting_age(),
                               busy=busy, total=total, restarts=restarts, timeouts=timeouts,
                               takeovers=takeovers, hooks_ok=hooks_ok,
                               hooks_failed=self.hooks.failed if self.hooks else 0, jobs=jobs, helped=helped)
        self.metrics.write(self.metrics_file)

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.close()

    # --- for the sweep -------------------------------------------------------------------------------

    def _dead(self, owner: str) -> bool:
        """``owner`` is ``<node>-<pid>`` (node names may hold '-'): that process is gone."""
        node, _, pid = owner.rpartition("-")
        if node == self.node:
            return not pid.isdigit() or int(pid) != os.getpid() and not pid_alive(int(pid))
        age = self.spool.heartbeat_age(node)
        return age is None or age > self.lease_seconds

    def _locate(self, intent: Mapping[str, Any]) -> HookEvent | None:
        """The event of a finished job, from the spool alone; None while it is not finished."""
        job, name, profile = str(intent.get("job")), str(intent.get("input")), intent.get("profile") or None
        final = names.final_name(job, name)
        failed = self.spool.layout.dir(JobState.FAILED, profile) / f"{final}{REPORT_SUFFIX}"
        if failed.exists():
            return self._event(job, name, failed, _read(failed))
        if not (self.spool.layout.dir(JobState.ARCHIVE, profile) / final).exists():
            return None  # not finished (or handed back and claimed again as a new job)
        outbox = self.spool.layout.outbox_dir(profile)
        for report in outbox.glob(f"{_glob_escape(names.stem_base(name))}*{REPORT_SUFFIX}"):  # stem, stem.2, ...
            data = _read(report)
            if (data.get("job") or {}).get("id") == job:
                return self._event(job, name, report, data)
        logger.warning("{}: finished (archived) but its report is not in {}; no hook", name, outbox)
        return None

    def _event(self, job: str, name: str, path: Path, report: Mapping[str, Any]) -> HookEvent:
        j = report.get("job") or {}
        return HookEvent(job=job, outcome=str(report.get("outcome") or "failed"), report=str(path), input=name,
                         stem=j.get("output_stem") or "", node=j.get("node") or self.node)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)
