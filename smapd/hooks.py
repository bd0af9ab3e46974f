"""The completion hook (``SMAPD_ON_DONE``): a command run after each job is published or failed.

The template is split into an argument vector (shlex, POSIX rules) once, at start, and each
placeholder is substituted inside its own argument afterwards. No shell is involved, so a dropped
file named ``$(touch pwned).wav`` or ``a;b.wav`` reaches the hook as one plain argument.

Delivery is *at least once*, across nodes and crashes, with an intent file per job in
``.smapd/hooks/``:

- ``<job>.json`` is written when a node claims the job (before any work), so it exists whenever
  the job can finish;
- the node that finishes the job claims the intent with one rename to ``<job>.json.<node>-<pid>``,
  runs the hook and deletes the marker;
- if that node dies before or while the hook runs, ``sweep`` (every node, periodically) finds the
  intent of a job that is finished and no longer claimed, or a marker whose owner is dead, claims it
  with one rename and runs the hook again. A hook can therefore run twice for one job (once cut short
  by the crash), never zero times. A job handed back to inbox/ at shutdown drops its intent: it is
  claimed again as a new job.

A hook that fails or hangs never changes the job's outcome and never blocks the daemon: hooks run on
their own two threads, each in its own process group, killed as a group at ``SMAPD_HOOK_TIMEOUT``.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loguru import logger

PLACEHOLDERS = ("report", "outcome", "input", "stem", "job", "node", "spool")
_FIELD = re.compile(r"\{([^{}]*)\}")
_OUTPUT_LINES = 20  # lines of a hook's output that reach the log
_JOB_RE = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True)
class HookEvent:
    """What a hook is told about one finished job."""

    job: str
    outcome: str  # success | partial | failed
    report: str  # absolute path of the job's report
    input: str  # the name the file was dropped as
    stem: str  # the outputs' stem in outbox/ ("" when failed)
    node: str  # the node that finished it

    def values(self, spool: Path) -> dict[str, str]:
        return {**{k: str(v) for k, v in asdict(self).items()}, "spool": str(spool)}


def parse_template(template: str) -> list[str]:
    """Split ``template`` into argv and check its placeholders (Settings validates SMAPD_ON_DONE with it).

    Raises:
        ValueError: unbalanced quotes, no command, or a placeholder smapd does not know.
    """
    try:
        argv = shlex.split(template)
    except ValueError as e:
        raise ValueError(f"cannot split it into arguments ({e})") from None
    if not argv:
        raise ValueError("no command")
    for arg in argv:
        for name in _FIELD.findall(arg):
            if name not in PLACEHOLDERS:
                raise ValueError(f"unknown placeholder {{{name}}}; allowed: "
                                 f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    return argv


def expand(argv: list[str], values: Mapping[str, str]) -> list[str]:
    """Substitute placeholders inside each argument; a value never splits or joins arguments."""
    return [_FIELD.sub(lambda m: values[m.group(1)], arg) for arg in argv]


class Hooks:
    """Runs the completion hook for this node and recovers hooks other nodes could not run.

    Args:
        template: ``SMAPD_ON_DONE`` (already validated by ``parse_template``).
        timeout: Seconds a hook may run before its process group is killed.
        spool: The spool root (for ``{spool}``).
        intents: ``.smapd/hooks/``.
        node: This node's name.
        write: The spool's atomic write, ``write(path, data)``.
    """

    def __init__(self, template: str, timeout: float, spool: Path, intents: Path, node: str,
                 write: Callable[[Path, bytes], None]) -> None:
        self.argv = parse_template(template)
        self.timeout, self.spool, self.dir, self.node = timeout, spool, intents, node
        self._write = write
        self._mine = f"{node}-{os.getpid()}"
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="smapd-hook")
        self._lock = threading.Lock()
        self.ran = 0  # hooks this process ran (for metrics)
        self.failed = 0  # of those, how many exited non-zero or timed out
        self._running: set[futures.Future[None]] = set()

    # --- the intent, from claim to finish ---

    def expect(self, job: str, name: str, profile: str | None = None) -> None:
        """The job was claimed: record that a hook is owed when it finishes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        intent = {"job": job, "input": name, "profile": profile}
        self._write(self.dir / f"{job}.json", json.dumps(intent, ensure_ascii=True).encode() + b"\n")

    def forget(self, job: str) -> None:
        """The job was handed back unfinished: no hook is owed for this job id."""
        (self.dir / f"{job}.json").unlink(missing_ok=True)

    def fire(self, event: HookEvent) -> None:
        """The job is finished: claim its intent and run the hook in the background."""
        marker = self._take(self.dir / f"{event.job}.json")
        if marker is not None:
            self._start(event, marker)

    # --- recovery ---

    def sweep(self, live_jobs: set[str], dead_owner: Callable[[str], bool],
              locate: Callable[[Mapping[str, Any]], HookEvent | None]) -> int:
        """Run the hooks a dead or stopped node owed.

        Args:
            live_jobs: Job ids that still have a claim in processing/ (their owner will fire).
            dead_owner: ``dead_owner("<node>-<pid>")``: that process is gone (or its node is).
            locate: Finds a finished job's event from the spool, given its intent (``job``, ``input``,
                ``profile``); None while it is not finished.

        Returns:
            How many hooks were started.
        """
        started = 0
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return 0
        for e in entries:
            job, _, owner = e.name.partition(".json")
            if not _JOB_RE.fullmatch(job) or job in live_jobs:
                continue
            owner = owner.lstrip(".")
            if owner and (owner == self._mine or not dead_owner(owner)):
                continue  # a hook running right now, here or on a live node
            try:
                intent = json.loads(Path(e.path).read_bytes())
            except (OSError, ValueError):
                continue  # taken by another node meanwhile, or torn (never: it is written atomically)
            event = locate(intent)
            if event is None:
                continue  # not finished (or released): pruned with the spool's day-old job files
            marker = self._take(Path(e.path))
            if marker is not None:
                logger.warning("{}: running the completion hook that {} could not run", event.input,
                               owner or "the node that finished it")
                self._start(event, marker)
                started += 1
        return started

    def close(self, wait: float = 5.0) -> None:
        """Stop taking hooks; give running ones ``wait`` seconds (the rest are re-run by a sweep)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            running = set(self._running)
        futures.wait(running, timeout=wait)

    # --- running one hook ---

    def _take(self, path: Path) -> Path | None:
        """Claim an intent or a dead owner's marker with one rename; None when another node won."""
        job = path.name.partition(".json")[0]
        marker = self.dir / f"{job}.json.{self._mine}"
        try:
            os.rename(path, marker)
        except FileNotFoundError:
            return None
        return marker

    def _start(self, event: HookEvent, marker: Path) -> None:
        future = self._executor.submit(self._run, event, marker)
        with self._lock:
            self._running.add(future)
        future.add_done_callback(self._finished)

    def _finished(self, future: futures.Future[None]) -> None:
        with self._lock:
            self._running.discard(future)

    def _run(self, event: HookEvent, marker: Path) -> None:
        argv = expand(self.argv, event.values(self.spool))
        log = logger.bind(job=event.input)
        started = time.monotonic()
        env = {**os.environ, **{f"SMAPD_HOOK_{k.upper()}": v for k, v in event.values(self.spool).items()}}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env)
        except OSError as e:
            log.error("{}: completion hook {} could not start: {}", event.input, argv[0], e.strerror or e)
            self._count(ok=False)
            marker.unlink(missing_ok=True)
            return
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            out, _ = proc.communicate()
        seconds = time.monotonic() - started
        lines = out.decode("utf-8", "replace").splitlines()
        for line in lines[:_OUTPUT_LINES]:
            log.info("{}: hook: {}", event.input, line)
        if len(lines) > _OUTPUT_LINES:
            log.info("{}: hook: ... {} more lines", event.input, len(lines) - _OUTPUT_LINES)
        if timed_out:
            log.error("{}: completion hook killed after {:g} s (SMAPD_HOOK_TIMEOUT)", event.input, self.timeout)
        elif proc.returncode != 0:
            log.error("{}: completion hook exited with {} after {:.1f} s", event.input, proc.returncode, seconds)
        else:
            log.info("{}: completion hook done in {:.1f} s", event.input, seconds)
        self._count(ok=not timed_out and proc.returncode == 0)
        marker.unlink(missing_ok=True)

    def _count(self, ok: bool) -> None:
        with self._lock:
            self.ran += 1
            self.failed += 0 if ok else 1


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
