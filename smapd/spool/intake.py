"""Intake (DESIGN §1 inv. 8, 9): which inbox/ entries are ready, still settling, or to be refused.

A regular file is ready when a watcher marked it, when it has kept its size, mtime and inode for
settle_seconds, or at first sight when its mtime is already settle_seconds old by the spool clock
(files that waited while no node ran). Sizes are read with open()+fstat(): on NFS a plain stat()
may answer from an attribute cache up to 60 s old, open() revalidates. Non-regular entries are
never opened (lstat first; O_NONBLOCK|O_NOFOLLOW guard against a swap in between).

Profiles (issue 11): ``inbox/<profile>/`` of each known profile is scanned the same way, its names
reported as ``<profile>/<name>``; any other directory in inbox/ is refused, its report naming the
known profiles. Sidecars (``<file>.smapd.json``/``.toml``) are never ready themselves: they go with
their file. One whose file is not in its folder after ORPHAN_SETTLES x settle_seconds (and is not
being claimed right now) is refused as an orphan.
"""
from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from smapd.spool.fsio import fresh_stat
from smapd.spool.fsio import quiet as fsio_quiet
from smapd.spool.names import display, is_ignored, is_sidecar, join_rel, sidecar_suffix

ORPHAN_SETTLES = 30  # a sidecar alone for 30 x SETTLE_SECONDS (60 s by default) is an orphan


@dataclass(frozen=True)
class ScanResult:
    """One look at inbox/: names ready to claim (oldest first), still settling, and to refuse (reason)."""

    ready: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    refuse: dict[str, str] = field(default_factory=dict)


def refusal(name: str, mode: int) -> str:
    """The report's sentence for an inbox entry that is not a regular file."""
    kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "not a regular file")
    return (f"inbox/{display(name)} is {kind}; smapd only takes regular files and never follows "
            f"or opens anything else.")


def unknown_folder(rel: str, profiles: tuple[str, ...]) -> str:
    """The report's sentence for a sub-folder of inbox/ that is not a profile."""
    known = f"the known profiles are {', '.join(profiles)}" if profiles else "no profiles are configured"
    return (f"inbox/{display(rel)} is a directory but not a profile's drop folder ({known}); smapd only takes "
            f"regular files in inbox/ or inbox/<profile>/ and never follows or opens anything else.")


def orphan(rel: str) -> str:
    """The report's sentence for a sidecar whose file never came."""
    audio = rel[: -len(sidecar_suffix(rel))]
    return (f"inbox/{display(rel)} is a sidecar (options for one file) but its file inbox/{display(audio)} "
            f"did not arrive; drop the sidecar first and the file last, with the same name plus "
            f"{sidecar_suffix(rel)}.")


