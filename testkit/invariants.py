"""The DESIGN.md §1 invariants, checked over a spool from the outside (one checker for every test).

``check_spool`` reads the spool once and returns :class:`Findings`; ``Findings.problems`` is empty when
every invariant holds. Mid-run (``final=False``) only what must hold at every instant is checked;
at the end (``final=True``) also that everything finished and nothing was left behind.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from testkit.spoolview import REPORT_SUFFIX, SpoolView, input_name, is_ignored, parse_name


@dataclass(frozen=True)
class Seen:
    """The latest claim of one job seen in processing/ while the run went on (attempt, node)."""

    attempt: int
    node: str


@dataclass
class Findings:
    """What the spool showed. ``problems`` lists every broken invariant, one line each."""

    where: dict[str, list[str]] = field(default_factory=dict)
    reports: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    duplicated: set[str] = field(default_factory=set)
    published_once: set[str] = field(default_factory=set)  # one outbox report, by the job's last attempt
    problems: list[str] = field(default_factory=list)

    def report(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """The one ``(where, report)`` of an input, or None (none, or more than one)."""
        rs = self.reports.get(name, [])
        return rs[0] if len(rs) == 1 else None

    def __bool__(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        return "\n".join(self.problems) or "every invariant holds"


def check_spool(sp: SpoolView, dropped: Collection[str], *, max_attempts: int | None = None,
                final: bool = True, complete: bool = True,
                seen: Mapping[str, Seen] | None = None) -> Findings:
    """Check the spool against DESIGN §1 for the inputs ``dropped``.

    Args:
        sp: the spool.
        dropped: the names dropped into inbox/ (short enough to be kept whole in archive/ names).
        max_attempts: SMAPD_MAX_ATTEMPTS: no report may show more (inv. 7).
        final: the run is over: every input must be in archive/ or failed/, no claim or stem
            reservation left, no file in outbox/ that no report lists.
        complete: ``dropped`` is everything ever dropped: an entry nobody dropped is a problem.
        seen: job id -> the latest claim seen in processing/ during the run; each outbox report must
            come from that attempt and node (inv. 6: a node whose claim was taken over published nothing,
            not even over the later attempt's outputs, which share its job id and stem).

    Returns:
        The findings; ``bool(findings)`` is True when every invariant holds.
    """
    f = Findings(where=dict(sp.where()))
    _placement(f, dropped, final, complete)
    _reports(f, sp, dropped, final)
    _publishers(f, sp, seen or {}, max_attempts)
    if final:
        left = sp.claims()
        if left:
            f.problems.append(f"claims left in processing/: {sorted(left)[:5]}")
        stems = sp.root / ".smapd" / "stems"
        reserved = os.listdir(stems) if stems.is_dir() else []
        if reserved:
            f.problems.append(f"stem reservations left in .smapd/stems: {sorted(reserved)[:5]}")
    return f


def _placement(f: Findings, dropped: Collection[str], final: bool, complete: bool) -> None:
    """Inv. 1: each dropped name in exactly one place; at the end, archive/ or failed/."""
    for name in dropped:
        states = f.where.get(name, [])
        if not states:
            f.lost.append(name)
            f.problems.append(f"{name!r} is lost: in none of inbox/, processing/, archive/, failed/")
        elif len(states) > 1:
            f.duplicated.add(name)
            f.problems.append(f"{name!r} is in {states}")
        elif final and states[0] == "processing":
            f.orphaned.append(name)
            f.problems.append(f"{name!r} is still claimed (processing/)")
        elif final and states[0] == "inbox":
            f.unfinished.append(name)
            f.problems.append(f"{name!r} is still in inbox/")
    unknown = sorted(set(f.where) - set(dropped))
    if complete and unknown:
        f.problems.append(f"entries nobody dropped: {unknown[:5]}")


def _reports(f: Findings, sp: SpoolView, dropped: Collection[str], final: bool) -> None:
    """Inv. 2 and 3: one report per finished input, in the right place; outputs complete and older
    than their report (the report is published last); no temp file in outbox/."""
    listed: set[str] = set()
    by_name: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for path in sp.report_files():
        try:
            report = json.loads(path.read_bytes())
            report_mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            continue
        except ValueError:
            f.problems.append(f"{path.parent.name}/{path.name} is not complete JSON")
            continue
        by_name[input_name(report)].append((path.parent.name, report))
        if path.parent.name != "outbox":
            continue
        listed.add(path.name)
        for out in (report.get("outputs") or {}).values():
            listed.add(out)
            try:
                if os.stat(sp.outbox / out).st_mtime_ns > report_mtime:
                    f.problems.append(f"outbox/{out} was written after its report {path.name}")
            except FileNotFoundError:
                f.problems.append(f"{path.name} lists {out}, which is missing")
    f.reports = dict(by_name)
    failed = set(sp.listdir("failed"))
    for name in failed:
        if not name.endswith(REPORT_SUFFIX) and f"{name}{REPORT_SUFFIX}" not in failed:
            f.problems.append(f"failed/{name} has no report")
    if final:
        outbox = sp.listdir("outbox")
        temps = sorted(n for n in outbox if is_ignored(n))
        if temps:
            f.problems.append(f"temp or partial files in outbox/: {temps[:5]}")
        stray = sorted(n for n in outbox if n not in listed and not is_ignored(n))
        if stray:
            f.problems.append(f"outbox/ files no report lists: {stray[:5]}")
    for name in dropped:
        rs = by_name.get(name, [])
        states = f.where.get(name, [])
        if len(rs) > 1:
            f.duplicated.add(name)
            f.problems.append(f"{name!r} has {len(rs)} reports ({[w for w, _ in rs]})")
        elif not rs and states and states[0] in ("archive", "failed"):
            f.problems.append(f"{name!r} finished in {states[0]}/ without a report")
        elif rs and states and states[0] in ("archive", "failed"):
            where = rs[0][0]
            if (where == "outbox") != (states[0] == "archive"):
                f.problems.append(f"{name!r}: report in {where}/ but the original in {states[0]}/")


def _publishers(f: Findings, sp: SpoolView, seen: Mapping[str, Seen], max_attempts: int | None) -> None:
    """Inv. 6 and 7: every outbox report comes from its job's last attempt (the node that held the
    claim last), its original archived once; no report with more than max_attempts attempts."""
    for name, rs in f.reports.items():
        for where, r in rs:
            job = r.get("job") or {}
            attempt, node, history = job.get("attempt") or 0, job.get("node"), job.get("attempts") or []
            attempts = r.get("attempts") or history  # failed reports list them at the top level
            if max_attempts is not None and max(attempt, len(attempts)) > max_attempts:
                f.problems.append(f"{name!r}: attempt {max(attempt, len(attempts))} > max attempts {max_attempts}")
            if where != "outbox" or len(rs) != 1:
                continue
            last = seen.get(str(job.get("id")))
            why = []
            if history and (history[-1].get("attempt"), history[-1].get("node")) != (attempt, node):
                why.append(f"its attempt log ends with attempt {history[-1].get('attempt')} by "
                           f"{history[-1].get('node')}")
            if last is not None and (last.attempt, last.node) != (attempt, node):
                why.append(f"the last claim seen was attempt {last.attempt} by {last.node}")
            claimed = parse_name("processing", str(job.get("claimed_as") or ""))
            if claimed is not None and (claimed.attempt, claimed.node) != (attempt, node):
                why.append(f"it says it was claimed as {job.get('claimed_as')}")
            archived = len(sp.archived(str(job.get("id"))))
            if archived != 1:
                why.append(f"{archived} archived originals")
            if why:
                f.duplicated.add(name)
                f.problems.append(f"{name!r}: published by attempt {attempt} of node {node}, but "
                                  + "; ".join(why))
            else:
                f.published_once.add(name)
