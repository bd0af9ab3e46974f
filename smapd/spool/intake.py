"""Intake (DESIGN §1 inv. 8, 9): which inbox/ entries are ready, still settling, or to be refused.

A regular file is ready when a watcher marked it, when it has kept its size, mtime and inode for
settle_seconds, or at first sight when its mtime is already settle_seconds old by the spool clock
(files that waited while no node ran). Sizes are read with open()+fstat(): on NFS a plain stat()
may answer from an attribute cache up to 60 s old, open() revalidates. Non-regular entries are
never opened (lstat first; O_NONBLOCK|O_NOFOLLOW guard against a swap in between).
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
from smapd.spool.names import display, is_ignored


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


class Intake:
    """Settling observations of one inbox/ (per process: each node watches for itself)."""

    def __init__(self, inbox: Path, settle_seconds: float, spool_now: Callable[[], float]) -> None:
        self.inbox, self.settle_seconds, self._spool_now = inbox, settle_seconds, spool_now
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

    def scan(self) -> ScanResult:
        """List inbox/ once (never following symlinks) and say which names are ready, waiting, refused."""
        ready: list[tuple[int, str]] = []
        waiting: list[str] = []
        refuse: dict[str, str] = {}
        names: set[str] = set()
        now_spool: float | None = None
        with self._lock, os.scandir(self.inbox) as entries:
            for e in entries:
                name = e.name
                if is_ignored(name):
                    continue
                names.add(name)
                try:
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        st = fresh_stat(self.inbox / name) or st
                except FileNotFoundError:
                    continue  # claimed by someone else meanwhile
                if not stat.S_ISREG(st.st_mode):
                    refuse[name] = refusal(name, st.st_mode)
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
        return ScanResult(tuple(n for _, n in sorted(ready)), tuple(sorted(waiting)), refuse)
