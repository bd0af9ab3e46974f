"""A real systemd (or a bare init) as PID 1 of a private PID + mount namespace, for the deploy tests.

The recipe is issue 4's: ``unshare --pid --fork --mount --mount-proc``; inside, ``mount --make-rprivate /``,
tmpfs on /run, /tmp, /var/tmp and /var/log/journal, the boot services that would act on the real
filesystem masked in /run/systemd/system, a target with no dependencies, and
``exec /lib/systemd/systemd --system --unit=smapd-test.target``. Only journald and the units under
test run. Commands go in with ``nsenter -t PID -m -p``; teardown is SIGKILL to that PID 1 from
outside (the kernel then kills everything in the namespace).

The host is left as it was: besides the recipe, /etc, /usr/local/bin and /var/cache are overlay
mounts inside the namespace whose upper layers live in the test's work directory, so install.sh
(useradd, /etc/smapd, the unit, the /usr/local/bin/smapd link, the model cache) writes nothing
to the host; the prefix and the spool are in the work directory (under /var/lib, because the
namespace's /tmp is a fresh tmpfs that hides the host's). Control groups the namespace's systemd
created are removed at teardown.

``SMAPD_TEST_SYSTEMD``: ``auto`` (default) skips with the reason where this cannot run (not root,
no unshare, no systemd, namespaces refused); ``require`` (CI) fails instead; ``skip`` skips.
``SMAPD_TEST_KEEP=1`` keeps the work directory for a post-mortem.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
TARGET = "smapd-test.target"
OVERLAID = ("/etc", "/usr/local/bin", "/var/cache")
TMPFS = ("/run", "/tmp", "/var/tmp", "/var/log/journal")
# Boot services that act on the real filesystem or hardware (issue 4's list): masked.
MASKED = (
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-sysctl.service",
    "systemd-remount-fs.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-sysusers.service",
    "systemd-modules-load.service",
    "systemd-journal-flush.service",
    "systemd-update-utmp.service",
    "systemd-random-seed.service",
    "systemd-machine-id-commit.service",
    "systemd-firstboot.service",
    "ldconfig.service",
    "systemd-hwdb-update.service",
    "systemd-journal-catalog-update.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-pstore.service",
)
CGROUP_ROOT = Path("/sys/fs/cgroup")


class Unavailable(Exception):
    """This machine cannot run a namespaced systemd; str() says why."""


def unavailable_reason() -> str | None:
    """Why the namespace cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (unshare --pid --mount, overlay mounts)"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux)"
    if not SYSTEMD.is_file():
        return f"{SYSTEMD} is missing (apt-get install systemd)"
    try:
        probe = subprocess.run(
            [
                "unshare",
                "--pid",
                "--fork",
                "--mount",
                "--mount-proc",
                "sh",
                "-c",
                "mount --make-rprivate / && mount -t tmpfs tmpfs /run",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    if probe.returncode != 0:
        return f"unshare --pid --mount is not permitted here: {probe.stderr.strip()[:200]}"
    return None


def _boot_script(workdir: Path, init: Sequence[str]) -> str:
    lines = ["#!/bin/sh", "set -eu", "mount --make-rprivate /"]
    for path in OVERLAID:
        layer = workdir / "overlay" / path.strip("/").replace("/", "-")
        lines.append(f"mkdir -p {layer}/upper {layer}/work")
        lines.append(
            f"mount -t overlay overlay -o lowerdir={path},upperdir={layer}/upper,workdir={layer}/work {path}"
        )
    for path in TMPFS:
        lines.append(f"mkdir -p {path} && mount -t tmpfs -o mode=0755 tmpfs {path}")
    lines.append("chmod 1777 /tmp /var/tmp")
    lines.append("mkdir -p /run/systemd/system")
    lines += [f"ln -s /dev/null /run/systemd/system/{unit}" for unit in MASKED]
    lines.append(
        f"printf '[Unit]\\nDescription=smapd test target\\nDefaultDependencies=no\\n' "
        f"> /run/systemd/system/{TARGET}"
    )
    lines.append("echo namespace-ready")
    lines.append("exec " + " ".join(init))
    return "\n".join(lines) + "\n"


def _cgroup_dirs() -> set[Path]:
    if not CGROUP_ROOT.is_dir():
        return set()
    found: set[Path] = set()
    for hierarchy in CGROUP_ROOT.iterdir():
        if hierarchy.is_dir():
            found.update(p for p in hierarchy.rglob("*") if p.is_dir())
    return found


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll ``predicate`` until it returns something truthy (that value); AssertionError naming ``what``
    on timeout (unlike :func:`testkit.procs.wait_for`, which returns False)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Namespace:
    """PID 1 (systemd, or a bare ``sleep`` standing in for a host without systemd) in its own namespaces.

    Use as a context manager, or call ``boot()`` and ``close()``.
    """

    def __init__(self, systemd: bool = True, workdir: Path | None = None) -> None:
        self.systemd = systemd
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="smapd-test-", dir="/var/lib"))
        self.workdir.chmod(0o755)  # the service user walks through it to the prefix and the spool
        self.log = self.workdir / "boot.log"
        self.pid = 0  # PID 1 of the namespace, as the host numbers it
        self._unshare: subprocess.Popen[bytes] | None = None
        self._cgroups_before: set[Path] = set()

    # --- lifecycle ---------------------------------------------------------------------------
    def boot(self, timeout: float = 60) -> Namespace:
        init = [str(SYSTEMD), "--system", f"--unit={TARGET}"] if self.systemd else ["sleep", "infinity"]
        script = self.workdir / "boot.sh"
        script.write_text(_boot_script(self.workdir, init))
        self._cgroups_before = _cgroup_dirs()
        with open(self.log, "wb") as log:
            self._unshare = subprocess.Popen(
                [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount",
                    "--mount-proc",
                    "--uts",
                    "--ipc",
                    "sh",
                    str(script),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            found = wait_until(self._find_init, timeout, "the namespace's PID 1 to start")
            self.pid = int(found)  # type: ignore[call-overload]
            if self.systemd:
                wait_until(self._booted, timeout, "systemd to finish booting in the namespace", interval=0.3)
        except BaseException:
            self.close()
            raise
        return self

    def _find_init(self) -> int:
        assert self._unshare is not None
        if self._unshare.poll() is not None:
            raise AssertionError(
                f"the namespace exited at once ({self._unshare.returncode}): "
                f"{self.log.read_text(errors='replace')[-2000:]}"
            )
        want = "systemd" if self.systemd else "sleep"
        try:
            children = (
                Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children").read_text().split()
            )
        except OSError:
            return 0
        for child in children:
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == want:
                    return int(child)
            except OSError:
                continue
        return 0

    def _booted(self) -> bool:
        state = self.run(["systemctl", "is-system-running"], check=False, timeout=20).stdout.strip()
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout
            raise AssertionError(f"systemd booted degraded in the namespace; failed units:\n{failed}")
        return state == "running"

    def close(self) -> None:
        """SIGKILL PID 1 from outside: the kernel kills the rest of the namespace, mounts go with it."""
        if self._unshare is not None:
            if self.pid:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self._unshare.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._unshare.pid, signal.SIGKILL)
                self._unshare.wait(timeout=20)
            self._unshare = None
        self._remove_cgroups()
        if os.environ.get("SMAPD_TEST_KEEP") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _remove_cgroups(self) -> None:
        # Empty once their processes are dead; the kernel may take a moment to notice.
        new = sorted(_cgroup_dirs() - self._cgroups_before, key=lambda p: len(p.parts), reverse=True)
        deadline = time.monotonic() + 10
        for path in new:
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)

    def __enter__(self) -> Namespace:  # noqa: PYI034
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- commands inside ---------------------------------------------------------------------
    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace (its mounts and PIDs); output captured as text."""
        assert self.pid, "the namespace is not booted"
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "--", *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited with {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
            )
        return proc

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, lines: int = 200) -> str:
        return self.run(
            ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines), "-u", unit], check=False
        ).stdout
