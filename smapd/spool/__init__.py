"""The on-disk protocol of DESIGN §1, safe with many processes on many machines sharing one (NFS)
spool: one method per verb (scan, claim, heartbeat, recover, finish, release, refuse).

``Spool`` is the facade the daemon, the runner and `smapd status` use; each concept lives in its
own module: ``layout`` (paths), ``names`` (every name, formatted and parsed), ``fsio`` (atomic
write, publish, verified rename), ``intake`` (settling, refusals), ``leases`` (the spool clock,
the expiry rule, the lease table), ``claims`` (claim, recover, release, attempt log), ``stems``
(output stems), ``sidecars`` (per-file options moving with their file), ``finish`` (every way a
job ends) and ``nodes`` (node status, `smapd status`, pruning).

Profiles (issue 11, DESIGN §1 inv. 11): the caller sets ``profiles`` (the configured names); an
entry of ``inbox/<profile>/`` is named ``<profile>/<name>`` in every verb that takes an inbox name,
and its claim, outputs, archive and failure stay in that profile's folders.
"""
from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from smapd.models import JobState
from smapd.report import Report
from smapd.spool import chunks, fsio, names
from smapd.spool.chunks import JobChunks
from smapd.spool.claims import Claim, Claims
from smapd.spool.finish import Finisher
from smapd.spool.fsio import atomic_write
from smapd.spool.intake import Intake, ScanResult, refusal
from smapd.spool.layout import Layout
from smapd.spool.leases import Clock, Leases, pid_alive
from smapd.spool.names import REPORT_SUFFIX
from smapd.spool.nodes import Nodes
from smapd.spool.sidecars import Sidecars
from smapd.spool.stems import Stems

PEER_SECONDS = 30.0  # a node whose heartbeat is older than this is not counted on to help

__all__ = ["REPORT_SUFFIX", "Claim", "ScanResult", "Spool", "atomic_write", "names"]


