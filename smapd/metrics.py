"""Prometheus metrics: this node's file for node_exporter's textfile collector, and the spool-wide view.

``Metrics`` keeps one node's counters (fed from each job's report, so the figures are the report's
figures) and gauges (set from the daemon's state each tick), and writes them in the Prometheus text
format to ``SMAPD_METRICS_FILE`` with a temp file and a rename in the same directory: the collector
never reads half a file. ``spool_metrics`` renders what ``smapd status --prometheus`` prints, for all
nodes, from the spool alone.

prometheus_client renders the format (escaping, histogram buckets, ``# HELP``/``# TYPE``), which is
easy to get subtly wrong by hand.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

disable_created_metrics()  # the *_created series only double the file; Prometheus does not need them
OUTCOMES = ("success", "partial", "failed")
CHUNK_BUCKETS = (0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)


class Metrics:
    """One node's metrics. Thread-safe (prometheus_client locks each value)."""

    def __init__(self, node: str) -> None:
        self.node = node
        r = self.registry = CollectorRegistry(auto_describe=True)
        lbl = ("node",)
        self.jobs = Counter("smapd_jobs", "Jobs finished, by outcome.", (*lbl, "outcome"), registry=r)
        self.audio = Counter("smapd_audio_seconds", "Seconds of audio in finished jobs.", lbl, registry=r)
        self.chunks = Counter("smapd_chunks", "Chunks finished, by status.", (*lbl, "status"), registry=r)
        self.chunk_seconds = Histogram("smapd_chunk_seconds", "Wall seconds per transcribed chunk.", lbl,
                                       buckets=CHUNK_BUCKETS, registry=r)
        self.owned = _OwnedCounters(node)  # counted by the pool and the hook runner, read each tick
        r.register(self.owned)
        self.waiting = Gauge("smapd_inbox_files", "Files waiting in inbox/.", lbl, registry=r)
        self.oldest = Gauge("smapd_inbox_oldest_age_seconds", "Age of the oldest file waiting in inbox/.", lbl,
                            registry=r)
        self.in_flight = Gauge("smapd_jobs_in_flight", "Jobs this node is working on.", lbl, registry=r)
        self.slots = Gauge("smapd_worker_slots", "Engine slots, busy and total.", (*lbl, "state"), registry=r)
        self.rtf = Gauge("smapd_real_time_factor", "Audio seconds per wall second of the last finished job.", lbl,
                         registry=r)
        self.job_done = Gauge("smapd_job_audio_done_seconds", "Audio seconds transcribed so far, per job in "
                              "flight.", (*lbl, "job", "name"), registry=r)
        self.job_total = Gauge("smapd_job_audio_seconds", "Audio seconds of each job in flight.",
                               (*lbl, "job", "name"), registry=r)
        for outcome in OUTCOMES:  # every series exists from the start: rate() needs the zero
            self.jobs.labels(node, outcome)
        for status in ("ok", "failed"):
            self.chunks.labels(node, status)
        self.audio.labels(node)
        self.resumed = Counter("smapd_chunks_resumed", "Chunks of finished jobs taken from checkpoints (made by an "
                               "earlier attempt or another node).", lbl, registry=r)
        self.redone = Counter("smapd_chunks_redone", "Chunks of finished jobs made again because the node that "
                              "had started them died.", lbl, registry=r)
        self.resumed.labels(node)
        self.redone.labels(node)
        self._jobs_shown: set[tuple[str, str]] = set()

    def job_finished(self, report: Mapping[str, Any]) -> None:
        """Count one finished job from its report."""
        n = self.node
        outcome = str(report.get("outcome") or "failed")
        self.jobs.labels(n, outcome if outcome in OUTCOMES else "failed").inc()
        duration = (report.get("input") or {}).get("duration")
        if outcome != "failed" and duration:
            self.audio.labels(n).inc(float(duration))
        for chunk in report.get("chunks") or ():
            ok = chunk.get("status") == "ok"
            self.chunks.labels(n, "ok" if ok else "failed").inc()
            if ok and chunk.get("seconds") is not None:
                self.chunk_seconds.labels(n).observe(float(chunk["seconds"]))
        totals = report.get("totals") or {}
        self.resumed.labels(n).inc(int(totals.get("chunks_resumed") or 0))
        self.redone.labels(n).inc(int(totals.get("chunks_redone") or 0))
        rtf = totals.get("real_time_factor")
        if rtf:
            self.rtf.labels(n).set(float(rtf))

    def set_state(self, *, waiting: int, oldest_age: float, busy: int, total: int, restarts: int,
                  timeouts: int, takeovers: int, hooks_ok: int, hooks_failed: int,
                  jobs: Iterable[Mapping[str, Any]], helped: int = 0) -> None:
        """The gauges, from the daemon's state this tick. ``jobs``: ``job_id``, ``name``, ``audio_done``,
        ``audio_total`` of each job in flight."""
        n = self.node
        self.waiting.labels(n).set(waiting)
        self.oldest.labels(n).set(max(0.0, oldest_age))
        self.slots.labels(n, "busy").set(busy)
        self.slots.labels(n, "total").set(total)
        self.owned.values = {"restarts": restarts, "timeouts": timeouts, "takeovers": takeovers,
                             "hooks_ok": hooks_ok, "hooks_failed": hooks_failed, "helped": helped}
        shown: set[tuple[str, str]] = set()
        for j in jobs:
            key = (str(j["job_id"]), str(j["name"]))
            shown.add(key)
            self.job_done.labels(n, *key).set(float(j.get("audio_done") or 0.0))
            self.job_total.labels(n, *key).set(float(j.get("audio_total") or 0.0))
        self.in_flight.labels(n).set(len(shown))
        for gone in self._jobs_shown - shown:  # a finished job's series disappears
            self.job_done.remove(n, *gone)
            self.job_total.remove(n, *gone)
        self._jobs_shown = shown

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def write(self, path: Path) -> None:
        """Write atomically next to ``path`` (node_exporter reads ``*.prom`` files; temp names end ``.tmp``)."""
        write_atomic(path, self.render())


