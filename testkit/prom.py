"""The real Prometheus tools, for tests of smapd's metrics: promtool's linter and a node_exporter
serving a textfile directory on the loopback (tests/run.sh installs both Debian packages)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

PROMTOOL = shutil.which("promtool")
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")


def promtool_check(data: bytes) -> str:
    """``promtool check metrics`` on ``data``: "" when it is clean, else what promtool said."""
    assert PROMTOOL is not None, "promtool missing: tests/run.sh installs Debian's prometheus package"
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=data, capture_output=True, timeout=60, check=False)
    return "" if out.returncode == 0 else (out.stdout + out.stderr).decode(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_textfile(directory: Path) -> str:
    """Serve ``directory`` with a real node_exporter on the loopback and return one scrape."""
    assert NODE_EXPORTER is not None, "node_exporter missing: tests/run.sh installs prometheus-node-exporter"
    port = _free_port()
    proc = subprocess.Popen([NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
                             "--collector.textfile", f"--collector.textfile.directory={directory}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
