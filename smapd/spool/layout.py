"""Where everything is in the spool: one directory per JobState, outbox/, and the files of .smapd/.

- ``.smapd/tmp/``: atomic-write temp files; ``nodes/<node>.json``: node status; ``clock-<node>``:
  the clock probe; ``jobs/<job>.*``: the name sidecar (``name.json``), one record per attempt
  (``a<n>.json``), the lease (``lease``) and the failure report stash (``failed-<x>.json``);
  ``stems/<stem>``: output-stem reservations of jobs in flight (content: the job id);
  ``jobs/<job>.sidecar<suffix>``: a claimed file's sidecar (its per-file options, issue 11);
  ``chunks/<job>/``: the job's chunk checkpoints and shared chunks (issue 10, ``spool.chunks``).
- Profiles (DESIGN §1 inv. 11): each state dir and outbox/ mirror a profile as ``<dir>/<profile>/``,
  and stems are reserved per outbox folder (``stems/<profile>/<stem>``); ``.smapd/`` is shared
  (job ids are unique across profiles). Mirroring keeps every name and rule of §1 unchanged inside
  a profile folder: a claim, a takeover, a release or a finish is still one rename within the same
  filesystem, and ``talk.mp3`` dropped in two profiles gets ``outbox/a/talk.*`` and ``outbox/b/talk.*``.
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
        self.tmp, self.nodes, self.jobs, self.stems, self.chunks = (
            self.meta / d for d in ("tmp", "nodes", "jobs", "stems", "chunks"))

    def dir(self, state: JobState, profile: str | None = None) -> Path:
        """The directory of a state: inbox/, processing/, archive/ or failed/ (or its profile folder)."""
        d = self.root / state.value
        return d / profile if profile else d

    def outbox_dir(self, profile: str | None = None) -> Path:
        """outbox/ or outbox/<profile>/."""
        return self.outbox / profile if profile else self.outbox

    def ensure(self, profiles: tuple[str, ...] = ()) -> None:
        """Create the directories that are missing (and every profile's folders)."""
        for d in (*(self.dir(s) for s in JobState), self.outbox, self.tmp, self.nodes, self.jobs, self.stems,
                  self.chunks):
            d.mkdir(parents=True, exist_ok=True)
        for p in profiles:
            for d in (*(self.dir(s, p) for s in JobState), self.outbox_dir(p), self.stems / p):
                d.mkdir(exist_ok=True)

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
        """The job's records (never its sidecar: that is the user's, and moves with the file)."""
        return [p for p in self.jobs.glob(f"{job_id}.*") if ".sidecar." not in p.name]

    def lease(self, job_id: str) -> Path:
        return self.jobs / f"{job_id}.lease"

    def sidecar(self, job_id: str, suffix: str) -> Path:
        """Where a claimed file's sidecar waits while its job runs (suffix: ``.smapd.json``/``.toml``)."""
        return self.jobs / f"{job_id}.sidecar{suffix}"

    def stem_dir(self, profile: str | None = None) -> Path:
        return self.stems / profile if profile else self.stems

    def stem(self, stem: str, profile: str | None = None) -> Path:
        return self.stem_dir(profile) / stem

    def output(self, stem: str, suffix: str, profile: str | None = None) -> Path:
        return self.outbox_dir(profile) / f"{stem}{suffix}"

    def report_of(self, final: Path) -> Path:
        """The report next to a failed/ entry: ``<name>.report.json``."""
        return final.with_name(f"{final.name}{REPORT_SUFFIX}")