class Intake:
    """Settling observations of one inbox/ and its profile folders (per process: each node watches
    for itself)."""

    def __init__(self, inbox: Path, settle_seconds: float, spool_now: Callable[[], float],
                 in_flight: Callable[[str | None, str], bool] = lambda p, n: False) -> None:
        self.inbox, self.settle_seconds, self._spool_now = inbox, settle_seconds, spool_now
        self.profiles: tuple[str, ...] = ()
        self._in_flight = in_flight
        self._reasons: dict[str, str] = {}  # the last scan's refusals (rel name -> reason)
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[tuple[int, int, int], float]] = {}  # name -> (size, mtime_ns, ino), since
        self._marked: set[str] = set()
        self._warned: set[str] = set()

    def hint(self, name: str, ready: bool) -> None:
        """A watcher hint: ``ready`` after close-write/moved-to; otherwise the file changed, settle again."""
        with self._lock:
            if ready:
                self._marked.add(name)
            else:
                self._marked.discard(name)
                self._seen.pop(name, None)

    def forget(self, name: str) -> None:
        """``name`` left inbox/ (claimed): drop what was observed about it."""
        with self._lock:
            self._seen.pop(name, None)
            self._marked.discard(name)

    def waiting_count(self) -> int:
        """Files in inbox/ that will be claimed (ready or settling), as of the last ``scan``."""
        with self._lock:
            return len(self._seen)

    def oldest_mtime(self) -> float | None:
        """The oldest mtime (s) among the files waiting, as of the last ``scan``; None when none wait."""
        with self._lock:
            return min((sig[1] / 1e9 for sig, _ in self._seen.values()), default=None)

    def warn_once(self, name: str, message: str, *args: object) -> None:
        """Log a warning about ``name`` once while it stays where it is (not once per scan)."""
        with self._lock:
            first = name not in self._warned
            self._warned.add(name)
        if first:
            logger.warning(message, *args)

    def reason(self, rel: str, mode: int) -> str:
        """Why ``rel`` is refused: what the last scan said, else what its file type says."""
        with self._lock:
            known = self._reasons.get(rel)
        if known is not None:
            return known
        if stat.S_ISDIR(mode) and "/" not in rel and rel not in self.profiles:
            return unknown_folder(rel, self.profiles)
        return refusal(rel, mode)

    def _entries(self) -> list[tuple[str | None, os.DirEntry[str]]]:
        """Every entry of inbox/ and of each known profile's folder, with its profile."""
        out: list[tuple[str | None, os.DirEntry[str]]] = []
        folders = []
        with os.scandir(self.inbox) as entries:
            for e in entries:
                if e.name in self.profiles and e.is_dir(follow_symlinks=False):  # a symlink is refused, never followed
                    folders.append(e.name)
                else:
                    out.append((None, e))
        for profile in folders:
            with fsio_quiet(), os.scandir(self.inbox / profile) as entries:
                out.extend((profile, e) for e in entries)
        return out

    def scan(self) -> ScanResult:
        """List inbox/ and the profile folders once (never following symlinks) and say which names
        are ready, waiting, refused (names of files in a profile folder are ``<profile>/<name>``)."""
        ready: list[tuple[int, str]] = []
        waiting: list[str] = []
        refuse: dict[str, str] = {}
        names: set[str] = set()
        sidecars: dict[str, tuple[str | None, str, float]] = {}
        now_spool: float | None = None
        with self._lock:
            for profile, e in self._entries():
                name = join_rel(profile, e.name)
                if is_ignored(e.name):
                    continue
                names.add(name)
                try:
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        st = fresh_stat(Path(e.path)) or st
                except FileNotFoundError:
                    continue  # claimed by someone else meanwhile
                if stat.S_ISDIR(st.st_mode) and profile is None:
                    refuse[name] = unknown_folder(name, self.profiles)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    refuse[name] = refusal(name, st.st_mode)
                    continue
                if is_sidecar(e.name):  # goes with its file; judged as an orphan below
                    sidecars[name] = (profile, e.name[: -len(sidecar_suffix(e.name))], st.st_mtime)
                    continue
                sig, mono = (st.st_size, st.st_mtime_ns, st.st_ino), time.monotonic()
                before = self._seen.get(name)
                if before is None or before[0] != sig:
                    self._seen[name] = (sig, mono)
                if name in self._marked or (before is not None and before[0] == sig
                                            and mono - before[1] >= self.settle_seconds):
                    ready.append((st.st_mtime_ns, name))
                    continue
                if before is None:
                    now_spool = self._spool_now() if now_spool is None else now_spool
                    if now_spool - st.st_mtime >= self.settle_seconds:
                        ready.append((st.st_mtime_ns, name))
                        continue
                waiting.append(name)
            for memo in (self._marked, self._warned):
                memo.intersection_update(names)
            for gone in set(self._seen) - names:
                del self._seen[gone]
            lonely = {n: v for n, v in sidecars.items() if join_rel(v[0], v[1]) not in names}
            if lonely:
                now_spool = self._spool_now() if now_spool is None else now_spool
                for name, (profile, audio, mtime) in lonely.items():
                    if now_spool - mtime > ORPHAN_SETTLES * self.settle_seconds and not self._in_flight(profile, audio):
                        refuse[name] = orphan(name)
            self._reasons = dict(refuse)
        return ScanResult(tuple(n for _, n in sorted(ready)), tuple(sorted(waiting)), refuse)
