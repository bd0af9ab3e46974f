"""Leases (DESIGN §1 inv. 5, 6): the spool clock, the one expiry rule, and this node's lease table.

Clock. Lease ages are ``spool_now() - stamp`` where both come from the file server: ``stamp`` is the
later of the claim's ctime (rename() bumps it, so a claim is never stale in the instant between its
rename and its first touch) and the mtime of the job's lease file, which the owner touches. The
claim's own mtime is the user's and says nothing. time.time() is never used to judge expiry.

Table. Which claims this ``Spool`` works on (``held``: never recovered by itself) and which it gave
up after a transient error (``abandoned``: recovered only once their lease runs out, like any
node's). It is instance state: another ``Spool`` (another node, or a test's second view) judges
this one's claims by the lease alone.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from smapd.spool.fsio import fresh_mtime

Key = tuple[str, int]  # (job id, attempt)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Clock:
    """The shared filesystem's clock, read through this node's probe file."""

    def __init__(self, probe: Path) -> None:
        self.probe = probe

    def now(self) -> float:
        """Stamp the probe with "now" and read the stamp back.

        futimens(fd, NULL) makes an NFS client ask the server to use its own time (SET_TO_SERVER_TIME),
        so every node reads the same clock however far their own clocks drift.
        """
        fd = os.open(self.probe, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            os.utime(fd)
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)

    def now_or_local(self) -> tuple[float, str]:
        """``(now, "spool")``, or ``(time.time(), "local")`` on a read-only mount (display only)."""
        try:
            return self.now(), "spool"
        except OSError:
            return time.time(), "local"


def claim_stamp(st: os.stat_result) -> float:
    """When a claim file last changed hands: its ctime (or mtime, if later)."""
    return max(st.st_mtime, st.st_ctime)


def lease_stamp(st: os.stat_result, lease_file: Path) -> float:
    """When a claim was last refreshed: its rename (``claim_stamp``) or its lease file, whichever is later."""
    touched = fresh_mtime(lease_file)
    return claim_stamp(st) if touched is None else max(claim_stamp(st), touched)


def touch(lease_file: Path) -> None:
    """Refresh a lease: set the lease file's mtime to the server's "now" (utime with times=None).

    The lease lives in a file smapd owns: touching the claim itself needs its owner's rights, and a
    file dropped by another user (mode 0644) cannot be touched by the service user.
    """
    fd = os.open(lease_file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


class Leases:
    """The expiry rule for ``lease_seconds`` and this node's table of claims held or abandoned."""

    def __init__(self, node: str, lease_seconds: float, alive: Callable[[int], bool] = pid_alive) -> None:
        self.node, self.lease_seconds, self._alive = node, lease_seconds, alive
        self._lock = threading.Lock()
        self._held: set[Key] = set()
        self._abandoned: set[Key] = set()

    def expired(self, stamp: float, now: float) -> bool:
        """The one expiry predicate: ``stamp`` (a spool-clock time) is more than a lease ago."""
        return now - stamp > self.lease_seconds

    def hold(self, key: Key) -> None:
        """This node works on the claim: it is never recovered by this node."""
        with self._lock:
            self._held.add(key)
            self._abandoned.discard(key)

    def drop(self, key: Key) -> None:
        """The claim is finished, released, lost or taken over: forget it entirely."""
        with self._lock:
            self._held.discard(key)
            self._abandoned.discard(key)

    def abandon(self, key: Key) -> None:
        """This node stops working on the claim (a transient error): it waits for its lease."""
        with self._lock:
            self._held.discard(key)
            self._abandoned.add(key)

    def held(self, key: Key) -> bool:
        with self._lock:
            return key in self._held

    def tracked(self) -> int:
        """How many claims the table holds (held or abandoned)."""
        with self._lock:
            return len(self._held) + len(self._abandoned)

    def keep_only(self, live: Iterable[Key]) -> None:
        """Drop abandoned entries whose claim no longer exists (another node took it over or finished
        it), so the table never grows beyond the claims in processing/."""
        with self._lock:
            self._abandoned.intersection_update(live)

    def own_dead(self, key: Key, node: str, pid: int) -> bool:
        """A claim naming this node whose process is gone (or is this process in an earlier life, or
        this process without it in the table): recoverable at once, without waiting for its lease."""
        if node != self.node:
            return False
        with self._lock:
            if key in self._held or key in self._abandoned:
                return False
        return pid == os.getpid() or not self._alive(pid)
