"""The DESIGN.md §1 invariants, checked over a spool from the outside (one checker for every test).

``check_spool`` reads the spool once and returns :class:`Findings`; ``Findings.problems`` is empty when
every invariant holds. Mid-run (``final=False``) only what must hold at every instant is checked;
at the end (``final=True``) also that everything finished and nothing was left behind.
:func:`chunk_problems` is inv. 10 over one published report: a result for every chunk, or a marked gap.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit.procs import wait_for
from testkit.spoolview import REPORT_SUFFIX, SpoolView, input_name, is_ignored, parse_name

# what a job's checkpoint folder (.smapd/chunks/<job>/) holds: job.json, plan.json, done/<i>.json,
# todo/<i>, audio/<i>.pcm, taken/<i>.<who>.<node hex>; none of it may ever reach outbox/ (inv. 10)
CHECKPOINT_NAME = re.compile(r"^(job\.json|plan\.json|\d+\.json|\d+\.pcm|\d+|\d+\.[ah]\d+\.[0-9a-f]+)$")


@dataclass(frozen=True)
class Seen:
    """The latest claim of one job seen in processing/ while the run went on: its attempt, its node,
    and when it was first seen (``time.time()``; 0: "before anything was published")."""

    attempt: int
    node: str
    since: float = 0.0


@dataclass
class Findings:
    """What the spool showed. ``problems`` lists every broken invariant, one line each."""

    where: dict[str, list[str]] = field(default_factory=dict)
    reports: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    duplicated: set[str] = field(default_factory=set)
    published_once: set[str] = field(default_factory=set)  # outbox reports all by their job's last attempt
    problems: list[str] = field(default_factory=list)
    written: dict[int, float] = field(default_factory=dict, repr=False)  # id(report) -> its file's mtime

    def report(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """The one ``(where, report)`` of an input, or None (none, or more than one)."""
        rs = self.reports.get(name, [])
        return rs[0] if len(rs) == 1 else None

    def __bool__(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        return "\n".join(self.problems) or "every invariant holds"


def check_spool(sp: SpoolView, dropped: Iterable[str] | None = None, *, max_attempts: int | None = None,
                final: bool = True, complete: bool = True, seen: Mapping[str, Seen] | None = None,
                foreign: Collection[str] = ()) -> Findings:
    """Check the spool against DESIGN §1 for the inputs ``dropped``.

    Args:
        sp: the spool.
        dropped: the names dropped into inbox/, a name dropped twice listed twice (default: what
            ``sp.drop`` dropped); a name shortened in processing/ or archive/ is matched through its report.
        max_attempts: SMAPD_MAX_ATTEMPTS: no report may show more (inv. 7).
        final: the run is over: every input must be in archive/ or failed/, no claim or stem
            reservation left, no file in outbox/ that no report lists.
        complete: ``dropped`` is everything ever dropped: an entry nobody dropped is a problem.
        seen: job id -> the latest claim seen in processing/ during the run; each outbox report must
            come from that attempt and node (inv. 6: a node whose claim was taken over published nothing,
            not even over the later attempt's outputs, which share its job id and stem), or have been
            written before that claim appeared (a node that takes over a job it finds already
            published only archives the original).
        foreign: outbox/ files someone else put there (not smapd's to account for).

    Returns:
        The findings; ``bool(findings)`` is True when every invariant holds.
    """
    drops = Counter(sp.dropped if dropped is None else dropped)
    f = Findings()
    _reports(f, sp, final, foreign)  # first: the reports hold the full names of shortened entries
    f.where = dict(sp.where({str((r.get("job") or {}).get("id")): name
                             for name, rs in f.reports.items() for _, r in rs}))
    _placement(f, drops, final, complete)
    _matched(f, drops)
    _publishers(f, sp, seen or {}, max_attempts, final)
    if final:
        left = sp.claims()
        if left:
            f.problems.append(f"claims left in processing/: {sorted(left)[:5]}")
        stems = sp.root / ".smapd" / "stems"
        reserved = os.listdir(stems) if stems.is_dir() else []
        if reserved:
            f.problems.append(f"stem reservations left in .smapd/stems: {sorted(reserved)[:5]}")
        chunks = sp.root / ".smapd" / "chunks"
        kept: list[str] = []

        def gone() -> bool:
            kept[:] = os.listdir(chunks) if chunks.is_dir() else []
            return not kept

        # inv. 10: the folder goes when its job is published or failed, just after the original is
        # archived: a node still running may be a moment (a loaded machine: a second) behind
        if not wait_for(gone, 3.0, 0.1):
            f.problems.append(f"checkpoint folders left in .smapd/chunks for finished jobs: {sorted(kept)[:5]}")
    return f


def _placement(f: Findings, drops: Counter[str], final: bool, complete: bool) -> None:
    """Inv. 1: each dropped file in exactly one place; at the end, archive/ or failed/."""
    for name, count in drops.items():
        states = f.where.get(name, [])
        if len(states) < count:
            f.lost.append(name)
            f.problems.append(f"{name!r} is lost: dropped {count}x, found in {states or 'no state'}")
        elif len(states) > count:
            f.duplicated.add(name)
            f.problems.append(f"{name!r} is in {states} (dropped {count}x)")
        elif final and "processing" in states:
            f.orphaned.append(name)
            f.problems.append(f"{name!r} is still claimed (processing/)")
        elif final and "inbox" in states:
            f.unfinished.append(name)
            f.problems.append(f"{name!r} is still in inbox/")
    unknown = sorted(set(f.where) - set(drops))
    if complete and unknown:
        f.problems.append(f"entries nobody dropped: {unknown[:5]}")


def _reports(f: Findings, sp: SpoolView, final: bool, foreign: Collection[str]) -> None:
    """Inv. 3: outputs complete and older than their report (the report is published last); no temp
    file in outbox/; every failed/ entry with its report."""
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
        f.written[id(report)] = report_mtime / 1e9
        by_name[input_name(report)].append((path.parent.name, report))
        if path.parent.name != "outbox":
            continue
        f.problems += [f"{path.name}: {p}" for p in chunk_problems(report, sp)]
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
        stray = sorted(n for n in outbox if n not in listed and n not in foreign and not is_ignored(n))
        if stray:
            f.problems.append(f"outbox/ files no report lists: {stray[:5]}")
        kept = sorted(n for n in outbox if (n not in listed and CHECKPOINT_NAME.match(n)) or _checkpoint_dir(sp.outbox / n))
        if kept:  # inv. 10: checkpoints live in .smapd/chunks/, never in outbox/
            f.problems.append(f"checkpoints in outbox/ (a record or a job's folder): {kept[:5]}")


def _checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` is a folder with a job's checkpoint records (a profile's outbox/<profile>/ is not)."""
    try:
        return path.is_dir() and bool({"job.json", "plan.json", "done", "todo", "taken", "audio"} & set(os.listdir(path)))
    except OSError:
        return False


def chunk_problems(report: dict[str, Any], sp: SpoolView | None = None) -> list[str]:
    """Inv. 10 over one published report: its chunks are 1..n without holes or repeats, each one ``ok``
    or a gap marked as one (an error, and its ``[untranscribed ... chunk <i>: ...]`` line in the .txt,
    its entry under ``gaps`` in the .json, where ``sp`` has them), the outcome says whether there are
    gaps, and the totals count what the chunks say.

    Args:
        report: a report from outbox/.
        sp: the spool, to read the outputs the gaps must be marked in (None: the report alone).

    Returns:
        One line per problem; [] when the report holds.
    """
    chunks = report.get("chunks") or []
    out = []
    indexes = [c.get("index") for c in chunks]
    if indexes != list(range(1, len(chunks) + 1)):
        out.append(f"chunk indexes {indexes[:12]} are not 1..{len(chunks)}")
    gaps = [c for c in chunks if c.get("status") != "ok"]
    bad = [c.get("index") for c in gaps if c.get("status") != "failed" or not c.get("error")]
    if bad:
        out.append(f"chunks {bad[:8]} are neither ok nor a failed chunk with its error")
    outcome = report.get("outcome")
    if outcome == "success" and gaps:
        out.append(f"outcome success with {len(gaps)} failed chunk(s)")
    elif outcome == "partial" and (not gaps or len(gaps) == len(chunks)):
        out.append(f"outcome partial with {len(gaps)} failed of {len(chunks)} chunks")
    elif outcome not in ("success", "partial"):
        out.append(f"outcome {outcome!r} in outbox/")
    totals = report.get("totals") or {}
    counted = {"chunks_ok": len(chunks) - len(gaps), "chunks_failed": len(gaps),
               "chunks_resumed": sum(1 for c in chunks if c.get("resumed")),
               "chunks_helped": sum(1 for c in chunks if (c.get("made_by") or {}).get("helper")),
               "chunks_redone": sum(1 for c in chunks if c.get("redone"))}
    wrong = {k: (totals.get(k), v) for k, v in counted.items() if k in totals and totals[k] != v}
    if wrong:
        out.append(f"totals disagree with the chunks (total, counted): {wrong}")
    out += _makers(report)
    if gaps and sp is not None:
        outputs = report.get("outputs") or {}
        for suffix, marked in ((".txt", _txt_gaps), (".json", _json_gaps)):
            if suffix in outputs:
                try:
                    found = marked((sp.outbox / outputs[suffix]).read_bytes())
                except (OSError, ValueError):
                    continue  # a missing output is _reports' finding
                unmarked = [c.get("index") for c in gaps if c.get("index") not in found]
                if unmarked:
                    out.append(f"failed chunks {unmarked[:8]} are not marked as gaps in {outputs[suffix]}")
    return out


def _makers(report: dict[str, Any]) -> list[str]:
    """Who made each chunk agrees with ``resumed`` (issue 10): a chunk taken from a checkpoint was made by
    an earlier attempt or a helper, never by the attempt that publishes; one not taken from a checkpoint
    was made by that attempt or arrived from a helper while it ran; no attempt later than the job's."""
    job = report.get("job") or {}
    me = (job.get("node"), job.get("attempt"))
    out = []
    for c in report.get("chunks") or []:
        m = c.get("made_by")
        if not m or c.get("status") != "ok" or me[1] is None:
            continue  # outside the daemon (smapd transcribe), or a gap: nobody made it
        ours = not m.get("helper") and (m.get("node"), m.get("attempt")) == me
        if not m.get("helper") and (m.get("attempt") or 0) > me[1]:
            out.append(f"chunk {c.get('index')} made by attempt {m.get('attempt')}, later than the job's {me[1]}")
        elif c.get("resumed") and ours:
            out.append(f"chunk {c.get('index')} is resumed, but the publishing attempt made it ({m})")
        elif not c.get("resumed") and not m.get("helper") and not ours:
            out.append(f"chunk {c.get('index')} is not resumed, but another attempt made it ({m})")
    return out


def _txt_gaps(data: bytes) -> set[int]:
    return {int(m) for m in re.findall(r"^\[untranscribed [^\]]*?: chunk (\d+):", data.decode("utf-8", "replace"),
                                       re.MULTILINE)}


def _json_gaps(data: bytes) -> set[int]:
    return {int(g["chunk"]) for g in json.loads(data).get("gaps") or [] if isinstance(g.get("chunk"), int)}


def _matched(f: Findings, drops: Counter[str]) -> None:
    """Inv. 2: one report per finished input, where its original is (outbox/ ~ archive/, failed/)."""
    for name in drops:
        rs = f.reports.get(name, [])
        states = f.where.get(name, [])
        places = sorted("archive" if w == "outbox" else "failed" for w, _ in rs)
        done = sorted(s for s in states if s in ("archive", "failed"))
        if len(rs) > drops[name]:
            f.duplicated.add(name)
            f.problems.append(f"{name!r} has {len(rs)} reports ({[w for w, _ in rs]}), dropped {drops[name]}x")
        elif places != done and len(rs) <= len(done):
            f.problems.append(f"{name!r}: originals in {done}, reports in {[w for w, _ in rs]}")


def _publishers(f: Findings, sp: SpoolView, seen: Mapping[str, Seen], max_attempts: int | None,
                final: bool) -> None:
    """Inv. 6 and 7: every outbox report comes from its job's last attempt (the node that held the
    claim last), its original archived once; no report with more than max_attempts attempts."""
    for name, rs in f.reports.items():
        for where, r in rs:
            job = r.get("job") or {}
            attempt, node, history = job.get("attempt") or 0, job.get("node"), job.get("attempts") or []
            attempts = r.get("attempts") or history  # failed reports list them at the top level
            if max_attempts is not None and max(attempt, len(attempts)) > max_attempts:
                f.problems.append(f"{name!r}: attempt {max(attempt, len(attempts))} > max attempts {max_attempts}")
            if where != "outbox":
                continue
            last = seen.get(str(job.get("id")))
            why = []
            # an attempt record the node could not write (disk full) has node None: nothing to compare
            if history and history[-1].get("node") is not None and \
                    (history[-1].get("attempt"), history[-1].get("node")) != (attempt, node):
                why.append(f"its attempt log ends with attempt {history[-1].get('attempt')} by "
                           f"{history[-1].get('node')}")
            written = f.written.get(id(r), 0.0)
            if last is not None and (last.attempt, last.node) != (attempt, node) and written >= last.since:
                why.append(f"the last claim seen was attempt {last.attempt} by {last.node}, and the report "
                           f"was written after it appeared")
            claimed = parse_name("processing", str(job.get("claimed_as") or ""))
            if claimed is not None and (claimed.attempt, claimed.node) != (attempt, node):
                why.append(f"it says it was claimed as {job.get('claimed_as')}")
            archived = len(sp.archived(str(job.get("id"))))
            if archived > 1 or (final and archived == 0):  # mid-run: reported, not archived yet is fine
                why.append(f"{archived} archived originals")
            if why:
                f.duplicated.add(name)
                f.problems.append(f"{name!r}: published by attempt {attempt} of node {node}, but "
                                  + "; ".join(why))
            elif name not in f.duplicated:
                f.published_once.add(name)
    f.published_once -= f.duplicated


def assert_invariants(sp: SpoolView, dropped: Iterable[str] | None = None, **kwargs: Any) -> Findings:
    """:func:`check_spool` (final by default), raising AssertionError with every problem found."""
    found = check_spool(sp, dropped, **kwargs)
    assert found, f"DESIGN §1 invariants broken:\n{found}"
    return found
