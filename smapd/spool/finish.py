"""How a job ends (DESIGN §1 inv. 1-3): ``finish`` for every outcome, and the repair of what a crash
left half done.

Success: lease verified -> outputs under the job's stem -> report last -> original to archive/.
Failure: lease verified -> an earlier attempt's unfinished outputs removed -> report stashed in
.smapd/jobs -> original to failed/ -> its report next to it. A crash at any point loses and
duplicates nothing: before the outbox report a later attempt reuses the stem and overwrites; after
it, ``finish_published`` archives without redoing the work; between the failed/ rename and its
report, ``repair`` publishes the stash.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from smapd import report as reports
from smapd.errors import ClaimLost, TransientJobError
from smapd.models import JobState, Outcome
from smapd.report import JobInfo, Report
from smapd.spool import fsio, names
from smapd.spool.claims import Claim, Claims
from smapd.spool.layout import Layout
from smapd.spool.leases import Clock, Leases, claim_stamp


class Finisher:
    """Moves finished inputs to archive/ or failed/ and publishes their outputs and reports."""

    def __init__(self, layout: Layout, clock: Clock, leases: Leases, claims: Claims) -> None:
        self.layout, self.clock, self.leases, self.claims = layout, clock, leases, claims

    def finish(self, claim: Claim, files: Mapping[str, bytes], report: Report) -> Path:
        """End a job: publish ``files`` and ``report`` and archive the original (success, partial),
        or move it to failed/ with the report (``report.outcome`` is failed).

        Returns:
            The original's path in archive/ or failed/.

        Raises:
            ClaimLost: The claim was taken over: before publishing (nothing published) or at the
                final rename (the new owner's outputs stay theirs).
            TransientJobError: Writing failed (disk full, read-only outbox/); nothing was archived.
        """
        self.claims.heartbeat(claim)
        stem = self.claims.stems.reserved(claim.job_id, claim.profile)
        if report.outcome == Outcome.FAILED.value:
            if stem is not None:  # an earlier attempt's unfinished outputs (a crash before its report)
                for s in names.OUTPUT_SUFFIXES:
                    self.layout.output(stem, s, claim.profile).unlink(missing_ok=True)
            dest = self._to_failed(claim.path, claim.original_name, claim.job_id, report, profile=claim.profile)
            if dest is None:
                raise ClaimLost(f"job {claim.job_id} was taken over before it could be failed")
            self.leases.drop(claim.key)
            return dest
        if report.job.output_stem is None:
            raise ValueError(f"job {claim.job_id}: name the outputs with its stem (Spool.output_stem) first")
        if report.job.output_stem != stem:  # the reservation went with the claim: the new owner's now
            self.leases.drop(claim.key)
            raise ClaimLost(f"job {claim.job_id} lost its output stem {report.job.output_stem!r}; publishing nothing")
        outbox = self.layout.outbox_dir(claim.profile)
        try:
            outbox.mkdir(exist_ok=True)
            fsio.publish(outbox, stem, files, report.to_json(), self.layout.tmp)
        except OSError as e:
            raise TransientJobError(f"could not publish {stem} into {outbox}: {e.strerror or e}") from e
        # Published: a node that takes the claim over from here on only archives it (finish_published),
        # so the checkpoints go now, before the archive rename (a crash between them leaves none).
        self._drop_chunks(claim.job_id)
        return self._archive(claim)

    def published_report(self, claim: Claim) -> Path | None:
        """This job's report in outbox/ if it was published (the job is done but not yet archived)."""
        stem = self.claims.stems.reserved(claim.job_id, claim.profile)
        if stem is None:
            return None
        path = self.layout.output(stem, names.REPORT_SUFFIX, claim.profile)
        try:
            job = json.loads(path.read_bytes()).get("job")
        except (OSError, ValueError, AttributeError):
            return None
        return path if isinstance(job, dict) and job.get("id") == claim.job_id else None

    def finish_published(self, claim: Claim) -> Path | None:
        """If this job's report is already in outbox/, just archive the original (returns its path)."""
        return self._archive(claim) if self.published_report(claim) else None

    def give_up(self, claim: Claim, why: str) -> Path | None:
        """A claim that had max_attempts goes to failed/ with a report listing every attempt."""
        error = (f"gave up after {claim.attempt} attempts: each one ended without finishing (the "
                 f"worker or node died or hung); the last one because {why}.")
        report = reports.failure(claim.original_name, self._job(claim, self.claims.attempts(claim)), error)
        dest = self._to_failed(claim.path, claim.original_name, claim.job_id, report, profile=claim.profile)
        self.leases.drop(claim.key)
        return dest

    def refuse(self, src: Path, name: str, job_id: str, reason: str, *, claimed: Claim | None = None,
               profile: str | None = None) -> Path | None:
        """Move an entry that is not a regular file, or an orphan sidecar (``src``: in inbox/[<profile>/],
        or just claimed) to failed/[<profile>/]."""
        job = self._job(claimed, []) if claimed else JobInfo(id=job_id, attempt=0, node=self.leases.node,
                                                             original_name=name, profile=profile)
        return self._to_failed(src, name, job_id, reports.failure(name, job, reason), unique=claimed is None,
                               profile=profile)

    def repair(self) -> int:
        """Write the report of any failed/ entry a crash left without one (from its stash if any).

        Returns:
            How many reports were written.
        """
        now, fixed = self.clock.now(), 0
        for failed, name, present in self._failed_entries():
            if names.is_report(name) and name[: -len(names.REPORT_SUFFIX)] in present:
                continue  # a report, not an input
            if names.is_sidecar(name) and name[: -len(names.sidecar_suffix(name))] in present:
                continue  # the sidecar of an input there: its report is the input's
            path = failed / name
            report = self.layout.report_of(path)
            try:
                # a young entry may be a node's fail() between its two renames: give it a lease
                if report.name in present or not self.leases.expired(claim_stamp(os.lstat(path)), now):
                    continue
            except FileNotFoundError:
                continue
            parsed = names.parse_final(name)
            job_id, original = parsed if parsed else ("", name)
            stash = self.layout.failure_stashes(job_id) if job_id else []
            data = stash[0].read_bytes() if stash else reports.failure(original, JobInfo(
                id=job_id or None, attempt=0, node=self.leases.node, original_name=original),
                "moved to failed/, but its node stopped before writing the report; see its log.").to_json()
            fsio.atomic_write(report, data, self.layout.tmp)
            fixed += 1
        return fixed

    def _failed_entries(self) -> list[tuple[Path, str, set[str]]]:
        """``(folder, name, names in that folder)`` for failed/ and each of its profile folders."""
        out: list[tuple[Path, str, set[str]]] = []
        folders = [self.layout.dir(JobState.FAILED)]
        while folders:
            folder = folders.pop()
            present = set(os.listdir(folder))
            for name in present:
                if folder == self.layout.dir(JobState.FAILED) and names.parse_final(name) is None \
                        and (folder / name).is_dir() and not (folder / name).is_symlink():
                    folders.append(folder / name)  # a profile folder (a refused directory has a <job>. name)
                else:
                    out.append((folder, name, present))
        return out

    def _job(self, claim: Claim, attempts: list[dict[str, object]]) -> JobInfo:
        return JobInfo(id=claim.job_id, attempt=claim.attempt, node=self.leases.node, claimed_as=claim.path.name,
                       original_name=claim.original_name, attempts=tuple(attempts), profile=claim.profile)

    def _archive(self, claim: Claim) -> Path:
        folder = self.layout.dir(JobState.ARCHIVE, claim.profile)
        folder.mkdir(exist_ok=True)
        dest = folder / names.final_name(claim.job_id, claim.original_name)
        if not fsio.rename_verified(claim.path, dest):
            self.leases.drop(claim.key)
            raise ClaimLost(f"job {claim.job_id} was taken over before its original could be archived")
        self.claims.sidecars.settle(claim.job_id, dest)
        self.claims.forget(claim.job_id, claim.profile)
        self._drop_chunks(claim.job_id)
        self.leases.drop(claim.key)
        return dest

    def _drop_chunks(self, job_id: str) -> None:
        """The job's checkpoints go once it is published or failed for good (never to outbox/)."""
        shutil.rmtree(self.layout.chunks / job_id, ignore_errors=True)

    def _to_failed(self, src: Path, name: str, job_id: str, report: Report, unique: bool = False,
                   profile: str | None = None) -> Path | None:
        """Original to failed/[<profile>/]<job>.<name> (its sidecar next to it), then its report. The
        report is stashed in .smapd/jobs first, so if we die between the two renames ``repair``
        publishes it: exactly one report (inv. 2)."""
        folder = self.layout.dir(JobState.FAILED, profile)
        folder.mkdir(exist_ok=True)
        dest = folder / names.final_name(job_id, name)
        data = report.to_json()
        stash = self.layout.failure_stash(job_id)
        fsio.atomic_write(stash, data, self.layout.tmp)
        if not fsio.rename_verified(src, dest, trust_dst=unique):
            stash.unlink(missing_ok=True)
            return None
        self.claims.sidecars.settle(job_id, dest)
        fsio.atomic_write(self.layout.report_of(dest), data, self.layout.tmp)
        self.claims.forget(job_id, profile)
        self._drop_chunks(job_id)
        return dest
