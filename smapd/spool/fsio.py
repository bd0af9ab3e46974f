"""The spool's file operations that must hold on NFS and across crashes: the one atomic write, the
one publish of a set of outputs (report last), directory fsync, the verified rename and
rename-without-replace, and the fresh stat (open+fstat revalidates NFS attributes).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from smapd.spool.names import REPORT_SUFFIX, fit

OPEN_PROBE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` durable (a rename is not, until its directory is synced)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems (some FUSE) cannot fsync a directory; the rename still holds
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, tmp_dir: Path, *, sync_dir: bool = True) -> None:
    """Write ``data`` so that ``path`` is either absent/old or complete (DESIGN §1 inv. 3).

    The temp file is a dot name (never claimed or read as output, inv. 8) made from the target's
    name, fsynced, then renamed over the target (overwriting it).

    Args:
        path: The final name.
        data: The whole content.
        tmp_dir: Where the temp file is made; must be on the same filesystem (rename does not cross).
        sync_dir: fsync ``path``'s directory afterwards; ``publish`` syncs once for many files instead.
    """
    head = os.fsdecode(fit(os.fsencode(path.name), 100))
    tmp = tmp_dir / f".{head}.tmp-{secrets.token_hex(6)}"
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
    if sync_dir:
        fsync_dir(path.parent)


def publish(directory: Path, stem: str, files: Mapping[str, bytes], report: bytes, tmp_dir: Path) -> dict[str, Path]:
    """Publish ``<stem><suffix>`` for each of ``files``, then ``<stem>.report.json`` last, so a reader
    never sees a half-written file and the report (the "done" marker) vouches only for complete ones.

    An old report of this stem is removed first, so it never vouches for a mix of old and new files.
    The directory is fsynced before the report is renamed in (the outputs' names are durable before
    the marker's) and again after.

    Returns:
        Suffix -> published path, the report under ".report.json".

    Raises:
        OSError: Writing failed (disk full, permissions, ...). Temp files are removed, and so are the
            outputs this call had already put in place, unless the report was.
    """
    if REPORT_SUFFIX in files:
        raise ValueError(f"{REPORT_SUFFIX} is written from the report argument, not from files")
    report_path = directory / f"{stem}{REPORT_SUFFIX}"
    placed: dict[str, Path] = {}
    try:
        report_path.unlink(missing_ok=True)
        for suffix, content in files.items():
            target = directory / f"{stem}{suffix}"
            atomic_write(target, content, tmp_dir, sync_dir=False)
            placed[suffix] = target
        fsync_dir(directory)
        atomic_write(report_path, report, tmp_dir)
        placed[REPORT_SUFFIX] = report_path
    except OSError:
        if REPORT_SUFFIX not in placed:  # no marker: take back what we put there, leave no orphans
            for path in placed.values():
                path.unlink(missing_ok=True)
        raise
    return placed


def json_bytes(obj: Any) -> bytes:
    """The spool's own records (.smapd/: attempt log, name sidecars, node status): ASCII JSON."""
    return (json.dumps(obj, ensure_ascii=True, indent=2, default=str) + "\n").encode("ascii")


def rename_verified(src: Path, dst: Path, trust_dst: bool = False) -> bool:
    """One rename; False when the source is gone (a lost race).

    A lost NFS reply can report failure (or ENOENT on the retransmission) for a rename that happened:
    a unique ``dst`` that exists afterwards proves success. ``trust_dst`` only where no other node
    could create ``dst`` (it names this node, job and attempt).
    """
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


_libc: Any = None


def rename_noreplace(src: Path, dst: Path) -> None:
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


def fresh_stat(path: Path) -> os.stat_result | None:
    """fstat of a freshly opened file (close-to-open: NFS revalidates), None when it is gone.

    Only for entries lstat said are regular; a symlink or FIFO swapped in meanwhile fails
    (O_NOFOLLOW) or opens without blocking (O_NONBLOCK) and is reported by its own mode.
    """
    try:
        fd = os.open(path, OPEN_PROBE)
    except FileNotFoundError:
        return None
    except OSError:  # ELOOP (a symlink now), EACCES, ...: lstat says what it is
        return os.lstat(path)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def fresh_mtime(path: Path) -> float | None:
    """The mtime of ``path`` read through open()+fstat() (NFS revalidates on open; a cached stat
    could make a live lease look expired), None when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)


class quiet:
    """Ignore OSError/ValueError for best-effort housekeeping (a file another node removed first, ...)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, (OSError, ValueError))