class _OwnedCounters(Collector):
    """Counters whose values other parts keep (worker restarts and timeouts in the pool, takeovers in
    the dispatcher, hooks in the hook runner): exposed as counters, read from the last ``set_state``."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.values: dict[str, int] = {}

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        v, n = self.values, [self.node]
        restarts = CounterMetricFamily("smapd_worker_restarts", "Worker processes replaced since start "
                                       "(crash, timeout, recycling).", labels=["node"])
        restarts.add_metric(n, v.get("restarts", 0))
        timeouts = CounterMetricFamily("smapd_chunk_timeouts", "Chunk attempts that hit CHUNK_TIMEOUT since "
                                       "start.", labels=["node"])
        timeouts.add_metric(n, v.get("timeouts", 0))
        takeovers = CounterMetricFamily("smapd_claims_taken_over", "Stale claims this node took over since "
                                        "start.", labels=["node"])
        takeovers.add_metric(n, v.get("takeovers", 0))
        hooks = CounterMetricFamily("smapd_hooks", "Completion hooks run since start, by result.",
                                    labels=["node", "result"])
        hooks.add_metric([self.node, "ok"], v.get("hooks_ok", 0))
        hooks.add_metric([self.node, "failed"], v.get("hooks_failed", 0))
        helped = CounterMetricFamily("smapd_chunks_helped", "Chunks of other nodes' jobs this node made since "
                                     "start (shared chunks).", labels=["node"])
        helped.add_metric(n, v.get("helped", 0))
        yield from (restarts, timeouts, takeovers, hooks, helped)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # node_exporter runs as another user
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def spool_metrics(state: Mapping[str, Any], lease_seconds: float) -> bytes:
    """The spool-wide view (``smapd status --prometheus``) from ``Spool.list_state()``."""
    r = CollectorRegistry(auto_describe=True)
    waiting = state.get("waiting") or []
    Gauge("smapd_spool_inbox_files", "Files waiting in inbox/.", registry=r).set(len(waiting))
    Gauge("smapd_spool_inbox_oldest_age_seconds", "Age of the oldest file waiting in inbox/.",
          registry=r).set(max((float(w.get("age") or 0.0) for w in waiting), default=0.0))
    claims = Gauge("smapd_spool_claims", "Claims in processing/, by node and whether the lease ran out.",
                   ("node", "stale"), registry=r)
    for c in state.get("processing") or []:
        claims.labels(str(c.get("node")), "true" if c.get("stale") else "false").inc()
    fails = Gauge("smapd_spool_recent_failures", "Reports in failed/ (the most recent ones listed by status).",
                  registry=r)
    fails.set(len(state.get("failures") or []))
    age = Gauge("smapd_node_heartbeat_age_seconds", "Seconds since each node's last heartbeat.", ("node",),
                registry=r)
    up = Gauge("smapd_node_up", "1 when the node's heartbeat is younger than the lease.", ("node",), registry=r)
    done = Gauge("smapd_node_jobs_finished", "Jobs each node finished in its current run, by outcome.",
                 ("node", "outcome"), registry=r)
    flight = Gauge("smapd_node_jobs_in_flight", "Jobs each node reports in flight.", ("node",), registry=r)
    busy = Gauge("smapd_node_worker_slots", "Each node's engine slots, busy and total.", ("node", "state"),
                 registry=r)
    for n in state.get("nodes") or []:
        name = str(n.get("node"))
        age.labels(name).set(float(n.get("age") or 0.0))
        up.labels(name).set(1 if float(n.get("age") or 0.0) <= lease_seconds and not n.get("stopped") else 0)
        done.labels(name, "done").set(int(n.get("completed") or 0))
        done.labels(name, "failed").set(int(n.get("failed") or 0))
        flight.labels(name).set(len(n.get("jobs") or []))
        busy.labels(name, "busy").set(int(n.get("busy_workers") or 0))
        busy.labels(name, "total").set(int(n.get("workers") or 0))
    return generate_latest(r)
