"""One `smapd run` process serving a spool: started, signalled, killed and restarted like a machine.

Each life logs to its own file (``<logdir>/<name>.<life>.log``), so "ready" is read from this life's
log, never an earlier one's. Workers are found as the daemon's children in /proc (each is the leader
of its own process group, so a kill reaches the engine's children too).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from testkit.paths import REPO
from testkit.procs import children, pid_alive, wait_for
from testkit.spoolview import SpoolView

READY_LINE = "ready: watching"


class NodeFailed(RuntimeError):
    """A node did not become ready (or died while starting); the message ends with its log."""


class Node:
    """A restartable `smapd run` serving ``spool`` as node ``name``.

    Args:
        name: SMAPD_NODE.
        spool: SMAPD_SPOOL_DIR.
        logdir: where each life's log goes.
        env: the environment (see :func:`testkit.env.daemon_env`); SMAPD_SPOOL_DIR and SMAPD_NODE are added.
        prefix: a command to run the daemon under (e.g. ``setpriv ... --``); it must exec, keeping the pid.
    """

    def __init__(self, name: str, spool: Path, logdir: Path, env: Mapping[str, str],
                 prefix: Sequence[str] = ()) -> None:
        self.name, self.spool, self.logdir = name, Path(spool), Path(logdir)
        self.env = dict(env, SMAPD_SPOOL_DIR=str(spool), SMAPD_NODE=name)
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0
        self.stopped = False
        self.logs: list[Path] = []

    # --- life and death ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start a new life (not waiting for it to be ready)."""
        self.lives += 1
        path = self.logdir / f"{self.name}.{self.lives}.log"
        self.logs.append(path)
        with open(path, "wb") as f:
            self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "smapd.cli", "run"], env=self.env,
                                         stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        self.stopped = False

    def wait_ready(self, timeout: float = 120) -> bool:
        """True once this life's log says it is ready; False if it died first or ``timeout`` passed."""
        return wait_for(lambda: not self.alive() or READY_LINE in self.life_log(), timeout, 0.1) and self.alive()

    def launch(self, timeout: float = 120) -> Node:
        """Start a life and wait until it is ready.

        Raises:
            NodeFailed: not ready within ``timeout`` (the node is killed; the message has its log's tail).
        """
        self.start()
        if not self.wait_ready(timeout):
            tail = self.log_text()[-3000:]
            self.kill9()
            raise NodeFailed(f"node {self.name} did not become ready within {timeout} s:\n{tail}")
        return self

    def kill9(self) -> None:
        """SIGKILL the daemon and every worker's process group: what a crashed machine leaves.

        A stopped daemon or worker dies too (SIGKILL needs no SIGCONT)."""
        if self.proc is None:
            return
        for w in self.workers():
            with contextlib.suppress(OSError):
                os.killpg(w, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.stopped = False

    def terminate(self, timeout: float = 30) -> int | None:
        """SIGTERM (a graceful stop), then SIGKILL if it does not exit in ``timeout`` s; the exit status."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.cont()
        workers = self.workers()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for w in workers:
            with contextlib.suppress(OSError):
                os.killpg(w, signal.SIGKILL)
        return self.proc.returncode

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the daemon process itself."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGSTOP the daemon (not its workers): a node that hangs, or a VM paused."""
        self.send(signal.SIGSTOP)
        self.stopped = self.alive()

    def cont(self) -> None:
        """SIGCONT the daemon."""
        self.send(signal.SIGCONT)
        self.stopped = False

    # --- looking at it ---------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The daemon's pid in its current (or last) life."""
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        """Whether the current life is running (a stopped process counts as alive)."""
        return self.proc is not None and self.proc.poll() is None

    def workers(self) -> list[int]:
        """Pids of the daemon's live children (its engine workers), from /proc."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [c for c in children(self.proc.pid) if pid_alive(c)]

    def signal_workers(self, sig: signal.Signals, expect: int | None = None, timeout: float = 30) -> list[int]:
        """Send ``sig`` to every worker's process group, once there are ``expect`` of them (or any).

        Raises:
            AssertionError: no such workers within ``timeout``.
        """
        found: list[int] = []

        def look() -> bool:
            found[:] = self.workers()
            return bool(found) and (expect is None or len(found) == expect)

        assert wait_for(look, timeout), f"node {self.name}: workers {found}, expected {expect or 'some'}"
        for w in found:
            os.killpg(w, sig)
        return found

    def life_log(self) -> str:
        """The log of the current life."""
        return self.logs[-1].read_text(errors="replace") if self.logs and self.logs[-1].exists() else ""

    def log_text(self) -> str:
        """The logs of every life, in order."""
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def log_has(self, text: str, timeout: float) -> bool:
        """Wait until ``text`` appears in any life's log; True if it did within ``timeout``."""
        return wait_for(lambda: text in self.log_text(), timeout, 0.05)


def kill_all(*nodes: Node) -> None:
    """kill -9 every node with its workers (finalizers: never raises for a node already dead)."""
    for n in nodes:
        n.kill9()


def serve(root: Path, env: Mapping[str, str], name: str = "n1", prefix: Sequence[str] = (),
          timeout: float = 120) -> tuple[Node, SpoolView]:
    """One ready node on a fresh spool ``root/spool`` (logs in ``root``), and the view of that spool,
    which checks after each outcome that the node is still alive.

    Raises:
        NodeFailed: the node did not become ready.
    """
    spool = Path(root) / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    node = Node(name, spool, Path(root), env, prefix).launch(timeout)
    return node, SpoolView(spool, nodes=(node,), expect_alive=True)
