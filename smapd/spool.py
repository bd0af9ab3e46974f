"""The on-disk protocol of DESIGN §1: one function per verb (scan, claim, heartbeat, recover, complete,
fail, release, refuse), safe with many processes on many machines sharing one (NFS) spool.

Names. File names are handled as ``str`` with surrogateescape (``os.fsdecode``), so any byte sequence
round-trips; lengths are counted in bytes against NAME_MAX (255).

- processing/: ``<orig>__<node>_<job>_a<attempt>_p<pid>[_t]``, e.g. ``talk.mp3__web1_3f2a9c1e4b7d_a1_p4242``.
  It is parsed from the right: node names contain no ``_`` (Settings forbids it), the rest is fixed
  format, so any ``<orig>`` parses back. The job id (12 hex) stays the same across attempts. When the
  whole would pass 255 bytes, ``<orig>`` is shortened (head and extension kept), ``_t`` is appended and
  the full name is kept in ``.smapd/jobs/<job>.name.json``, written *before* the claim rename.
- archive/ and failed/: ``<job>.<orig>`` (shortened the same way to 243 bytes so that
  ``<name>.report.json`` fits). rename() overwrites and NFS has no RENAME_NOREPLACE, so uniqueness
  must come from the name itself: the job id makes a second ``talk.mp3`` a distinct file.
- outbox/: ``output_stem`` gives the stem of the original (``talk.mp3`` -> ``talk``; control characters
  and undecodable bytes become ``_``) or, when another job holds or already published that stem,
  ``talk.2``, ``talk.3``, ... A stem is reserved by creating ``.smapd/stems/<stem>`` with O_EXCL (content:
  the job id) before any output is written; the reservation is dropped once the original is archived,
  after which the outbox files themselves mark the stem as taken. Later attempts of a job reuse its
  reservation, so a crashed attempt's partial outputs are overwritten, never orphaned, and
  ``published_report`` finds a job's report through it ("on start, finish what is provably complete").
- ``.smapd/``: ``tmp/`` (atomic-write temp files), ``nodes/<node>.json`` (node heartbeats),
  ``clock-<node>`` (the clock probe), ``jobs/<job>.*`` (name sidecar, one record per attempt, the
  failure report stash), ``stems/`` (output-stem reservations of jobs in flight).

Clock. Lease ages are ``spool_now() - max(mtime, ctime)`` of a freshly opened claim: both stamps come
from the file server, and rename() bumps ctime, so a claim is never stale in the instant between its
rename and its first touch. time.time() is never used to judge expiry.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import itertools
import json
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loguru import logger

from smapd.errors import ClaimLost
from smapd.models import JobState

NAME_MAX = 255
REPORT_SUFFIX = ".report.json"
OUTPUT_SUFFIXES = (".txt", ".srt", ".vtt", ".json", REPORT_SUFFIX)
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", "~")
_CLAIM_RE = re.compile(rb"(?P<orig>.+)__(?P<node>[^_/]+)_(?P<job>[0-9a-f]{12})_a(?P<attempt>[0-9]+)"
                       rb"_p(?P<pid>[0-9]+)(?P<trunc>_t)?", re.DOTALL)
_NODE_RE = re.compile(r"[^\s/_\0]{1,64}")
_OPEN_PROBE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
_HELD: set[tuple[str, str, int]] = set()  # (root, job, attempt) this process works on; pids are per process
_HELD_LOCK = threading.Lock()
_ABANDONED: set[tuple[str, str, int]] = set()  # claims this process gave up (transient error): lease expiry only


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


@dataclass(frozen=True)
class ScanResult:
    """One look at inbox/: names ready to claim (oldest first), still settling, and to refuse (reason)."""

    ready: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    refuse: dict[str, str] = field(default_factory=dict)


def is_ignored(name: str) -> bool:
    """Names writers use while a file is incomplete (DESIGN §1 inv. 8): dot names (.nfs*, .syncthing.*
    included) and temp suffixes."""
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` so that ``path`` is either absent/old or complete (DESIGN §1 inv. 3).

    Args:
        path: The final name.
        data: The whole content.
        tmp_dir: Where the temp file is made; must be on the same filesystem (rename does not cross).
    """
    tmp = tmp_dir / f".{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; the rename still holds
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=True, indent=2, default=str) + "\n").encode("ascii")


