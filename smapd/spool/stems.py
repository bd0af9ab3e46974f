"""Output stems: which ``<stem>`` a job publishes under in outbox/.

``talk.mp3`` gets ``talk`` or, when another job holds or already published that stem, ``talk.2``,
``talk.3``, ... A stem is reserved by creating ``.smapd/stems/<stem>`` with O_EXCL (content: the
job id) before any output is written; the reservation is dropped once the original is archived,
after which the outbox files themselves mark the stem as taken. Later attempts of a job reuse its
reservation, so a crashed attempt's partial outputs are overwritten, never orphaned, and the
job's published report can be found through it ("on start, finish what is provably complete").
A profile's outbox/<profile>/ has its own stems (``.smapd/stems/<profile>/``).
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

from smapd.spool.fsio import quiet
from smapd.spool.layout import Layout
from smapd.spool.names import OUTPUT_SUFFIXES, numbered_stem, stem_base


class Stems:
    """Stem reservations in ``.smapd/stems/``."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def reserved(self, job_id: str, profile: str | None = None) -> str | None:
        """The stem this job holds in outbox/ (or outbox/<profile>/), if any."""
        try:
            entries = os.scandir(self.layout.stem_dir(profile))
        except FileNotFoundError:  # a profile folder not made yet: nothing reserved there
            return None
        with entries:  # only jobs in flight: a short list
            for e in entries:
                with quiet():
                    if e.is_file(follow_symlinks=False) and Path(e.path).read_text() == job_id:
                        return e.name
        return None

    def take(self, job_id: str, original: str, profile: str | None = None) -> str:
        """The job's stem: the one it holds, else the first free choice for ``original``, reserved now."""
        mine = self.reserved(job_id, profile)
        if mine is not None:
            return mine
        if profile:
            self.layout.stem_dir(profile).mkdir(exist_ok=True)
        base = stem_base(original)
        for n in itertools.count(1):
            stem = numbered_stem(base, n)
            if not self._reserve(stem, job_id, profile):
                continue
            if not any(os.path.lexists(self.layout.output(stem, s, profile)) for s in OUTPUT_SUFFIXES):
                return stem
            self.layout.stem(stem, profile).unlink(missing_ok=True)  # a finished job's outputs: the stem is taken
        raise AssertionError("unreachable")

    def drop(self, job_id: str, profile: str | None = None) -> None:
        """Drop the job's reservation (its outputs, if published, now mark the stem as taken)."""
        stem = self.reserved(job_id, profile)
        if stem is not None:
            self.layout.stem(stem, profile).unlink(missing_ok=True)

    def _reserve(self, stem: str, job_id: str, profile: str | None) -> bool:
        path = self.layout.stem(stem, profile)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            try:
                return path.read_text() == job_id  # ours already (a retried create after a lost reply)
            except OSError:
                return False
        try:
            with open(fd, "w") as f:
                f.write(job_id)
        except OSError:  # disk full: an empty reservation would block this stem forever
            path.unlink(missing_ok=True)
            raise
        return True
