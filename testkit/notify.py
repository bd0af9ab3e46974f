"""A NOTIFY_SOCKET of our own: what a daemon tells systemd (READY=1, STATUS=, WATCHDOG=1, ...)."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import NamedTuple


class Notice(NamedTuple):
    """One line a daemon sent: when (monotonic), the line, and inbox/'s listing at that moment."""

    t: float
    line: str
    inbox: list[str]


class NotifySocket:
    """A unix datagram socket to pass as NOTIFY_SOCKET; records every line with its arrival time.

    Args:
        path: where to bind it.
        inbox: if given, each notice also records this directory's sorted listing (to tell whether
            READY=1 came before or after a waiting file was claimed).
    """

    def __init__(self, path: Path, inbox: Path | None = None) -> None:
        self.path, self.inbox = Path(path), inbox
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[Notice] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-socket")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            listing = sorted(os.listdir(self.inbox)) if self.inbox is not None and self.inbox.is_dir() else []
            for line in data.decode(errors="replace").splitlines():
                self.messages.append(Notice(time.monotonic(), line, listing))

    def lines(self, prefix: str = "", since: float = 0.0) -> list[str]:
        """The lines starting with ``prefix`` that arrived at or after ``since``."""
        return [m.line for m in list(self.messages) if m.line.startswith(prefix) and m.t >= since]

    def pings(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Arrival times of WATCHDOG=1 in ``[since, until)``."""
        return [m.t for m in list(self.messages) if m.line == "WATCHDOG=1" and since <= m.t < until]

    def close(self) -> None:
        """Stop listening and remove nothing else (the socket file stays for a post-mortem)."""
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> NotifySocket:  # noqa: PYI034 - a final class in practice
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
