"""The engine slot's child process: loads the engine once, then serves chunks over a pipe.

Started by ``slots.ProcessSlot`` as ``python -m smapd.worker`` in a new session (its own process
group), so a timeout can SIGKILL it and anything it started. Messages are length-prefixed
pickles on two inherited pipe fds; stdout is never used (libraries print there).

The conversation, all in the dataclasses below: the parent sends the ``EngineSpec``; the worker
answers ``Ready`` or ``Failed``; then each ``TranscribeRequest`` gets one
``Reply`` carrying an ``engine.Transcribed`` or an error, and the worker's ``Stats``.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import resource
import select
import struct
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from smapd.engine import DecodeOptions, Transcribed

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


@dataclass(frozen=True)
class TranscribeRequest:
    """Decode one chunk. ``speech`` holds the VAD speech spans in the chunk's own time."""

    audio: np.ndarray
    options: DecodeOptions
    speech: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Ready:
    pid: int
    load_seconds: float


@dataclass(frozen=True)
class Failed:
    """The engine could not be built (the worker exits)."""

    error: str


@dataclass(frozen=True)
class Stats:
    cpu_seconds: float = 0.0  # of this request
    rss_mb: float = 0.0  # resident memory now
    max_rss_mb: float = 0.0  # peak resident memory of the worker's life


@dataclass(frozen=True)
class Reply:
    """The answer to one request: ``transcribed``, or the ``error`` of the engine."""

    stats: Stats = Stats()
    transcribed: Transcribed | None = None
    error: str | None = None  # the engine failed on this request (the worker lives on)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def answer(engine: Any, request: TranscribeRequest) -> Reply:
    """One request against a built engine; any engine error is this request's ``error`` only."""
    try:
        return Reply(transcribed=engine.transcribe(request.audio, request.options, request.speech))
    except Exception as e:  # noqa: BLE001 - reported to the parent as this chunk's error
        return Reply(error=f"{type(e).__name__}: {e}")


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt() parameters


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Set glibc malloc parameters; False where the C library is not glibc (nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in settings)


def one_arena() -> bool:
    """All threads allocate from glibc's main arena; call before the model is loaded.

    CTranslate2 decodes on a thread of its own, whose arena would hand every block over 64 MB
    (each attention layer's 72 MB score buffer) to a fresh mmap() whatever ``keep_freed_memory``
    says.
    """
    return _mallopt((_M_ARENA_MAX, 1))


def keep_freed_memory() -> bool:
    """Keep the memory CTranslate2 frees, so the next layer and chunk reuse it; call after the load.

    By default each attention layer's 72 MB buffer is a fresh mmap() and every one of its pages
    faults in again: ~127,000 page faults and ~0.29 s of system time per 30 s window, on top of
    ~1.5 s of decoding. Without mmap() and trimming (and with ``one_arena``), measured on one
    worker: 7 faults per window, a window ~20% faster, and a peak of 335 MB instead of 377 MB.
    After the model load, not before: the loader's freed buffers would stay as holes in the heap
    (a peak of 497 MB).
    """
    return _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30))


def serve(rfd: int, wfd: int) -> None:
    """Build the engine from the first message, then answer requests until EOF."""
    from smapd.engine import FasterWhisperEngine
    from smapd.errors import SmapdError

    spec = recv(rfd)
    if spec is None:
        return
    keep = one_arena()
    started = time.monotonic()
    try:
        engine = FasterWhisperEngine(spec)
    except SmapdError as e:
        send(wfd, Failed(str(e)))
        return
    if keep:
        keep_freed_memory()
    # No warm-up decode: one (an encoder pass on 1 s of silence) cost ~1.1 s of CPU per worker start
    # and took only ~0.07 s off the first chunk, which still costs ~0.7 s more than the next one
    # (measured in one process, 2 pairs); without it `smapd transcribe` took 0.92x the wall time.
    send(wfd, Ready(os.getpid(), time.monotonic() - started))
    while True:
        request = recv(rfd)
        if request is None:
            return
        cpu0 = time.process_time()
        reply = answer(engine, request)
        stats = Stats(cpu_seconds=time.process_time() - cpu0, rss_mb=_rss_mb(),
                      max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        send(wfd, replace(reply, stats=stats))


def main() -> None:
    rfd, wfd = (int(x) for x in os.environ["SMAPD_WORKER_FDS"].split(","))
    sys.stdout = sys.stderr  # a stray print must not reach the parent as protocol bytes
    serve(rfd, wfd)


if __name__ == "__main__":
    # Run the imported module, not __main__: the reply classes must pickle as smapd.worker.*.
    from smapd import worker  # noqa: PLW0406 - on purpose, see above

    worker.main()