class Spool:
    """The spool at ``root`` as seen by node ``node`` (this process: one instance per node)."""

    def __init__(self, root: Path, node: str, lease_seconds: float = 120, max_attempts: int = 3,
                 settle_seconds: float = 2.0, alive: Callable[[int], bool] = pid_alive,
                 profiles: tuple[str, ...] = ()) -> None:
        if not names.valid_node(node):
            raise ValueError(f"node name {node!r} must be 1-64 characters without '/', '_' or spaces")
        self.layout = layout = Layout(Path(root))
        self.root, self.node, self.max_attempts = layout.root, node, max_attempts
        self.inbox, self.processing = layout.dir(JobState.INBOX), layout.dir(JobState.PROCESSING)
        self.archive, self.failed = layout.dir(JobState.ARCHIVE), layout.dir(JobState.FAILED)
        self.outbox, self.meta, self.tmp, self.nodes, self.jobs, self.stems = (
            layout.outbox, layout.meta, layout.tmp, layout.nodes, layout.jobs, layout.stems)
        self._clock = Clock(layout.clock(node))
        self._leases = Leases(node, lease_seconds, alive)
        self._stems = Stems(layout)
        self._sidecars = Sidecars(layout)
        self._claims = Claims(layout, self._clock, self._leases, self._stems, self._sidecars)
        self._intake = Intake(self.inbox, settle_seconds, self._clock.now, self._claims.in_flight)
        self._intake.profiles = tuple(profiles)
        self._finish = Finisher(layout, self._clock, self._leases, self._claims)
        self._nodes = Nodes(layout, self._clock, self._claims, node)
        # Two threads of this process taking over one claim would both "win": the takeover name
        # (node, job, attempt, pid) is the same for both, and a rename whose target exists counts
        # as done (a lost NFS reply). One takeover at a time in this process.
        self._recovering = threading.Lock()

    # settings a SIGHUP may change
    @property
    def lease_seconds(self) -> float:
        return self._leases.lease_seconds

    @lease_seconds.setter
    def lease_seconds(self, value: float) -> None:
        self._leases.lease_seconds = value

    @property
    def settle_seconds(self) -> float:
        return self._intake.settle_seconds

    @settle_seconds.setter
    def settle_seconds(self, value: float) -> None:
        self._intake.settle_seconds = value

    @property
    def profiles(self) -> tuple[str, ...]:
        """The profiles whose folders are served (inbox/<profile>/ is a drop folder)."""
        return self._intake.profiles

    @profiles.setter
    def profiles(self, value: tuple[str, ...]) -> None:
        self._intake.profiles = tuple(value)

    def ensure_layout(self) -> None:
        """Create the spool directories that are missing, the profiles' folders included."""
        self.layout.ensure(self.profiles)

    # --- intake ---------------------------------------------------------------------------------------

    def mark_ready(self, name: str) -> None:
        """Treat ``name`` as complete at once (inotify saw close-write or a rename into inbox/)."""
        self._intake.hint(name, True)

    def hint(self, name: str, ready: bool) -> None:
        """A watcher hint: ``ready`` after close-write/moved-to; otherwise the file changed, settle again."""
        self._intake.hint(name, ready)

    def scan(self) -> ScanResult:
        """List inbox/ once and say which names are ready, waiting, refused (see ``intake``)."""
        return self._intake.scan()

    def waiting_count(self) -> int:
        """Files in inbox/ that will be claimed (ready or settling), as of the last ``scan``."""
        return self._intake.waiting_count()

    def oldest_waiting_age(self) -> float:
        """Seconds (spool clock) the oldest file waiting in inbox/ has waited, as of the last ``scan``."""
        oldest = self._intake.oldest_mtime()
        return 0.0 if oldest is None else max(0.0, self._clock.now_or_local()[0] - oldest)

    def refuse(self, name: str, reason: str | None = None) -> Path | None:
        """Move a non-regular inbox entry (the link itself, never its target), a sub-folder that is
        no profile's, or an orphan sidecar to failed/[<profile>/] with a report.

        Args:
            name: The inbox name (``<profile>/<name>`` in a profile folder).
            reason: One sentence for the report; by default what ``scan`` said about it.

        Returns:
            Its path in failed/, or None when it is gone or cannot be moved (one warning per name).
        """
        profile, base = names.split_rel(name)
        try:
            reason = reason or self._intake.reason(name, (self.inbox / name).lstat().st_mode)
            return self._finish.refuse(self.inbox / name, base, names.new_job_id(), reason, profile=profile)
        except OSError as e:
            self._intake.warn_once(name, "cannot move inbox/{} to failed/ ({}); skipping it: {}",
                                   names.display(name), e.strerror or e, reason)
            return None

    # --- claims ---------------------------------------------------------------------------------------

    def claim(self, name: str) -> Claim | None:
        """Claim inbox/<name> with one rename into processing/ (DESIGN §1 inv. 4).

        Returns:
            The claim, or None when another node won the race (normal, silent).
        """
        job = names.new_job_id()
        profile, base = names.split_rel(name)
        c = self._claims.rename_in(self.inbox / name, base, job, 1, profile)
        if c is None:
            return None
        self._intake.forget(name)
        mode = c.path.lstat().st_mode
        if not stat.S_ISREG(mode):  # swapped for a link/FIFO after the scan: refuse it after all
            self._finish.refuse(c.path, base, job, refusal(name, mode), claimed=c, profile=profile)
            return None
        with fsio.quiet():  # the sidecar follows its file at once; the runner retries (``sidecar``)
            self._sidecars.take(job, profile, base)
        started = self._claims.start(c, f"claimed from inbox/{profile + '/' if profile else ''}")
        if started is not None:
            logger.debug("claimed {} as job {}", names.display(name), job)
        return started

    def heartbeat(self, claim: Claim) -> None:
        """Refresh the lease. Raises ClaimLost when another node took the claim over (inv. 6)."""
        self._claims.heartbeat(claim)

    def abandon(self, claim: Claim) -> None:
        """This process stops working on ``claim`` (its job hit a transient error) and stops
        refreshing it: once the lease runs out, any node, this one included, recovers it as the
        next attempt."""
        self._leases.abandon(claim.key)

    def claims(self) -> Iterator[tuple[Claim, os.stat_result]]:
        """Every parseable claim in processing/ with its fresh stat (gone ones are skipped)."""
        return self._claims.scan()

    def parse(self, name: str, profile: str | None = None) -> Claim | None:
        """The claim a processing/[<profile>/] name describes, or None if it is not a claim name."""
        return self._claims.parse(name, profile)

    def sidecar(self, claim: Claim) -> tuple[str, bytes] | None:
        """The claimed file's sidecar as ``(suffix, content)``, or None when it has none. Takes it
        from the inbox folder if it is still there (a node died between the two renames).

        Raises:
            OSError: It cannot be moved or read.
        """
        self._sidecars.take(claim.job_id, claim.profile, claim.original_name)
        return self._sidecars.read(claim.job_id)

    def recoverable(self) -> list[Claim]:
        """Claims this node may take over now: its own dead ones first (no lease wait), then any
        node's whose lease expired by the spool clock (never the local clock, inv. 5)."""
        out = [x.claim for x in self._claims.listing() if x.why is not None]
        return sorted(out, key=lambda c: c.node != self.node)

    def recover(self, claim: Claim) -> Claim | None:
        """Take over a recoverable claim with one rename, as attempt+1 for this node; a claim that
        already had max_attempts goes to failed/ with a report listing every attempt.

        Returns:
            The new claim, or None when another node won, the claim is live again, or it went to failed/.
        """
        with self._recovering:
            return self._recover(claim)

    def _recover(self, claim: Claim) -> Claim | None:
        why = self._claims.rejudge(claim)
        if why is None:
            return None  # gone, or refreshed since it was listed: its owner is alive
        self._leases.drop(claim.key)
        if claim.attempt >= self.max_attempts:
            if self._finish.give_up(claim, why):
                logger.warning("{} moved to failed/ after {} attempts", names.display(claim.original_name),
                               claim.attempt)
            return None
        new = self._claims.rename_in(claim.path, claim.original_name, claim.job_id, claim.attempt + 1, claim.profile)
        if new is None:
            return None
        new = self._claims.start(new, f"took over from {claim.node} (attempt {claim.attempt}) because {why}")
        if new is not None:
            logger.info("recovered {} from {}: attempt {} ({})", names.display(claim.original_name), claim.node,
                        new.attempt, why)
        return new

    def release(self, claim: Claim) -> Path:
        """Hand an unfinished claim back to inbox/ (graceful shutdown); the attempt does not count."""
        return self._claims.release(claim)

    # --- finishing ------------------------------------------------------------------------------------

    def output_stem(self, claim: Claim) -> str:
        """The outbox stem for this job, reserved for it, free of other jobs' outputs (see ``stems``)."""
        return self._stems.take(claim.job_id, claim.original_name, claim.profile)

    def finish(self, claim: Claim, files: Mapping[str, bytes], report: Report) -> Path:
        """End a job, whatever its outcome (see ``finish.Finisher.finish``)."""
        return self._finish.finish(claim, files, report)

    def finish_published(self, claim: Claim) -> Path | None:
        """If this job's report is already in outbox/, just archive the original (returns its path)."""
        return self._finish.finish_published(claim)

    def repair(self) -> int:
        """Write the report of any failed/ entry a crash left without one; returns how many."""
        return self._finish.repair()

    # --- chunk checkpoints and shared chunks (issue 10, DESIGN §1 inv. 10) -------------------------------

    def job_chunks(self, job_id: str) -> JobChunks:
        """The checkpoint folder of job ``job_id`` (see ``chunks``)."""
        return JobChunks(self.layout, self._clock, job_id, self.node, self.lease_seconds)

    def adopt_chunks(self, job_id: str, digest: str, fingerprint: str) -> bool:
        """Give ``job_id`` the checkpoints a graceful stop left of the same bytes and options."""
        return chunks.adopt(self.layout, job_id, digest, fingerprint, {c.job_id for c, _ in self._claims.scan()})

    def chunk_offers(self, skip: set[str]) -> Iterator[tuple[str, int]]:
        """``(job id, chunk)`` of every chunk other nodes offer, jobs in ``skip`` left out."""
        return chunks.offers(self.layout, skip)

    def live_peers(self, within: float = PEER_SECONDS) -> list[str]:
        """Other nodes whose heartbeat is fresh and that are not stopping (they could help)."""
        return [n["node"] for n in self._nodes.read_nodes() if n.get("node") != self.node
                and not n.get("stopping") and n.get("age", within + 1) <= within]

    # --- nodes, status, pruning -------------------------------------------------------------------------

    def write_heartbeat(self, status: dict[str, Any]) -> None:
        """Publish this node's status in .smapd/nodes/<node>.json."""
        self._nodes.write_heartbeat(status)

    def heartbeat_age(self, node: str) -> float | None:
        """Seconds (spool clock) since ``node`` last wrote its heartbeat; None if it never did."""
        try:
            st = os.stat(self.layout.nodes / f"{node}.json")
        except OSError:
            return None
        return self._clock.now_or_local()[0] - st.st_mtime

    def list_state(self, failures: int = 10) -> dict[str, Any]:
        """What `smapd status` shows (see ``nodes.Nodes.list_state``)."""
        return self._nodes.list_state(failures)

    def prune_archive(self, retention_days: float) -> int:
        """Delete archive/ files older than ``retention_days`` (0 keeps forever) and old crash leftovers."""
        return self._nodes.prune(retention_days)

