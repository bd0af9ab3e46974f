"""The inbox watcher: real inotify and real polling on temp dirs; hints only, no leaked threads."""
from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smapd import watcher as watcher_mod
from smapd.watcher import InboxWatcher


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    d = tmp_path / "inbox"
    d.mkdir()
    return d


@pytest.fixture
def hints() -> queue.Queue[tuple[str, bool]]:
    return queue.Queue()


@pytest.fixture
def watching(inbox: Path, hints: queue.Queue[tuple[str, bool]],
             request: pytest.FixtureRequest) -> Iterator[InboxWatcher]:
    before = set(threading.enumerate())
    w = InboxWatcher(inbox, lambda name, ready: hints.put((name, ready)), mode=request.param)
    w.start()
    try:
        yield w
    finally:
        w.stop()
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        assert not leaked, f"threads left after stop(): {leaked}"  # daemon threads included


def wait_hint(hints: queue.Queue[tuple[str, bool]], name: str, ready: bool | None, timeout: float) -> float:
    """Seconds until a hint for ``name`` (with ``ready`` if given) arrived; fails after ``timeout``."""
    start = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - start)
        try:
            got = hints.get(timeout=max(0.0, left))
        except queue.Empty:
            pytest.fail(f"no hint ({name!r}, ready={ready}) within {timeout} s")
        if got[0] == name and (ready is None or got[1] == ready):
            return time.monotonic() - start


@pytest.mark.parametrize("watching", ["inotify"], indirect=True)
def test_close_write_of_a_local_file_is_a_ready_hint_within_a_second(
        watching: InboxWatcher, inbox: Path, hints: queue.Queue[tuple[str, bool]]) -> None:
    assert watching.kind == "inotify"
    with open(inbox / "talk.wav", "wb") as f:
        f.write(b"x" * 1000)
        assert wait_hint(hints, "talk.wav", False, 1.0) < 1.0  # created/modified: not yet ready
    assert wait_hint(hints, "talk.wav", True, 1.0) < 1.0


@pytest.mark.parametrize("watching", ["inotify"], indirect=True)
def test_a_rename_into_inbox_is_a_ready_hint(watching: InboxWatcher, inbox: Path, tmp_path: Path,
                                             hints: queue.Queue[tuple[str, bool]]) -> None:
    (inbox / ".talk.wav.part").write_bytes(b"x")
    os.rename(inbox / ".talk.wav.part", inbox / "talk.wav")
    assert wait_hint(hints, "talk.wav", True, 1.0) < 1.0
    (tmp_path / "elsewhere.wav").write_bytes(b"x")
    os.rename(tmp_path / "elsewhere.wav", inbox / "moved.wav")
    assert wait_hint(hints, "moved.wav", True, 1.0) < 1.0


@pytest.mark.parametrize("watching", ["polling"], indirect=True)
def test_polling_finds_a_file_without_inotify(watching: InboxWatcher, inbox: Path,
                                              hints: queue.Queue[tuple[str, bool]]) -> None:
    assert watching.kind == "polling"
    (inbox / "remote.wav").write_bytes(b"x")
    wait_hint(hints, "remote.wav", None, 5.0)
    os.symlink(inbox / "nowhere", inbox / "dangling.wav")  # lstat: a dangling link is still seen
    wait_hint(hints, "dangling.wav", None, 5.0)


@pytest.mark.parametrize("watching", ["inotify"], indirect=True)
def test_a_failing_callback_does_not_stop_the_watcher(inbox: Path, watching: InboxWatcher,
                                                      hints: queue.Queue[tuple[str, bool]]) -> None:
    calls = []

    def flaky(name: str, ready: bool) -> None:
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("boom")
        hints.put((name, ready))
    watching._handler.on_hint = flaky
    (inbox / "a.wav").write_bytes(b"x")
    (inbox / "b.wav").write_bytes(b"x")
    wait_hint(hints, "b.wav", True, 2.0)


def test_auto_falls_back_to_polling_when_inotify_fails(inbox: Path, monkeypatch: pytest.MonkeyPatch,
                                                       hints: queue.Queue[tuple[str, bool]]) -> None:
    real = watcher_mod._observer

    def no_inotify(mode: str) -> object:
        if mode == "inotify":
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return real(mode)
    monkeypatch.setattr(watcher_mod, "_observer", no_inotify)
    before = set(threading.enumerate())
    w = InboxWatcher(inbox, lambda n, r: hints.put((n, r)))
    w.start()
    try:
        assert w.kind == "polling"
        (inbox / "x.wav").write_bytes(b"x")
        wait_hint(hints, "x.wav", None, 5.0)
    finally:
        w.stop()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]
    strict = InboxWatcher(inbox, lambda n, r: None, mode="inotify")
    with pytest.raises(OSError):
        strict.start()
    strict.stop()


def test_stop_is_idempotent_and_bad_modes_are_refused(inbox: Path) -> None:
    w = InboxWatcher(inbox, lambda n, r: None)
    w.stop()
    w.start()
    w.stop()
    w.stop()
    with pytest.raises(ValueError):
        InboxWatcher(inbox, lambda n, r: None, mode="fanotify")
