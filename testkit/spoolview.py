"""A spool read from the outside, as a user or another machine sees it: drops, states, claims, reports.

The names of claimed and finished entries are parsed in one place, :func:`parse_name`, with the
spool's own parser (smapd.spool.names: one definition of the format, DESIGN §1):

- processing/: ``<orig>__<node>_<job>_a<attempt>_p<pid>[_t]`` (``_t``: ``<orig>`` was shortened);
- archive/ and failed/: ``<job>.<orig>`` (``<orig>`` shortened when the whole would pass 243 bytes),
  and failed/ also holds ``<job>.<orig>.report.json``.

A shortened name's full original is in its report (``input.name``, ``input.raw`` for bytes that are
not UTF-8), which is how :meth:`SpoolView.reports_for` finds an input.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from smapd.spool import names
from testkit.procs import wait_for
from testkit.text import word_recall

if TYPE_CHECKING:
    from testkit.node import Node

STATES = ("inbox", "processing", "archive", "failed")  # where a dropped file can be (DESIGN §1 inv. 1)
REPORT_SUFFIX = names.REPORT_SUFFIX
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", "~")


@dataclass(frozen=True)
class Name:
    """What an entry's name in processing/, archive/ or failed/ says about it."""

    original: str  # the dropped name (shortened if ``truncated`` or too long for archive/)
    job: str
    node: str | None = None  # processing/ only
    attempt: int | None = None  # processing/ only
    pid: int | None = None  # processing/ only
    truncated: bool = False


def parse_name(state: str, name: str) -> Name | None:
    """Parse a claimed (``processing``) or finished (``archive``, ``failed``) entry's name.

    Args:
        state: the directory it is in.
        name: its name there (str, surrogate-escaped like ``os.listdir`` gives it).

    Returns:
        The parts, or None for a name that is not of that directory's format (a report in failed/,
        a stray file).
    """
    if state == "processing":
        c = names.parse_claim(name)
        return None if c is None else Name(c.original, c.job_id, c.node, c.attempt, c.pid, c.truncated)
    if state in ("archive", "failed"):
        final = names.parse_final(name)
        if final is None or (state == "failed" and name.endswith(REPORT_SUFFIX)):
            return None
        return Name(final[1], final[0])
    raise ValueError(f"{state}/ names are not parsed (inbox/ names are the dropped names)")


def display(name: str) -> str:
    """How reports show a name: undecodable bytes as U+FFFD (the exact bytes stay in the archived name)."""
    return os.fsencode(name).decode("utf-8", "replace")


def input_name(report: dict[str, Any]) -> str:
    """The dropped name a report is about (exact bytes where the report has them)."""
    job = report.get("job") or {}
    if job.get("original_name"):
        return str(job["original_name"])
    inp = report.get("input") or {}
    return os.fsdecode(bytes(inp["raw"])) if inp.get("raw") else str(inp.get("name"))


def is_ignored(name: str) -> bool:
    """Names a writer uses while a file is incomplete (DESIGN §1 inv. 8): never claimed."""
    return name.startswith(".") or name.endswith(TEMP_SUFFIXES)


class Outcome(NamedTuple):
    """Where an input's report is (``outbox`` or ``failed``), the report, and its .txt (or "")."""

    where: str
    report: dict[str, Any]
    text: str