def _display(name: str) -> str:
    """The name as readable text: undecodable bytes shown as U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


def _fit(name: bytes, limit: int) -> bytes:
    """Shorten a name to ``limit`` bytes, keeping its head and a short extension, never splitting a
    UTF-8 sequence."""
    if len(name) <= limit:
        return name
    dot = name.rfind(b".")
    ext = name[dot:] if 0 < dot and len(name) - dot <= 16 else b""
    cut = limit - len(ext)
    for _ in range(3):  # a UTF-8 continuation byte: back off to the character's start
        if 0x80 <= name[cut] < 0xC0:
            cut -= 1
    return name[:cut] + ext


def _stamp(st: os.stat_result) -> float:
    return max(st.st_mtime, st.st_ctime)


def _refusal(name: str, mode: int) -> str:
    kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "not a regular file")
    return (f"inbox/{_display(name)} is {kind}; smapd only takes regular files and never follows "
            f"or opens anything else.")


def _report_job(report: Any) -> str | None:
    if not isinstance(report, dict):
        return None
    job = report.get("job")
    return report.get("job_id") or (job.get("id") if isinstance(job, dict) else None)


_libc: Any = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename() that fails with FileExistsError instead of overwriting: renameat2(RENAME_NOREPLACE)
    where the filesystem has it (not NFS), else a check right before the rename (a tiny window)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        if fn(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


class Spool:
    """The spool at ``root`` as seen by node ``node`` (this process)."""

    def __init__(self, root: Path, node: str, lease_seconds: float = 120, max_attempts: int = 3,
                 settle_seconds: float = 2.0, alive: Callable[[int], bool] = pid_alive) -> None:
        if not _NODE_RE.fullmatch(node):
            raise ValueError(f"node name {node!r} must be 1-64 characters without '/', '_' or spaces")
        self.root, self.node = Path(root), node
        self.lease_seconds, self.max_attempts, self.settle_seconds = lease_seconds, max_attempts, settle_seconds
        self._alive = alive
        self.inbox, self.processing, self.outbox, self.archive, self.failed = (
            self.root / s for s in ("inbox", "processing", "outbox", "archive", "failed"))
        self.meta = self.root / ".smapd"
        self.tmp, self.nodes, self.jobs, self.stems = (self.meta / s for s in ("tmp", "nodes", "jobs", "stems"))
        self._clock = self.meta / f"clock-{node}"
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[tuple[int, int, int], float]] = {}  # name -> (size, mtime_ns, ino), since
        self._marked: set[str] = set()
        self._warned: set[str] = set()

    def dir(self, state: JobState) -> Path:
        """The directory of a state (inbox/, processing/, archive/, failed/)."""
        return self.root / state.value

    def ensure_layout(self) -> None:
        """Create the spool directories that are missing."""
        for d in (self.inbox, self.processing, self.outbox, self.archive, self.failed, self.tmp,
                  self.nodes, self.jobs, self.stems):
            d.mkdir(parents=True, exist_ok=True)

    # --- the clock ------------------------------------------------------------------------------------

    def spool_now(self) -> float:
        """The shared filesystem's clock: stamp the probe file with "now" and read the stamp back.

        futimens(fd, NULL) makes an NFS client ask the server to use its own time (SET_TO_SERVER_TIME),
        so every node reads the same clock however far their own clocks drift.
        """
        fd = os.open(self._clock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            os.utime(fd)
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)

    def _now_or_local(self) -> tuple[float, str]:
        try:
            return self.spool_now(), "spool"
        except OSError:  # a read-only mount (`smapd status` elsewhere): ages for display only
            return time.time(), "local"

    # --- intake ---------------------------------------------------------------------------------------

    def mark_ready(self, name: str) -> None:
        """Treat ``name`` as complete at once (inotify saw close-write or a rename into inbox/)."""
        self.hint(name, True)

    def hint(self, name: str, ready: bool) -> None:
        """A watcher hint: ``ready`` after close-write/moved-to; otherwise the file changed, settle again."""
        with self._lock:
            if ready:
                self._marked.add(name)
            else:
                self._marked.discard(name)
                self._seen.pop(name, None)

    def scan(self) -> ScanResult:
        """List inbox/ once (never following symlinks) and say which names are ready, waiting, refused.

        A regular file is ready when a watcher marked it, when it has kept its size, mtime and inode for
        settle_seconds, or at first sight when its mtime is already settle_seconds old by the spool
        clock (files that waited while no node ran). Sizes are read with open()+fstat(): on NFS a plain
        stat() may answer from an attribute cache up to 60 s old, open() revalidates. Non-regular
        entries are never opened (lstat first; O_NONBLOCK|O_NOFOLLOW guard against a swap in between).
        """
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
                        st = self._fresh_stat(self.inbox / name) or st
                except FileNotFoundError:
                    continue  # claimed by someone else meanwhile
                if not stat.S_ISREG(st.st_mode):
                    refuse[name] = _refusal(name, st.st_mode)
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
                    now_spool = self.spool_now() if now_spool is None else now_spool
                    if now_spool - st.st_mtime >= self.settle_seconds:
                        ready.append((st.st_mtime_ns, name))
                        continue
                waiting.append(name)
            for memo in (self._marked, self._warned):
                memo.intersection_update(names)
            for gone in set(self._seen) - names:
                del self._seen[gone]
        return ScanResult(tuple(n for _, n in sorted(ready)), tuple(sorted(waiting)), refuse)

    def _fresh_stat(self, path: Path) -> os.stat_result | None:
        """fstat of a freshly opened file (close-to-open: NFS revalidates), None when it is gone.

        Only called for entries lstat said are regular; a symlink or FIFO swapped in meanwhile fails
        (O_NOFOLLOW) or opens without blocking (O_NONBLOCK) and is reported by its own mode.
        """
        try:
            fd = os.open(path, _OPEN_PROBE)
        except FileNotFoundError:
            return None
        except OSError:  # ELOOP (a symlink now), EACCES, ...: lstat says what it is
            return os.lstat(path)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def refuse(self, name: str, reason: str | None = None) -> Path | None:
        """Move a non-regular inbox entry (the link itself, never its target) to failed/ with a report.

        Args:
            name: The inbox name.
            reason: One sentence for the report; by default what ``scan`` says about its file type.

        Returns:
            Its path in failed/, or None when it is gone or cannot be moved (one warning per name).
        """
        job = uuid.uuid4().hex[:12]
        try:
            reason = reason or _refusal(name, os.lstat(self.inbox / name).st_mode)
            report = self._failure(name, job, 0, reason, [])
            return self._to_failed(self.inbox / name, name, job, report, unique=True)
        except OSError as e:
            with self._lock:
                first = name not in self._warned
                self._warned.add(name)
            if first:
                logger.warning("cannot move inbox/{} to failed/ ({}); skipping it: {}", _display(name),
                               e.strerror or e, reason)
            return None

    # --- claims ---------------------------------------------------------------------------------------

    def claim(self, name: str) -> Claim | None:
        """Claim inbox/<name> with one rename into processing/ (DESIGN §1 inv. 4).

        Returns:
            The claim, or None when another node won the race (normal, silent).
        """
        job = uuid.uuid4().hex[:12]
        c = self._make(name, job, 1)
        if c.truncated:  # the only full copy of the name must exist before the short one does
            self._write_json(self._job_file(job, "name"), {"name": _display(name), "raw": list(os.fsencode(name))})
        if not self._rename(self.inbox / name, c.path, trust_dst=True):
            self._forget_job(job)
            return None
        with self._lock:
            self._seen.pop(name, None)
            self._marked.discard(name)
        st = os.lstat(c.path)
        if not stat.S_ISREG(st.st_mode):  # swapped for a link/FIFO after the scan: refuse it after all
            self._to_failed(c.path, name, job, self._failure(name, job, 1, _refusal(name, st.st_mode), []))
            return None
        self._hold(c)
        try:
            self.heartbeat(c)  # the file keeps the user's mtime until now; ctime covered the gap
        except ClaimLost:
            return None
        except OSError as e:  # e.g. not writable by smapd: the runner's next heartbeat fails the job
            logger.warning("claimed {} but cannot refresh its lease: {}", c.path.name, e.strerror or e)
        c = self._record(c, "claimed from inbox/")
        logger.debug("claimed {} as job {}", _display(name), job)
        return c

    def heartbeat(self, claim: Claim) -> None:
        """Refresh the lease (utime to the server's "now").

        Raises:
            ClaimLost: The claim is gone: another node took it over (DESIGN §1 inv. 6).
        """
        try:
            os.lstat(claim.path)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            self._unhold(claim)
            raise ClaimLost(f"job {claim.job_id} ({_display(claim.original_name)}) was taken over by another "
                            f"node; publishing nothing") from e
        # The lease lives in a file smapd owns: touching the claim itself needs its owner's rights,
        # and a file dropped by another user (mode 0644) cannot be touched by the service user.
        fd = os.open(self._lease_path(claim.job_id), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.utime(fd)  # times=None: the server's "now" on NFS
        finally:
            os.close(fd)

    def _lease_path(self, job: str) -> Path:
        return self.jobs / f"{job}.lease"

    def _lease_stamp(self, claim: Claim, st: os.stat_result) -> float:
        """When the claim was last refreshed: its rename (ctime) or its lease file, whichever is later.

        The lease file is read with open()+fstat() (NFS revalidates on open; a cached stat could
        make a live lease look expired)."""
        stamp = _stamp(st)
        try:
            fd = os.open(self._lease_path(claim.job_id), os.O_RDONLY)
        except OSError:
            return stamp
        try:
            return max(stamp, os.fstat(fd).st_mtime)
        finally:
            os.close(fd)

    def claims(self) -> Iterator[tuple[Claim, os.stat_result]]:
        """Every parseable claim in processing/ with its fresh stat (gone ones are skipped)."""
        with os.scandir(self.processing) as entries:
            names = [e.name for e in entries]
        for name in names:
            c = self.parse(name)
            st = self._fresh_stat(self.processing / name) if c else None
            if c is None:
                if name not in self._warned:
                    self._warned.add(name)
                    logger.warning("processing/{} is not a claim name; leaving it alone", _display(name))
            elif st is not None:
                yield c, st

    def parse(self, name: str) -> Claim | None:
        """The claim a processing/ name describes, or None if it is not a claim name."""
        m = _CLAIM_RE.fullmatch(os.fsencode(name))
        if m is None:
            return None
        job, trunc = m["job"].decode(), bool(m["trunc"])
        orig = os.fsdecode(m["orig"])
        if trunc:
            try:
                orig = os.fsdecode(bytes(json.loads(self._job_file(job, "name").read_bytes())["raw"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass  # the sidecar is lost: the shortened name is the best we have
        return Claim(job, m["node"].decode(), int(m["attempt"]), orig, self.processing / name,
                     int(m["pid"]), trunc)

    def stale_claims(self) -> list[Claim]:
        """Claims whose lease has expired by the spool clock (never the local clock, DESIGN §1 inv. 5)."""
        now = self.spool_now()
        return [c for c, st in self.claims() if not self._held(c) and now - self._lease_stamp(c, st) > self.lease_seconds]

    def own_dead_claims(self) -> list[Claim]:
        """Claims naming this node and a process that no longer exists (or an earlier life of this
        pid): recoverable at once, without waiting for the lease."""
        return [c for c, _ in self.claims() if self._own_dead(c)]

    def recoverable(self) -> list[Claim]:
        """Own dead claims first (no lease wait), then everybody's stale ones; each claim once."""
        now = self.spool_now()
        out = [c for c, st in self.claims()
               if self._own_dead(c) or (not self._held(c) and now - self._lease_stamp(c, st) > self.lease_seconds)]
        return sorted(out, key=lambda c: c.node != self.node)

    def _own_dead(self, c: Claim) -> bool:
        if c.node != self.node or self._held(c):
            return False
        with _HELD_LOCK:
            if self._key(c) in _ABANDONED:
                return False  # given up by this very process: it waits for its lease like any other
        return c.pid == os.getpid() or not self._alive(c.pid)

    def recover(self, claim: Claim) -> Claim | None:
        """Take over a stale (or own dead) claim with one rename, as attempt+1 for this node; a claim
        that already had max_attempts goes to failed/ with a report listing every attempt.

        Returns:
            The new claim, or None when another node won, the claim is live again, or it went to failed/.
        """
        st = self._fresh_stat(claim.path)
        if st is None:
            return None
        age = self.spool_now() - self._lease_stamp(claim, st)
        if age <= self.lease_seconds and not self._own_dead(claim):
            return None  # refreshed since it was listed: its owner is alive
        why = (f"its lease expired ({age:.0f} s without a refresh by the spool clock)" if age > self.lease_seconds
               else f"its process {claim.pid} on {claim.node} no longer exists")
        if claim.attempt >= self.max_attempts:
            error = (f"gave up after {claim.attempt} attempts: each one ended without finishing (the "
                     f"worker or node died or hung); the last one because {why}.")
            report = self._failure(claim.original_name, claim.job_id, claim.attempt, error, self.attempts(claim))
            if self._to_failed(claim.path, claim.original_name, claim.job_id, report):
                logger.warning("{} moved to failed/ after {} attempts", _display(claim.original_name), claim.attempt)
            return None
        new = self._make(claim.original_name, claim.job_id, claim.attempt + 1)
        if new.truncated and not claim.truncated:
            self._write_json(self._job_file(claim.job_id, "name"),
                             {"name": _display(claim.original_name), "raw": list(os.fsencode(claim.original_name))})
        if not self._rename(claim.path, new.path, trust_dst=True):
            return None
        self._hold(new)
        try:
            self.heartbeat(new)
        except ClaimLost:
            return None
        new = self._record(new, f"took over from {claim.node} (attempt {claim.attempt}) because {why}")
        logger.info("recovered {} from {}: attempt {} ({})", _display(claim.original_name), claim.node, new.attempt, why)
        return new

    def attempts(self, claim: Claim) -> list[dict[str, Any]]:
        """One record per attempt so far (node, pid, when, why it started)."""
        out = []
        for n in range(1, claim.attempt + 1):
            try:
                out.append(json.loads(self._job_file(claim.job_id, f"a{n}").read_bytes()))
            except (OSError, ValueError):
                out.append({"attempt": n, "node": None, "note": "no record (its node died right after claiming)"})
        return out

    # --- finishing ------------------------------------------------------------------------------------

    def output_stem(self, claim: Claim, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES) -> str:
        """The outbox stem for this job: reserved for it, free of other jobs' outputs (module docstring)."""
        mine = self._reserved_stem(claim.job_id)
        if mine is not None:
            return mine
        raw = Path(claim.original_name).stem or claim.original_name
        text = "".join("_" if ord(ch) < 32 or ord(ch) == 127 or 0xDC80 <= ord(ch) <= 0xDCFF else ch for ch in raw)
        base = os.fsdecode(_fit(text.encode("utf-8"), 200)) or "_"
        for n in itertools.count(1):
            stem = base if n == 1 else f"{base}.{n}"
            if not self._reserve(stem, claim.job_id):
                continue
            if not any(os.path.lexists(self.outbox / f"{stem}{s}") for s in suffixes):
                return stem
            (self.stems / stem).unlink(missing_ok=True)  # a finished job's outputs: the stem is taken
        raise AssertionError("unreachable")

    def published_report(self, claim: Claim) -> Path | None:
        """This job's report in outbox/ if it was published (the job is done but not yet archived)."""
        stem = self._reserved_stem(claim.job_id)
        path = self.outbox / f"{stem}{REPORT_SUFFIX}"
        try:
            return path if stem is not None and _report_job(json.loads(path.read_bytes())) == claim.job_id else None
        except (OSError, ValueError):
            return None

    def finish_published(self, claim: Claim) -> Path | None:
        """If this job's report is already in outbox/, just archive the original (returns its path)."""
        return self._archive(claim) if self.published_report(claim) else None

    def complete(self, claim: Claim, publish: Callable[[], None]) -> Path:
        """Finish a job: verify the lease, ``publish()`` the outputs (report last), archive the original.

        A crash at any point loses and duplicates nothing: before the report, a later attempt reuses
        the stem and overwrites; after it, ``finish_published`` archives without redoing the work.

        Returns:
            The original's path in archive/.

        Raises:
            ClaimLost: Before publishing (nothing published) or at the archive rename.
        """
        self.heartbeat(claim)
        publish()
        return self._archive(claim)

    def fail(self, claim: Claim, report: dict[str, Any]) -> Path:
        """Move the original to failed/ with ``failed/<name>.report.json`` (attempt records added).

        Raises:
            ClaimLost: The claim was taken over; nothing is written.
        """
        self.heartbeat(claim)
        stem = self._reserved_stem(claim.job_id)
        for s in OUTPUT_SUFFIXES if stem is not None else ():  # an earlier attempt's unfinished outputs
            (self.outbox / f"{stem}{s}").unlink(missing_ok=True)
        full = {**report, "attempts": report.get("attempts") or self.attempts(claim)}
        dest = self._to_failed(claim.path, claim.original_name, claim.job_id, full)
        if dest is None:
            raise ClaimLost(f"job {claim.job_id} was taken over before it could be failed")
        return dest

    def release(self, claim: Claim) -> Path:
        """Hand an unfinished claim back to inbox/ (graceful shutdown); the attempt does not count.

        Its original name is used unless a new file took it: then ``<stem>.<job><ext>``.
        """
        name = os.fsencode(claim.original_name)
        for dest in (name, _fit(os.fsencode(_with_job(claim.original_name, claim.job_id)), NAME_MAX)):
            try:
                _rename_noreplace(claim.path, self.inbox / os.fsdecode(dest))
            except FileExistsError:
                continue
            except FileNotFoundError as e:
                self._unhold(claim)
                raise ClaimLost(f"job {claim.job_id} was taken over before it could be released") from e
            self._forget_job(claim.job_id)
            self._unhold(claim)
            return self.inbox / os.fsdecode(dest)
        raise FileExistsError(errno.EEXIST, "no free name in inbox/", claim.original_name)

    def repair(self) -> int:
        """Write the report of any failed/ entry a crash left without one (from its stash if any).

        Returns:
            How many reports were written.
        """
        now, fixed = self.spool_now(), 0
        names = set(os.listdir(self.failed))
        for name in names:
            if name.endswith(REPORT_SUFFIX) and name[: -len(REPORT_SUFFIX)] in names:
                continue  # a report, not an input
            report = self.failed / f"{name}{REPORT_SUFFIX}"
            try:
                if report.name in names or now - _stamp(os.lstat(self.failed / name)) < self.lease_seconds:
                    continue
            except FileNotFoundError:
                continue
            job = name.split(".", 1)[0]
            stash = sorted(self.jobs.glob(f"{job}.failed-*.json")) if re.fullmatch("[0-9a-f]{12}", job) else []
            data = stash[0].read_bytes() if stash else _json_bytes(self._failure(
                name, job, 0, "moved to failed/, but its node stopped before writing the report; see its log.", []))
            atomic_write(report, data, self.tmp)
            fixed += 1
        return fixed

    # --- nodes, status, pruning --------------------------------------------------------------------------

    def write_heartbeat(self, status: dict[str, Any]) -> None:
        """Publish this node's status (jobs in progress, chunk progress, ...) in .smapd/nodes/<node>.json."""
        self._write_json(self.nodes / f"{self.node}.json", {"node": self.node, "pid": os.getpid(), **status})

    def read_nodes(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every node's last heartbeat with its ``age`` in seconds by the spool clock."""
        now = self._now_or_local()[0] if now is None else now
        out = []
        for p in sorted(self.nodes.glob("*.json")):
            try:
                data, st = json.loads(p.read_bytes()), p.stat()
            except (OSError, ValueError):
                continue
            out.append({**data, "node": data.get("node", p.stem), "age": round(now - st.st_mtime, 1)})
        return out

    def waiting_count(self) -> int:
        """Files in inbox/ that will be claimed (ready or settling), as of the last ``scan``."""
        with self._lock:
            return len(self._seen)

    def list_state(self, failures: int = 10) -> dict[str, Any]:
        """What `smapd status` shows, JSON-ready: ``waiting`` files, ``processing`` claims (``age`` is
        the lease age; ``running`` since the attempt began; ``stale``), recent ``failures`` newest
        first, and ``nodes`` with their last heartbeat ``age``. Ages are seconds by the spool clock
        (``clock`` says "local" where the spool is read-only and the probe cannot be written)."""
        now, clock = self._now_or_local()
        waiting = []
        with os.scandir(self.inbox) as entries:
            for e in entries:
                with _quiet():
                    if not is_ignored(e.name):
                        st = e.stat(follow_symlinks=False)
                        waiting.append({"name": _display(e.name), "size": st.st_size, "age": round(now - st.st_mtime, 1)})
        claims = []
        for c, st in self.claims():
            began = self.attempts(c)[-1].get("at") or _stamp(st)
            claims.append({"job_id": c.job_id, "name": _display(c.original_name), "node": c.node, "pid": c.pid,
                           "attempt": c.attempt, "age": round(now - self._lease_stamp(c, st), 1),
                           "running": round(now - began, 1),
                           "stale": now - self._lease_stamp(c, st) > self.lease_seconds})
        recent = []
        for p in sorted(self.failed.glob(f"*{REPORT_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True):
            with _quiet():
                r = json.loads(p.read_bytes())
                recent.append({"name": (r.get("input") or {}).get("name"), "report": _display(p.name),
                               "error": r.get("error"), "age": round(now - p.stat().st_mtime, 1)})
            if len(recent) >= failures:
                break
        return {"spool": str(self.root), "clock": clock, "waiting": sorted(waiting, key=lambda f: -f["age"]),
                "processing": claims, "failures": recent, "nodes": self.read_nodes(now)}

    def prune_archive(self, retention_days: float) -> int:
        """Delete archive/ files older than ``retention_days`` by the spool clock (0 keeps forever); also
        drop temp files and job records that crashes left in .smapd/ for over a day.

        Returns:
            How many archive files were deleted.
        """
        now, removed = self.spool_now(), 0
        live = {c.job_id for c, _ in self.claims()}
        for p in [*self.tmp.iterdir(), *(p for p in self.jobs.iterdir() if p.name[:12] not in live)]:
            with _quiet():
                if now - os.lstat(p).st_mtime > 86400:
                    p.unlink()
        if retention_days <= 0:
            return 0
        with os.scandir(self.archive) as entries:
            for e in entries:
                with _quiet():
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and now - st.st_mtime > retention_days * 86400:
                        os.unlink(e.path)
                        removed += 1
        return removed

    # --- helpers ----------------------------------------------------------------------------------------

    def _make(self, name: str, job: str, attempt: int) -> Claim:
        tail = f"__{self.node}_{job}_a{attempt}_p{os.getpid()}".encode()
        raw = os.fsencode(name)
        short = _fit(raw, NAME_MAX - len(tail) - 2)
        trunc = short != raw
        pname = os.fsdecode(short + tail + (b"_t" if trunc else b""))
        return Claim(job, self.node, attempt, name, self.processing / pname, os.getpid(), trunc)

    def _rename(self, src: Path, dst: Path, trust_dst: bool = False) -> bool:
        """One rename; False when the source is gone (lost race). A lost NFS reply can report failure
        (or ENOENT on the retransmission) for a rename that happened: a unique ``dst`` that exists
        afterwards proves success. ``trust_dst`` only where no other node could create ``dst``."""
        try:
            os.rename(src, dst)
            return True
        except OSError as e:
            if (trust_dst or e.errno not in (errno.ENOENT, errno.ESTALE)) and os.path.lexists(dst):
                logger.debug("rename of {} reported {} but it happened", src.name, e.strerror)
                return True
            if e.errno in (errno.ENOENT, errno.ESTALE):
                return False
            raise

    def _archive(self, claim: Claim) -> Path:
        dest = self.archive / os.fsdecode(_fit(os.fsencode(f"{claim.job_id}.{claim.original_name}"), NAME_MAX - 12))
        if not self._rename(claim.path, dest):
            self._unhold(claim)
            raise ClaimLost(f"job {claim.job_id} was taken over before its original could be archived")
        self._forget_job(claim.job_id)
        self._unhold(claim)
        return dest

    def _to_failed(self, src: Path, name: str, job: str, report: dict[str, Any], unique: bool = False) -> Path | None:
        """Original to failed/<job>.<name>, then its report. The report is stashed in .smapd/jobs first,
        so if we die between the two renames ``repair`` publishes it: exactly one report (inv. 2)."""
        dest = self.failed / os.fsdecode(_fit(os.fsencode(f"{job}.{name}"), NAME_MAX - len(REPORT_SUFFIX)))
        stash = self._job_file(job, f"failed-{uuid.uuid4().hex[:6]}")
        self._write_json(stash, report)
        if not self._rename(src, dest, trust_dst=unique):
            stash.unlink(missing_ok=True)
            return None
        self._write_json(Path(f"{dest}{REPORT_SUFFIX}"), report)
        self._forget_job(job)
        return dest

    def _failure(self, name: str, job: str, attempt: int, error: str, attempts: list[dict[str, Any]]) -> dict[str, Any]:
        raw = os.fsencode(name)
        return {"outcome": "failed", "error": error,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "input": {"name": _display(name), **({} if _display(name) == name else {"raw": list(raw)})},
                "job": {"id": job, "attempt": attempt, "node": self.node}, "attempts": attempts}

    def _reserve(self, stem: str, job: str) -> bool:
        path = self.stems / stem
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            try:
                return path.read_text() == job  # ours already (a retried create after a lost reply)
            except OSError:
                return False
        try:
            with open(fd, "w") as f:
                f.write(job)
        except OSError:  # disk full: an empty reservation would block this stem forever
            path.unlink(missing_ok=True)
            raise
        return True

    def _reserved_stem(self, job: str) -> str | None:
        with os.scandir(self.stems) as entries:  # only jobs in flight: a short list
            for e in entries:
                with _quiet():
                    if Path(e.path).read_text() == job:
                        return e.name
        return None

    def _forget_job(self, job: str) -> None:
        stem = self._reserved_stem(job)
        for p in [*self.jobs.glob(f"{job}.*"), *([self.stems / stem] if stem is not None else [])]:
            p.unlink(missing_ok=True)

    def _job_file(self, job: str, what: str) -> Path:
        return self.jobs / f"{job}.{what}.json"

    def _record(self, c: Claim, how: str) -> Claim:
        """Write this attempt's record (best effort: a missing one is reported as such)."""
        with _quiet():
            self._write_json(self._job_file(c.job_id, f"a{c.attempt}"), {
                "attempt": c.attempt, "node": c.node, "pid": c.pid, "at": self.spool_now(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "how": how})
        return dataclasses.replace(c, history=tuple(self.attempts(c)))

    def _write_json(self, path: Path, obj: Any) -> None:
        atomic_write(path, _json_bytes(obj), self.tmp)

    def _key(self, c: Claim) -> tuple[str, str, int]:
        return (str(self.root), c.job_id, c.attempt)

    def abandon(self, claim: Claim) -> None:
        """This process stops working on ``claim`` (its job hit a transient error) and stops
        refreshing it: once the lease runs out, any node, this one included, recovers it as the
        next attempt."""
        self._unhold(claim)
        with _HELD_LOCK:
            _ABANDONED.add(self._key(claim))

    def _hold(self, c: Claim) -> None:
        with _HELD_LOCK:
            _HELD.add(self._key(c))

    def _unhold(self, c: Claim) -> None:
        with _HELD_LOCK:
            _HELD.discard(self._key(c))

    def _held(self, c: Claim) -> bool:
        with _HELD_LOCK:
            return self._key(c) in _HELD


def _with_job(name: str, job: str) -> str:
    p = Path(name)
    return f"{p.stem}.{job}{p.suffix}" if p.stem else f"{name}.{job}"


class _quiet:
    """Ignore OSError/ValueError for best-effort housekeeping (a file another node removed first, ...)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, (OSError, ValueError))
