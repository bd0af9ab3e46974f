"""watchdog observer on inbox/ -> "this name may be ready" hints. No business logic.

Events are hints for latency only; the daemon's periodic rescan is the truth (on NFS, inotify
sees only this machine's writes). Close-write and moved-to mean the writer is done.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from watchdog.events import FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Path, on_hint: Callable[[str, bool], None]) -> None:
        self.inbox = str(inbox)
        self.on_hint = on_hint

    def _name(self, path: str | bytes) -> str | None:
        path = os.fsdecode(path)
        return os.path.basename(path) if os.path.dirname(path) == self.inbox else None

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileMovedEvent):
            name, ready = self._name(event.dest_path), True
        elif isinstance(event, FileClosedEvent):
            name, ready = self._name(event.src_path), True
        elif event.event_type in ("created", "modified"):
            name, ready = self._name(event.src_path), False
        else:
            return
        if name:
            self.on_hint(name, ready)


class InboxWatcher:
    """Watches one directory (not recursively). ``mode``: auto | inotify | polling."""

    def __init__(self, inbox: Path, on_hint: Callable[[str, bool], None], mode: str = "auto") -> None:
        self.inbox = Path(inbox).resolve()
        self.observer = PollingObserver(timeout=1.0) if mode == "polling" else Observer(timeout=1.0)
        if mode == "inotify" and type(self.observer).__name__ != "InotifyObserver":
            raise RuntimeError("SMAPD_WATCH=inotify but inotify is not available here")
        self.observer.schedule(_Handler(self.inbox, on_hint), str(self.inbox), recursive=False)

    @property
    def kind(self) -> str:
        return type(self.observer).__name__

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=10)