class SpoolView:
    """The test's side of a spool: drop files the ways users do, see where they are, wait for reports.

    Args:
        root: the spool directory.
        nodes: the nodes serving it: their log tails go into timeout messages.
        expect_alive: after each outcome, assert that every one of ``nodes`` is still running.
    """

    def __init__(self, root: Path, nodes: Sequence[Node] = (), expect_alive: bool = False) -> None:
        self.root = Path(root)
        self.inbox, self.processing, self.outbox, self.archive, self.failed = (
            self.root / d for d in ("inbox", "processing", "outbox", "archive", "failed"))
        self.nodes = tuple(nodes)
        self.expect_alive = expect_alive
        self.dropped: list[str] = []  # every name :meth:`drop` dropped, in order (repeats kept)

    @property
    def stage(self) -> Path:
        """A directory next to the spool (the same filesystem for a plain directory) for files to link or
        rename in from outside."""
        stage = self.root.parent / f"{self.root.name}-stage"
        stage.mkdir(exist_ok=True)
        return stage

    # --- dropping ----------------------------------------------------------------------------------------

    def drop(self, src: Path, name: str | bytes) -> float:
        """Copy ``src`` to a hidden temp name in inbox/, then rename it to ``name`` (the documented safe way).

        Returns:
            The monotonic time of the rename.
        """
        dest = self.inbox / (os.fsdecode(name) if isinstance(name, bytes) else name)
        tmp = self.inbox / f".drop-{time.monotonic_ns()}.part"
        try:
            shutil.copyfile(src, tmp)
            os.rename(tmp, dest)
        except OSError:
            tmp.unlink(missing_ok=True)  # nothing half-written stays behind (a full disk)
            raise
        self.dropped.append(dest.name)
        return time.monotonic()

    # --- where things are ----------------------------------------------------------------------------

    def listdir(self, state: str) -> list[str]:
        """Names in one of the spool's directories ([] if it does not exist)."""
        try:
            return os.listdir(self.root / state)
        except FileNotFoundError:
            return []

    def in_inbox(self, name: str) -> bool:
        """Whether ``name`` is (still) in inbox/."""
        return name in self.listdir("inbox")

    def claims(self) -> list[str]:
        """The names in processing/."""
        return self.listdir("processing")

    def claim_names(self) -> list[Name]:
        """The claims in processing/, parsed (names of another format are left out)."""
        return [n for n in (parse_name("processing", c) for c in self.claims()) if n is not None]

    def claims_of(self, node: str | None = None) -> list[str]:
        """Original names claimed by ``node`` (any node if None)."""
        return [c.original for c in self.claim_names() if node is None or c.node == node]

    def where(self, names_by_job: Mapping[str, str] | None = None) -> dict[str, list[str]]:
        """Dropped name -> every state it is found in (inv. 1: exactly one), temp names in inbox/ left out.

        Read in reverse flow order (failed/, archive/, processing/, inbox/), so a file moving forward
        during the read is never seen twice. ``names_by_job`` (job id -> full name, from the reports)
        puts shortened names back together."""
        found: dict[str, list[str]] = defaultdict(list)
        for state in reversed(STATES):
            for n in self.listdir(state):
                if state == "inbox":
                    if not is_ignored(n):
                        found[n].append(state)
                    continue
                parsed = parse_name(state, n)
                if parsed is not None:
                    found[(names_by_job or {}).get(parsed.job, parsed.original)].append(state)
        return found

    def locations(self, name: str) -> list[str]:
        """The states ``name`` is in (see :meth:`where`)."""
        return self.where().get(name, [])

    def finished(self) -> set[str]:
        """Dropped names in archive/ or failed/."""
        return {n for n, states in self.where().items() if "archive" in states or "failed" in states}

    def archived(self, job_id: str) -> list[str]:
        """archive/ names of one job."""
        return [n for n in self.listdir("archive") if (p := parse_name("archive", n)) and p.job == job_id]

    def node_status(self, node: str) -> dict[str, Any] | None:
        """A node's last heartbeat (.smapd/nodes/<node>.json) with its file's ``mtime``, or None."""
        path = self.root / ".smapd" / "nodes" / f"{node}.json"
        try:
            return {**json.loads(path.read_bytes()), "mtime": path.stat().st_mtime}
        except (FileNotFoundError, ValueError):
            return None

    # --- reports -----------------------------------------------------------------------------------------

    def report_files(self) -> list[Path]:
        """Every published report, outbox/ and failed/ (temp and dot names left out)."""
        return [self.root / where / n for where in ("outbox", "failed") for n in self.listdir(where)
                if n.endswith(REPORT_SUFFIX) and not n.startswith(".")]

    def reports(self) -> list[tuple[str, dict[str, Any]]]:
        """``(where, report)`` of every published report.

        Raises:
            AssertionError: a report that is not complete JSON (inv. 3: no reader sees a half-written file).
        """
        out = []
        for path in self.report_files():
            try:
                out.append((path.parent.name, json.loads(path.read_bytes())))
            except FileNotFoundError:
                continue
            except ValueError as e:
                raise AssertionError(f"{path.parent.name}/{path.name} is not complete JSON") from e
        return out

    def reports_for(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        """The reports about the dropped ``name``."""
        return [(w, r) for w, r in self.reports() if input_name(r) in (name, display(name))]

    def outcome(self, name: str | bytes, timeout: float = 90) -> Outcome:
        """Wait for ``name``'s report; its place, the report and its .txt.

        Raises:
            AssertionError: no report within ``timeout`` (the nodes' log tails in the message), or
                ``expect_alive`` and a node died.
        """
        name = os.fsdecode(name) if isinstance(name, bytes) else name
        found: list[tuple[str, dict[str, Any]]] = []

        def look() -> bool:
            found[:] = self.reports_for(name)
            return bool(found)

        if not wait_for(look, timeout, 0.1):
            raise AssertionError(f"no report for {name!r} within {timeout} s\n{self.log_tails()}")
        if self.expect_alive:
            dead = [n.name for n in self.nodes if not n.alive()]
            assert not dead, f"node(s) {dead} died:\n{self.log_tails()}"
        where, report = found[0]
        return Outcome(where, report, self.text(report))

    def text(self, report: dict[str, Any]) -> str:
        """The .txt a report lists ("" if none)."""
        txt = (report.get("outputs") or {}).get(".txt")
        with contextlib.suppress(FileNotFoundError):
            return (self.outbox / txt).read_text(encoding="utf-8") if txt else ""
        return ""

    def failed_with(self, name: str | bytes, fragment: str, timeout: float = 90) -> dict[str, Any]:
        """Wait for ``name`` to fail with ``fragment`` in a one-line error; its report."""
        where, report, _ = self.outcome(name, timeout)
        assert where == "failed", (name, report.get("outcome"), report.get("error"))
        assert report["outcome"] == "failed" and fragment in (report["error"] or ""), (name, report["error"])
        assert "Traceback" not in report["error"]
        return report

    def transcribed(self, name: str | bytes, reference: str | None = None, recall: float = 0.6,
                    timeout: float = 90) -> dict[str, Any]:
        """Wait for ``name`` to be a success with one report and its original archived; its report.

        Args:
            reference: if given, the transcript must hold at least ``recall`` of its words.
        """
        where, report, text = self.outcome(name, timeout)
        assert where == "outbox" and report["outcome"] == "success", (name, report.get("error"))
        shown = os.fsdecode(name) if isinstance(name, bytes) else name
        assert len(self.reports_for(shown)) == 1, f"inv. 2: more than one report for {name!r}"
        # the report is published first, then the original is archived (the finish order)
        assert wait_for(lambda: len(self.archived(report["job"]["id"])) == 1, 10), \
            f"{name!r}: not archived after its report"
        if reference is not None:
            assert word_recall(reference, text) >= recall, (name, text)
        return report

    def log_tails(self, chars: int = 2500) -> str:
        """The end of every node's log, for a failure message."""
        return "\n".join(f"--- {n.name}\n{n.log_text()[-chars:]}" for n in self.nodes)


