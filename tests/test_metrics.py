"""Metrics files as Prometheus reads them: promtool's linter and a real node_exporter scrape.

The daemon-level proof (a real `smapd run` writing SMAPD_METRICS_FILE while it transcribes) is in
tests/test_ops.py; here the renderer is checked against the real tools on its own.
"""
from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from smapd.metrics import Metrics, spool_metrics
from testkit.prom import PROMTOOL, promtool_check, scrape_textfile

REPORT = {"outcome": "success", "input": {"duration": 42.5},
          "chunks": [{"status": "ok", "seconds": 2.5}, {"status": "ok", "seconds": 3.5},
                     {"status": "failed", "seconds": 30.0}],
          "totals": {"real_time_factor": 14.2, "chunks_resumed": 2, "chunks_redone": 1}}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _node_metrics() -> Metrics:
    m = Metrics("web-1")
    m.job_finished(REPORT)
    m.job_finished({"outcome": "failed", "input": {"duration": None}, "chunks": [], "totals": {}})
    m.set_state(waiting=4, oldest_age=12.0, busy=2, total=2, restarts=3, timeouts=1, takeovers=1, hooks_ok=1,
                hooks_failed=0, jobs=[{"job_id": "0123456789ab", "name": 'say "hi"\n.wav', "audio_done": 30.0, "audio_total": 90.0}],
                helped=5)
    return m


def test_node_metrics_values() -> None:
    s = _samples(_node_metrics().render().decode())
    n = (("node", "web-1"),)
    assert s[("smapd_jobs_total", (*n, ("outcome", "success")))] == 1
    assert s[("smapd_jobs_total", (*n, ("outcome", "failed")))] == 1
    assert s[("smapd_jobs_total", (*n, ("outcome", "partial")))] == 0
    assert s[("smapd_audio_seconds_total", n)] == 42.5
    assert s[("smapd_chunks_total", (*n, ("status", "failed")))] == 1
    assert s[("smapd_chunk_seconds_count", n)] == 2 and s[("smapd_chunk_seconds_sum", n)] == 6.0
    assert s[("smapd_chunk_seconds_bucket", (("le", "3.0"), *n))] == 1
    assert s[("smapd_worker_slots", (*n, ("state", "busy")))] == 2
    assert s[("smapd_worker_restarts_total", n)] == 3 and s[("smapd_chunk_timeouts_total", n)] == 1
    assert s[("smapd_claims_taken_over_total", n)] == 1
    assert s[("smapd_chunks_resumed_total", n)] == 2 and s[("smapd_chunks_redone_total", n)] == 1
    assert s[("smapd_chunks_helped_total", n)] == 5
    assert s[("smapd_inbox_files", n)] == 4 and s[("smapd_inbox_oldest_age_seconds", n)] == 12
    assert s[("smapd_real_time_factor", n)] == 14.2
    job = (("job", "0123456789ab"), ("name", 'say "hi"\n.wav'), *n)
    assert s[("smapd_job_audio_done_seconds", job)] == 30 and s[("smapd_job_audio_seconds", job)] == 90


def test_finished_jobs_series_disappear() -> None:
    m = _node_metrics()
    m.set_state(waiting=0, oldest_age=0, busy=0, total=2, restarts=3, timeouts=1, takeovers=1, hooks_ok=1,
                hooks_failed=0, jobs=[])
    text = m.render().decode()
    assert "smapd_job_audio_done_seconds{" not in text
    assert _samples(text)[("smapd_jobs_in_flight", (("node", "web-1"),))] == 0


def test_promtool_accepts_both_files(tmp_path: Path) -> None:
    assert PROMTOOL is not None, "promtool missing: tests/run.sh installs Debian's prometheus package"
    state = {"waiting": [{"name": "a.wav", "age": 3.0}], "nodes": [
        {"node": "web-1", "age": 1.0, "completed": 5, "failed": 1, "jobs": [{}], "busy_workers": 1, "workers": 2},
        {"node": "web-2", "age": 900.0, "completed": 0, "failed": 0, "jobs": [], "workers": 2}],
        "processing": [{"node": "web-2", "stale": True}], "failures": []}
    for name, data in (("node.prom", _node_metrics().render()), ("spool.prom", spool_metrics(state, 120))):
        (tmp_path / name).write_bytes(data)
        assert promtool_check(data) == "", name
    s = _samples(spool_metrics(state, 120).decode())
    assert s[("smapd_node_up", (("node", "web-2"),))] == 0 and s[("smapd_node_up", (("node", "web-1"),))] == 1
    assert s[("smapd_spool_claims", (("node", "web-2"), ("stale", "true")))] == 1


def test_node_exporter_serves_the_file(tmp_path: Path) -> None:
    _node_metrics().write(tmp_path / "smapd.prom")
    text = scrape_textfile(tmp_path)
    s = _samples(text)
    assert s[("smapd_audio_seconds_total", (("node", "web-1"),))] == 42.5
    assert s[("node_textfile_scrape_error", ())] == 0, "node_exporter could not parse the file"
    assert not [p for p in tmp_path.iterdir() if p.name != "smapd.prom"], "no temp file left behind"
