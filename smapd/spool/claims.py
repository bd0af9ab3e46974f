"""Claims (DESIGN §1 inv. 4-7): the claim rename, the lease refresh, the one query for claims to
recover, the takeover, the release, and the attempt log (one record per attempt in .smapd/jobs/).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loguru import logger

from smapd.errors import ClaimLost
from smapd.models import JobState
from smapd.spool import fsio, names
from smapd.spool.layout import Layout
from smapd.spool.leases import Clock, Key, Leases, lease_stamp, touch
from smapd.spool.sidecars import Sidecars
from smapd.spool.stems import Stems


@dataclass(frozen=True)
class Claim:
    """A file in processing/: who holds it, for which job and attempt, and what it was called."""

    job_id: str
    node: str
    attempt: int
    original_name: str  # the inbox name, full length
    path: Path  # where it is in processing/
    pid: int = 0
    truncated: bool = False  # the processing name holds a shortened <orig>; see the name sidecar
    history: tuple[dict[str, Any], ...] = field(default=(), compare=False, hash=False)  # one record per attempt
    profile: str | None = None  # the profile folder it was dropped in (inbox/<profile>/), None for inbox/

    @property
    def key(self) -> Key:
        return (self.job_id, self.attempt)


@dataclass(frozen=True)
class Listed:
    """A claim as one look at processing/ found it: its lease ``stamp`` and, when it may be recovered
    now, ``why`` (one sentence); None while its owner is alive."""

    claim: Claim
    stamp: float
    why: str | None


class Claims:
    """The claims in processing/ as node ``leases.node`` sees them."""

    def __init__(self, layout: Layout, clock: Clock, leases: Leases, stems: Stems, sidecars: Sidecars) -> None:
        self.layout, self.clock, self.leases, self.stems, self.sidecars = layout, clock, leases, stems, sidecars
        self.processing = layout.dir(JobState.PROCESSING)
        self._warned: set[str] = set()

    # --- taking --------------------------------------------------------------------------------------

    def rename_in(self, src: Path, name: str, job_id: str, attempt: int, profile: str | None = None) -> Claim | None:
        """The claim rename of ``src`` (inbox/[<profile>/]<name> or a stale claim) as ``attempt`` of
        ``job_id`` for this node, within the same profile folder; None when another node won (ENOENT:
        normal, silent)."""
        c = self._make(name, job_id, attempt, profile)
        if c.truncated and not self.layout.name_sidecar(job_id).exists():
            # the only full copy of the name must exist before the short one does
            fsio.atomic_write(self.layout.name_sidecar(job_id), fsio.json_bytes(
                {"name": names.display(name), "raw": list(os.fsencode(name))}), self.layout.tmp)
        if not fsio.rename_verified(src, c.path, trust_dst=True):
            if attempt == 1:
                self.forget(job_id, profile)
            return None
        return c

    def start(self, c: Claim, how: str) -> Claim | None:
        """Hold a fresh claim, refresh its lease, and write its attempt record; None if it was lost."""
        self.leases.hold(c.key)
        try:
            self.heartbeat(c)  # a taken file keeps the user's mtime; ctime covered the gap until now
        except ClaimLost:
            return None
        except OSError as e:  # e.g. not writable by smapd: the runner's next heartbeat fails the job
            logger.warning("claimed {} but cannot refresh its lease: {}", c.path.name, e.strerror or e)
        with fsio.quiet():  # best effort: a missing record is reported as such
            fsio.atomic_write(self.layout.attempt_record(c.job_id, c.attempt), fsio.json_bytes({
                "attempt": c.attempt, "node": c.node, "pid": c.pid, "at": self.clock.now(),
                "started": datetime.now(UTC).isoformat(timespec="seconds"), "how": how}), self.layout.tmp)
        return dataclasses.replace(c, history=tuple(self.attempts(c)))

    def heartbeat(self, claim: Claim) -> None:
        """Refresh the lease (the lease file's mtime to the server's "now").

        Raises:
            ClaimLost: The claim is gone: another node took it over (DESIGN §1 inv. 6).
        """
        try:
            os.lstat(claim.path)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            self.leases.drop(claim.key)
            raise ClaimLost(f"job {claim.job_id} ({names.display(claim.original_name)}) was taken over by "
                            f"another node; publishing nothing") from e
        touch(self.layout.lease(claim.job_id))

    # --- looking -------------------------------------------------------------------------------------

    def parse(self, name: str, profile: str | None = None) -> Claim | None:
        """The claim a processing/[<profile>/] name describes, or None if it is not a claim name."""
        p = names.parse_claim(name)
        if p is None:
            return None
        orig = p.original
        if p.truncated:
            try:
                orig = os.fsdecode(bytes(json.loads(self.layout.name_sidecar(p.job_id).read_bytes())["raw"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass  # the sidecar is lost: the shortened name is the best we have
        return Claim(p.job_id, p.node, p.attempt, orig, self.layout.dir(JobState.PROCESSING, profile) / name, p.pid,
                     p.truncated, profile=profile)

    def names_in(self) -> list[tuple[str | None, str]]:
        """``(profile, name)`` of every entry in processing/ and its profile folders (a directory
        there that is not a claim name is a profile folder: smapd made it)."""
        found: list[tuple[str | None, str]] = []
        with os.scandir(self.processing) as entries:
            for e in entries:
                if names.parse_claim(e.name) is None and e.is_dir(follow_symlinks=False):
                    with fsio.quiet(), os.scandir(e.path) as inner:
                        found.extend((e.name, i.name) for i in inner)
                else:
                    found.append((None, e.name))
        return found

    def scan(self) -> Iterator[tuple[Claim, os.stat_result]]:
        """Every parseable claim in processing/ (and its profile folders) with its fresh stat (gone
        ones are skipped)."""
        for profile, name in self.names_in():
            c = self.parse(name, profile)
            st = fsio.fresh_stat(c.path) if c else None
            if c is None:
                rel = names.join_rel(profile, name)
                if rel not in self._warned:
                    self._warned.add(rel)
                    logger.warning("processing/{} is not a claim name; leaving it alone", names.display(rel))
            elif st is not None:
                yield c, st

    def in_flight(self, profile: str | None, original: str) -> bool:
        """Whether a claim of ``original`` from this inbox folder is in processing/ (its sidecar is
        about to follow it: never an orphan)."""
        return any(p == profile and (c := names.parse_claim(n)) is not None and c.original == original
                   for p, n in self.names_in())

    def judge(self, c: Claim, st: os.stat_result, now: float) -> Listed:
        """The one rule for when a claim may be taken over: its process on this node is gone (at
        once), or it is not this node's and its lease has expired by the spool clock."""
        stamp = lease_stamp(st, self.layout.lease(c.job_id))
        why = None
        if self.leases.own_dead(c.key, c.node, c.pid):
            why = f"its process {c.pid} on {c.node} no longer exists"
        elif not self.leases.held(c.key) and self.leases.expired(stamp, now):
            why = f"its lease expired ({now - stamp:.0f} s without a refresh by the spool clock)"
        return Listed(c, stamp, why)

    def listing(self) -> list[Listed]:
        """The one query: every claim in processing/, judged at one spool-clock instant."""
        now = self.clock.now()
        out = [self.judge(c, st, now) for c, st in self.scan()]
        self.leases.keep_only(x.claim.key for x in out)
        return out

    def rejudge(self, claim: Claim) -> str | None:
        """Why ``claim`` may be taken over right now (re-read just before the rename), or None."""
        st = fsio.fresh_stat(claim.path)
        return None if st is None else self.judge(claim, st, self.clock.now()).why

    def attempts(self, claim: Claim) -> list[dict[str, Any]]:
        """One record per attempt so far (node, pid, when, why it started)."""
        out = []
        for n in range(1, claim.attempt + 1):
            try:
                out.append(json.loads(self.layout.attempt_record(claim.job_id, n).read_bytes()))
            except (OSError, ValueError):
                out.append({"attempt": n, "node": None, "note": "no record (its node died right after claiming)"})
        return out

    # --- letting go ----------------------------------------------------------------------------------

    def release(self, claim: Claim) -> Path:
        """Hand an unfinished claim back to inbox/ under its name, or ``<stem>.<job><ext>`` if a new
        file took that name; the attempt does not count.

        Raises:
            ClaimLost: It was taken over before it could be released.
        """
        inbox = self.layout.dir(JobState.INBOX, claim.profile)
        for dest in names.released_names(claim.original_name, claim.job_id):
            if os.path.lexists(inbox / dest):
                continue
            back = None
            try:
                back = self.sidecars.put_back(claim.job_id, inbox, dest)  # the sidecar first, the file last
                fsio.rename_noreplace(claim.path, inbox / dest)
            except FileExistsError:
                self.sidecars.keep(claim.job_id, back)
                continue
            except FileNotFoundError as e:
                self.sidecars.keep(claim.job_id, back)
                self.leases.drop(claim.key)
                raise ClaimLost(f"job {claim.job_id} was taken over before it could be released") from e
            self.forget(claim.job_id, claim.profile)
            self.leases.drop(claim.key)
            return inbox / dest
        raise FileExistsError(errno.EEXIST, "no free name in inbox/", claim.original_name)

    def forget(self, job_id: str, profile: str | None = None) -> None:
        """Drop the job's records in .smapd/ (attempt log, lease, name sidecar, stash) and its stem."""
        self.stems.drop(job_id, profile)
        for p in self.layout.job_files(job_id):
            p.unlink(missing_ok=True)

    def _make(self, name: str, job_id: str, attempt: int, profile: str | None) -> Claim:
        n = names.format_claim(name, self.leases.node, job_id, attempt, os.getpid())
        return Claim(job_id, n.node, attempt, name, self.layout.dir(JobState.PROCESSING, profile) / names.claim_filename(n),
                     n.pid, n.truncated, profile=profile)
