"""Sidecars (issue 11): ``<file>.smapd.json`` or ``.smapd.toml`` in an inbox folder carries options
for ``<file>`` alone and travels with it, so it is in exactly one place at a time like its file.

Drop order: the sidecar first, the audio last (or both by rename, the sidecar's first). The claim is
the audio's rename (DESIGN §1 inv. 4); only the node that won it then moves the sidecar into
``.smapd/jobs/<job>.sidecar<suffix>`` (``take``: idempotent, so a node that takes the claim over
after a crash in between takes it too). The finish moves it next to its file in archive/ or failed/
(``settle``); a release hands it back to inbox/ before the file (``put_back``). The spool never
deletes one. Parsing and validating its content is the runner's (smapd.profiles).
"""
from __future__ import annotations

import os
from pathlib import Path

from smapd.models import JobState
from smapd.spool import fsio, names
from smapd.spool.layout import Layout


class Sidecars:
    """Moves sidecars along with their files."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def held(self, job_id: str) -> Path | None:
        """The job's sidecar in .smapd/jobs/, if it has one there."""
        for suffix in names.SIDECAR_SUFFIXES:
            path = self.layout.sidecar(job_id, suffix)
            if path.exists():
                return path
        return None

    def take(self, job_id: str, profile: str | None, original: str) -> Path | None:
        """Move ``<original><suffix>`` from the job's inbox folder into .smapd/jobs/ (once); returns
        where the job's sidecar is now, or None when it has none. Call only while holding the claim."""
        held = self.held(job_id)
        if held is not None:
            return held
        inbox = self.layout.dir(JobState.INBOX, profile)
        for suffix in names.SIDECAR_SUFFIXES:
            if len(os.fsencode(original + suffix)) > names.NAME_MAX:
                continue  # no such name can exist (ENAMETOOLONG): the file has no sidecar
            src, dst = inbox / f"{original}{suffix}", self.layout.sidecar(job_id, suffix)
            if fsio.rename_verified(src, dst, trust_dst=True):  # dst names this job: no one else makes it
                return dst
        return None

    def read(self, job_id: str) -> tuple[str, bytes] | None:
        """``(suffix, content)`` of the job's sidecar, or None."""
        path = self.held(job_id)
        if path is None:
            return None
        return names.sidecar_suffix(path.name), path.read_bytes()

    def settle(self, job_id: str, final: Path) -> Path | None:
        """Move the job's sidecar next to its finished file: ``<final><suffix>`` (archive/ or failed/)."""
        path = self.held(job_id)
        if path is None:
            return None
        dest = final.with_name(final.name + names.sidecar_suffix(path.name))
        return dest if fsio.rename_verified(path, dest, trust_dst=True) else None

    def put_back(self, job_id: str, inbox: Path, name: str) -> Path | None:
        """Hand the job's sidecar back to ``inbox`` as ``<name><suffix>`` (a release, before its file)."""
        path = self.held(job_id)
        if path is None:
            return None
        dest = inbox / f"{name}{names.sidecar_suffix(path.name)}"
        fsio.rename_noreplace(path, dest)
        return dest

    def keep(self, job_id: str, back: Path | None) -> None:
        """Undo ``put_back`` (its file could not follow): the sidecar returns to .smapd/jobs/."""
        if back is not None:
            with fsio.quiet():
                fsio.rename_noreplace(back, self.layout.sidecar(job_id, names.sidecar_suffix(back.name)))
