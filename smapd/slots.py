"""Engine slots: the stoppable things the pool's threads drive, one chunk at a time.

A thread cannot be killed, and a timeout that only stops waiting leaves the chunk burning a core
(DESIGN.md §4), so every slot can be stopped from outside: a ``ProcessSlot`` is a long-lived
worker process holding the model (killed with its process group and replaced on timeout or
crash); a ``CommandSlot`` runs an external program per chunk in its own process group.
Requests and replies are the typed messages of ``smapd.worker``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Protocol

from smapd import worker as wire
from smapd.command import CommandEngine, kill_group
from smapd.engine import EngineSpec
from smapd.errors import ChunkError, ChunkTimeout, ConfigError, WorkerDied
from smapd.worker import Failed, Reply, Stats, TranscribeRequest

_LOAD_TIMEOUT = 600.0  # loading a large model from a slow disk can take minutes


class Slot(Protocol):
    """One engine slot. Only its own pool thread calls it, except ``terminate`` (any thread)."""

    name: str
    chunks_served: int  # requests answered since the last (re)start
    rss_mb: float  # resident memory after the last request (0 when unknown)
    max_rss_mb: float  # peak resident memory over every life of the slot
    recyclable: bool  # True when restarting frees memory (a worker process that holds the model)

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None:
        """Boot the slot (load the model). Raises ConfigError when it cannot."""

    def run(self, request: TranscribeRequest, timeout: float) -> Reply:
        """Answer one request within ``timeout`` seconds.

        Raises:
            ChunkTimeout: no answer in time; the work was killed.
            WorkerDied: the worker exited before answering.
            ChunkError: the engine failed on this request (the slot lives on).
        """

    def restart(self) -> None:
        """Kill what runs and boot afresh (after a timeout or a crash)."""

    def recycle(self) -> None:
        """End the slot gently and boot afresh (served its quota, grew too large)."""

    def terminate(self) -> None:
        """Kill the running work now, from any thread; the slot's own thread sees the failure."""

    def close(self) -> None:
        """End the slot for good."""


class ProcessSlot:
    """A worker process that loads the engine once and serves chunks until killed."""

    recyclable = True

    def __init__(self, name: str, spec: EngineSpec) -> None:
        self.name = name
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.chunks_served = 0
        self.rss_mb = 0.0
        self.max_rss_mb = 0.0
        self._rfd = self._wfd = -1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ, SMAPD_WORKER_FDS=f"{to_child_r},{from_child_w}",
                   OMP_NUM_THREADS=str(self.spec.cpu_threads))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smapd.worker"], pass_fds=(to_child_r, from_child_w), env=env,
                stdin=subprocess.DEVNULL, start_new_session=True)  # own process group: killpg reaches all
        except OSError as e:
            os.close(from_child_r)
            os.close(to_child_w)
            raise ConfigError(f"cannot start worker {self.name} ({sys.executable}): {e.strerror}") from e
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._rfd, self._wfd = from_child_r, to_child_w
        self.chunks_served = 0
        deadline = time.monotonic() + _LOAD_TIMEOUT
        try:
            wire.send(self._wfd, self.spec, deadline)
            reply = wire.recv(self._rfd, deadline)
        except (TimeoutError, OSError) as e:
            self.kill()
            raise ConfigError(f"worker {self.name} did not load the model within {_LOAD_TIMEOUT:g} s") from e
        if reply is None:
            code = self.proc.wait()
            self._close_fds()
            raise ConfigError(f"worker {self.name} died while loading the model ({exit_text(code)})")
        if isinstance(reply, Failed):
            self.kill()
            raise ConfigError(reply.error)

    def run(self, request: TranscribeRequest, timeout: float) -> Reply:
        if self.proc is None or self.proc.poll() is not None:
            self.restart()
        deadline = time.monotonic() + timeout
        try:
            wire.send(self._wfd, request, deadline)
            reply: Reply | None = wire.recv(self._rfd, deadline)
        except TimeoutError:
            self.kill()
            raise ChunkTimeout(f"no answer within CHUNK_TIMEOUT={timeout:g} s; worker {self.name} killed") from None
        except OSError:  # EPIPE: the worker died before reading the request
            reply = None
        if reply is None:
            assert self.proc is not None
            code = self.proc.wait()
            self._close_fds()
            self.proc = None
            raise WorkerDied(f"worker {self.name} {exit_text(code)}")
        self.chunks_served += 1
        self.rss_mb = reply.stats.rss_mb
        self.max_rss_mb = max(self.max_rss_mb, reply.stats.max_rss_mb)
        if reply.error is not None:
            raise ChunkError(reply.error)
        return reply

    def restart(self) -> None:
        self.kill()
        self.start()

    def recycle(self) -> None:
        self.close()
        self.start()

    def terminate(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._close_fds()  # EOF tells the worker to exit
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


class CommandSlot:
    """Runs the command engine: one external process per chunk, killed at the timeout."""

    recyclable = False  # nothing stays loaded between chunks

    def __init__(self, name: str, spec: EngineSpec) -> None:
        self.name = name
        self.engine = CommandEngine(spec)
        self.chunks_served = 0
        self.rss_mb = self.max_rss_mb = 0.0

    @property
    def pid(self) -> int | None:
        return None

    def start(self) -> None:
        pass

    def run(self, request: TranscribeRequest, timeout: float) -> Reply:
        t0 = os.times()
        result = self.engine.run(request.audio, request.options, timeout)
        t1 = os.times()
        self.chunks_served += 1
        cpu = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
        return Reply(Stats(cpu_seconds=cpu), transcribed=result)

    def restart(self) -> None:
        pass

    def recycle(self) -> None:
        pass

    def terminate(self) -> None:
        self.engine.terminate()

    def close(self) -> None:
        pass


def exit_text(code: int | None) -> str:
    """How a worker ended, in words: "exited with status 3", "was killed by SIGKILL"."""
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def make_slot(name: str, spec: EngineSpec) -> Slot:
    return CommandSlot(name, spec) if spec.kind == "command" else ProcessSlot(name, spec)
