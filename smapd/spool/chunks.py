"""Chunk checkpoints and shared chunks (DESIGN §1 inv. 10, issue 10): one folder per job in flight,
``.smapd/chunks/<job>/``, kept across attempts (the job id stays when a claim is taken over).

- ``job.json``: what the chunks are decoded with (the options, their fingerprint, the input's digest,
  the model), written when the job starts; a later attempt whose fingerprint differs starts afresh.
- ``plan.json``: every chunk (index, times, pieces, speech) once the plan is complete: a takeover
  uses the same cuts without running the VAD again.
- ``done/<i>.json``: a finished chunk (segments, words, language, signals, who made it): the checkpoint.
- ``todo/<i>``: a chunk offered to other nodes (content: the chunk); ``audio/<i>.pcm`` its window as
  int16 16 kHz samples, written before the offer, so a helper decodes exactly what the owner would.
- ``taken/<i>.<who>.<node hex>``: a chunk being made. A helper takes an offered chunk with one rename
  of ``todo/<i>`` (losing the race is ENOENT, silent); the owner takes the same way, or creates the
  entry for a chunk it never offered. ``<who>`` is ``a<attempt>`` for the job's owner, ``h<pid>`` for
  a helper. A helper's entry is its lease: it touches it while it works, and an entry untouched for a
  lease by the spool clock is free again. An owner's entry dies with its attempt.

Every write is the spool's atomic write; the folder goes when the job is published or fails for good,
so nothing of it reaches outbox/. A graceful stop hands the file back to inbox/ under a new job id:
the next claim of the same bytes with the same options adopts the folder (``adopt``).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smapd.spool import fsio
from smapd.spool.layout import Layout
from smapd.spool.leases import Clock, touch

OWNER, HELPER = "a", "h"


@dataclass(frozen=True)
class Taken:
    """One ``taken/`` entry: chunk ``index`` made by ``node`` as owner attempt or helper pid ``n``."""

    index: int
    kind: str  # OWNER or HELPER
    n: int
    node: str
    path: Path


def taken_name(index: int, kind: str, n: int, node: str) -> str:
    return f"{index}.{kind}{n}.{node.encode('utf-8', 'surrogateescape').hex()}"


def parse_taken(path: Path) -> Taken | None:
    parts = path.name.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or parts[1][:1] not in (OWNER, HELPER) \
            or not parts[1][1:].isdigit():
        return None
    try:
        node = bytes.fromhex(parts[2]).decode("utf-8", "surrogateescape")
    except ValueError:
        return None
    return Taken(int(parts[0]), parts[1][0], int(parts[1][1:]), node, path)


class JobChunks:
    """The checkpoint folder of one job, as one node sees it."""

    def __init__(self, layout: Layout, clock: Clock, job_id: str, node: str, lease_seconds: float) -> None:
        self.layout, self.clock, self.job_id, self.node = layout, clock, job_id, node
        self.lease_seconds = lease_seconds
        self.bytes_read = 0  # what this view read from the spool (a helper's share, issue 10)
        self.dir = layout.chunks / job_id
        self.done_dir, self.todo_dir, self.taken_dir, self.audio_dir = (
            self.dir / d for d in ("done", "todo", "taken", "audio"))

    # --- the job's own records -------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.dir / "job.json").exists()

    def job(self) -> dict[str, Any] | None:
        return self._read(self.dir / "job.json")

    def begin(self, record: dict[str, Any]) -> None:
        """Create the folder and write ``job.json`` (a new fingerprint starts afresh: old results go)."""
        old = self.job()
        if old is not None and old.get("fingerprint") != record.get("fingerprint"):
            self.remove()
        for d in (self.done_dir, self.todo_dir, self.taken_dir, self.audio_dir):
            d.mkdir(parents=True, exist_ok=True)
        fsio.atomic_write(self.dir / "job.json", fsio.json_bytes(record), self.layout.tmp)

    def plan(self) -> list[dict[str, Any]] | None:
        data = self._read(self.dir / "plan.json")
        return data.get("chunks") if isinstance(data, dict) else None

    def save_plan(self, chunks: list[dict[str, Any]]) -> None:
        fsio.atomic_write(self.dir / "plan.json", fsio.json_bytes({"chunks": chunks}), self.layout.tmp)

    def results(self, only: set[int] | None = None) -> dict[int, dict[str, Any]]:
        """Every checkpointed chunk (or those of ``only``), by index."""
        out = {}
        for p in _listdir(self.done_dir):
            if p.name.endswith(".json") and p.name[:-5].isdigit() and (only is None or int(p.name[:-5]) in only) \
                    and (data := self._read(p)) is not None:
                out[int(p.name[:-5])] = data
        return out

    def result(self, index: int) -> dict[str, Any] | None:
        return self._read(self.done_dir / f"{index}.json")

    def save(self, index: int, result: dict[str, Any]) -> None:
        """Checkpoint one chunk (fsynced; the folder's other names need no sync of their own)."""
        fsio.atomic_write(self.done_dir / f"{index}.json", fsio.json_bytes(result), self.layout.tmp)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- offers and takes ------------------------------------------------------------------------------

    def offer(self, index: int, record: dict[str, Any], window: np.ndarray) -> None:
        """Offer a chunk to helpers: its window first, then the ``todo/`` entry (``record``: the chunk
        and its speech spans in window time)."""
        fsio.atomic_write(self.audio_dir / f"{index}.pcm", np.ascontiguousarray(window, dtype="<i2").tobytes(),
                          self.layout.tmp, sync_dir=False)
        fsio.atomic_write(self.todo_dir / str(index), fsio.json_bytes(record), self.layout.tmp, sync_dir=False)

    def offered(self) -> list[int]:
        return _offered(self.dir)

    def take(self, index: int, kind: str, n: int) -> Path | None:
        """Take an offered chunk with one rename; None when it is not on offer (taken, done, never offered)."""
        dest = self.taken_dir / taken_name(index, kind, n, self.node)
        try:
            os.rename(self.todo_dir / str(index), dest)
        except FileNotFoundError:
            return None
        return dest

    def mark(self, index: int, attempt: int) -> Path:
        """The owner's entry for a chunk it makes without an offer (a record: who started it)."""
        dest = self.taken_dir / taken_name(index, OWNER, attempt, self.node)
        touch(dest)
        return dest

    def takers(self, index: int | None = None) -> list[Taken]:
        out = [t for p in _listdir(self.taken_dir) if (t := parse_taken(p)) is not None]
        return [t for t in out if index is None or t.index == index]

    def live(self, t: Taken, now: float) -> bool:
        """Whether a helper's entry is still within its lease (by the spool clock)."""
        try:
            st = os.stat(t.path)
        except OSError:
            return False
        # the rename that took it bumped its ctime (its mtime is the offer's), each refresh its mtime
        return now - max(st.st_mtime, st.st_ctime) <= self.lease_seconds

    def reoffer_taken(self, taken: Path, index: int) -> None:
        """Put a chunk this node took back on offer (it stops before making it)."""
        try:
            os.rename(taken, self.todo_dir / str(index))
        except OSError:
            pass  # the job ended: its folder is gone

    def window(self, index: int) -> np.ndarray:
        """An offered chunk's window (int16 samples), as its owner wrote it.

        Raises:
            OSError: It is gone (the job ended) or unreadable.
        """
        data = (self.audio_dir / f"{index}.pcm").read_bytes()
        self.bytes_read += len(data)
        return np.frombuffer(data, dtype="<i2")

    def offer_of(self, taken: Path) -> dict[str, Any] | None:
        """The record of an offered chunk this node took (``offer``'s ``record``)."""
        return self._read(taken)

    def _read(self, p: Path) -> Any:
        data, size = _load(p)
        self.bytes_read += size
        return data


def adopt(layout: Layout, job_id: str, digest: str, fingerprint: str, live: set[str]) -> bool:
    """Give ``job_id`` the checkpoints of an earlier job of the same bytes and options that is no
    longer in processing/ (it was handed back to inbox/ by a graceful stop). One rename."""
    for d in _listdir(layout.chunks):
        if d.name in live or d.name == job_id:
            continue
        record = _load(d / "job.json")[0]
        if record and record.get("digest") == digest and record.get("fingerprint") == fingerprint:
            try:
                os.rename(d, layout.chunks / job_id)
                return True
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY):
                    raise
    return False


def offers(layout: Layout, skip: set[str]) -> Iterator[tuple[str, int]]:
    """``(job id, chunk index)`` of every chunk on offer in jobs not in ``skip``, the job with most
    on offer first and, within a job, the last chunk first (the owner works from the front)."""
    jobs = []
    for d in _listdir(layout.chunks):
        if d.name not in skip:
            todo = _offered(d)[::-1]
            if todo:
                jobs.append((d.name, todo))
    for job_id, todo in sorted(jobs, key=lambda j: -len(j[1])):
        for index in todo:
            yield job_id, index


def _listdir(d: Path) -> list[Path]:
    try:
        return [d / n for n in os.listdir(d)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _offered(job_dir: Path) -> list[int]:
    """The indexes on offer in a job's folder, in order."""
    return sorted(int(p.name) for p in _listdir(job_dir / "todo") if p.name.isdigit())


def _load(p: Path) -> tuple[Any, int]:
    """A JSON record and the bytes read for it; (None, 0) when it is missing or torn."""
    try:
        data = p.read_bytes()
        return json.loads(data), len(data)
    except (OSError, ValueError):
        return None, 0
