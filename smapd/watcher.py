"""watchdog observer on inbox/ -> "this name may be ready" hints. No business logic.

Events are hints for latency only; the daemon's periodic rescan is the truth (on NFS, inotify sees
only this machine's writes). Close-write and moved-to mean the writer is done (``ready=True``);
created/modified mean "changed, let it settle" (``ready=False``). Only this module imports watchdog.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from loguru import logger
from watchdog.events import (
    DirMovedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

MODES = ("auto", "inotify", "polling")
POLL_SECONDS = 1.0


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: str, on_hint: Callable[[str, bool], None]) -> None:
        self.inbox = inbox
        self.on_hint = on_hint

    def _name(self, path: str | bytes) -> str | None:
        path = os.fsdecode(path)
        parent = os.path.dirname(path)
        if parent == self.inbox:
            return os.path.basename(path)
        if os.path.dirname(parent) == self.inbox:  # profiles (issue 11): inbox/<profile>/<name>
            return f"{os.path.basename(parent)}/{os.path.basename(path)}"
        return None

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, (FileMovedEvent, DirMovedEvent)):
            name, ready = self._name(event.dest_path), not event.is_directory  # moved-to: the writer is done
        elif isinstance(event, FileClosedEvent):
            name, ready = self._name(event.src_path), True
        elif event.event_type in ("created", "modified"):
            name, ready = self._name(event.src_path), False
        else:
            return
        if not name:
            return
        try:
            self.on_hint(name, ready)
        except Exception as e:  # noqa: BLE001 - a failing callback must not kill the observer thread
            logger.opt(exception=e).error("inbox hint for {!r} failed: {}", name, e)


def _observer(mode: str) -> BaseObserver:
    if mode == "polling":
        # lstat and scandir: the poller never follows a symlink dropped into inbox/.
        return PollingObserverVFS(os.lstat, os.scandir, polling_interval=POLL_SECONDS)
    from watchdog.observers.inotify import InotifyObserver  # Linux only; ImportError elsewhere

    # Full events: a rename from outside inbox/ (the safe way to drop a file) arrives as a move, which
    # means "ready", instead of as a plain create.
    return InotifyObserver(timeout=POLL_SECONDS, generate_full_events=True)


class InboxWatcher:
    """Watches one directory and its sub-folders (profile drop folders; hints for deeper entries are
    dropped) and calls ``on_hint(name, ready)`` from its thread, ``name`` as ``<folder>/<name>`` in a
    sub-folder.

    Args:
        inbox: The directory to watch.
        on_hint: Called with the entry's name and whether the writer is known to be done.
        mode: ``inotify``, ``polling``, or ``auto`` (inotify, falling back to polling where inotify is
            missing or out of watches, with a warning).
    """

    def __init__(self, inbox: Path, on_hint: Callable[[str, bool], None], mode: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"watch mode {mode!r} is not one of {', '.join(MODES)}")
        self.inbox = Path(inbox).resolve()
        self.mode = mode
        self._handler = _Handler(str(self.inbox), on_hint)
        self._observer: BaseObserver | None = None

    @property
    def kind(self) -> str:
        """The mode in use: ``inotify`` or ``polling`` (empty before start)."""
        if self._observer is None:
            return ""
        return "polling" if isinstance(self._observer, PollingObserverVFS) else "inotify"

    def start(self) -> None:
        """Start observing. Raises OSError (or ImportError) when ``inotify`` was asked and fails."""
        try:
            self._observer = self._start("polling" if self.mode == "polling" else "inotify")
        except (OSError, ImportError) as e:
            if self.mode == "inotify":
                raise
            logger.warning("inotify is not available for {} ({}); polling every {:g} s instead",
                           self.inbox, e, POLL_SECONDS)
            self._observer = self._start("polling")

    def _start(self, mode: str) -> BaseObserver:
        observer = _observer(mode)
        observer.schedule(self._handler, str(self.inbox), recursive=True)  # profile folders (issue 11)
        try:
            observer.start()  # inotify_init/add_watch happen here: ENOSPC when out of watches
        except BaseException:
            observer.stop()
            raise
        return observer

    def stop(self, timeout: float = 5.0) -> None:
        """Stop observing and join the observer's threads (idempotent)."""
        observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=timeout)
