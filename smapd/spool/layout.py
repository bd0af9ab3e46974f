"""Where everything is in the spool: one directory per JobState, outbox/, and the files of .smapd/.

- ``.smapd/tmp/``: atomic-write temp files; ``nodes/<node>.json``: node status; ``clock-<node>``:
  the clock probe; ``jobs/<job>.*``: the name sidecar (``name.json``), one record per attempt
  (``a<n>.json``), the lease (``lease``) and the failure report stash (``failed-<x>.json``);
  ``stems/<stem>``: output-stem reservations of jobs in flight (content: the job id).
"""
from __future__ import annotations

import uuid
from pathlib import Path

from smapd.models import JobState
from smapd.spool.names import REPORT_SUFFIX


class Layout:
    """The paths of the spool at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.outbox = self.root / "outbox"
        self.meta = self.root / ".smapd"
        self.tmp, self.nodes, self.jobs, self.stems = (self.meta / d for d in ("tmp", "nodes", "jobs", "stems"))

    def dir(self, state: JobState) -> Path:
        """The directory of a state: inbox/, processing/, archive/ or failed/."""
        return self.root / state.value

    def ensure(self) -> None:
        """Create the directories that are missing."""
        for d in (*(self.dir(s) for s in JobState), self.outbox, self.tmp, self.nodes, self.jobs, self.stems):
            d.mkdir(parents=True, exist_ok=True)

    def clock(self, node: str) -> Path:
        return self.meta / f"clock-{node}"

    def node_status(self, node: str) -> Path:
        return self.nodes / f"{node}.json"

    def job_file(self, job_id: str, what: str) -> Path:
        return self.jobs / f"{job_id}.{what}.json"

    def name_sidecar(self, job_id: str) -> Path:
        return self.job_file(job_id, "name")

    def attempt_record(self, job_id: str, attempt: int) -> Path:
        return self.job_file(job_id, f"a{attempt}")

    def failure_stash(self, job_id: str) -> Path:
        """A fresh stash name: a retried failure never overwrites an earlier stash it might need."""
        return self.job_file(job_id, f"failed-{uuid.uuid4().hex[:6]}")

    def failure_stashes(self, job_id: str) -> list[Path]:
        return sorted(self.jobs.glob(f"{job_id}.failed-*.json"))

    def job_files(self, job_id: str) -> list[Path]:
        return list(self.jobs.glob(f"{job_id}.*"))

    def lease(self, job_id: str) -> Path:
        return self.jobs / f"{job_id}.lease"

    def stem(self, stem: str) -> Path:
        return self.stems / stem

    def output(self, stem: str, suffix: str) -> Path:
        return self.outbox / f"{stem}{suffix}"

    def report_of(self, final: Path) -> Path:
        """The report next to a failed/ entry: ``<name>.report.json``."""
        return final.with_name(f"{final.name}{REPORT_SUFFIX}")
