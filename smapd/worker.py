"""The engine slot's child process: loads the engine once, then serves chunks over a pipe.

Started by ``pool.ProcessSlot`` as ``python -m smapd.worker`` in a new session (its own process
group), so a timeout can SIGKILL it and anything it started. Messages are length-prefixed
pickles on two inherited pipe fds; stdout is never used (libraries print there).
"""
from __future__ import annotations

import os
import pickle
import resource
import select
import struct
import sys
import time
from typing import Any

_HEADER = struct.Struct("!Q")


def _write_all(fd: int, data: bytes, deadline: float | None) -> None:
    # With a deadline the fd must be non-blocking: select() only promises room for one byte, and a
    # blocking write of a 2 MB chunk to a stopped (hung) worker would wait forever.
    os.set_blocking(fd, deadline is None)
    view = memoryview(data)
    while view:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise TimeoutError("write timed out")
        try:
            n = os.write(fd, view[:1 << 20])
        except BlockingIOError:
            continue
        view = view[n:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    parts = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("read timed out")
        block = os.read(fd, min(n, 1 << 20))
        if not block:
            return None  # EOF: the other side is gone
        parts.append(block)
        n -= len(block)
    return b"".join(parts)


def send(fd: int, message: Any, deadline: float | None = None) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    _write_all(fd, _HEADER.pack(len(data)) + data, deadline)


def recv(fd: int, deadline: float | None = None) -> Any:
    """The next message, or None at EOF. Raises TimeoutError past ``deadline`` (monotonic)."""
    header = _read_exact(fd, _HEADER.size, deadline)
    if header is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(header)[0], deadline)
    return None if body is None else pickle.loads(body)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def serve(rfd: int, wfd: int) -> None:
    """Build the engine from the first message, then answer requests until EOF."""
    from smapd.engine import FasterWhisperEngine
    from smapd.errors import SmapdError

    spec = recv(rfd)
    if spec is None:
        return
    started = time.monotonic()
    try:
        engine = FasterWhisperEngine(spec)
    except SmapdError as e:
        send(wfd, ("error", str(e)))
        return
    # One tiny decode now: CTranslate2 sets up its kernels on first use, which would otherwise
    # add a second or two to the first chunk of the first job.
    import numpy as np

    engine.detect_language(np.zeros(16000, dtype=np.float32))
    send(wfd, ("ready", {"pid": os.getpid(), "load_seconds": time.monotonic() - started}))
    while True:
        request = recv(rfd)
        if request is None:
            return
        kind, payload = request
        cpu0 = time.process_time()
        try:
            if kind == "detect":
                result: Any = engine.detect_language(payload["audio"])
            elif kind == "transcribe":
                result = engine.transcribe(payload["audio"], payload["options"], payload.get("speech", ()))
            else:
                raise ValueError(f"unknown request {kind!r}")
            reply = ("ok", result)
        except Exception as e:  # noqa: BLE001 - reported to the parent as this chunk's error
            reply = ("error", f"{type(e).__name__}: {e}")
        stats = {"cpu": time.process_time() - cpu0, "rss_mb": _rss_mb(), "language": getattr(engine, "detected", None),
                 "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        send(wfd, (*reply, stats))


def main() -> None:
    rfd, wfd = (int(x) for x in os.environ["SMAPD_WORKER_FDS"].split(","))
    sys.stdout = sys.stderr  # a stray print must not reach the parent as protocol bytes
    serve(rfd, wfd)


if __name__ == "__main__":
    main()
