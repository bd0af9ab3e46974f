"""Shared fixtures: the test clips, a long-form recording, the embedded model, and a thread-leak check.

Markers (slow, systemd, chaos) are declared in pyproject.toml; nothing is registered here.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.register_assert_rewrite("testkit")  # its asserts explain themselves like a test's; before the import

import testkit as tk

# Seconds of audio the long-form recording reaches (clips repeated in reshuffled rounds).
LONGFORM_TARGET_SECONDS = 270.0
LONGFORM_SEED = 7


@dataclass(frozen=True)
class LongformRecording:
    """The session's long-form WAV with its reference text and every clip's true span."""

    path: Path
    duration: float
    reference_text: str
    spans: list[dict]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: the speech clips, manifest.tsv and SOURCES.md."""
    return tk.DATA_DIR


@pytest.fixture(scope="session")
def tools_dir() -> Path:
    """tests/tools: sphinx-transcribe, sleepy-engine, crashy-engine."""
    return tk.TOOLS_DIR


@pytest.fixture(scope="session")
def manifest(data_dir: Path) -> list[dict[str, str]]:
    """Rows of tests/data/manifest.tsv (file, seconds, language, source_repo, source_path, reference_text)."""
    return tk.read_manifest(data_dir / "manifest.tsv")


@pytest.fixture(scope="session")
def longform(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> LongformRecording:
    """A ~4.5-minute 16 kHz mono WAV of the English clips with pauses of room tone, built once per session.

    Next to it: longform.txt (reference) and longform.json (spans).
    """
    out = tmp_path_factory.mktemp("longform") / "longform.wav"
    lf = tk.make_longform(tk.manifest_clips("en", data_dir), out, seed=LONGFORM_SEED,
                               target_seconds=LONGFORM_TARGET_SECONDS, room_tone=True)
    return LongformRecording(out, lf.duration, lf.reference_text, lf.spans)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the embedded model is assembled: $SMAPD_TEST_MODEL_CACHE (kept across runs) or a session tmp dir.

    Pass it as SMAPD_MODEL_CACHE to any smapd subprocess so it does not assemble the model again.
    """
    env = os.environ.get("SMAPD_TEST_MODEL_CACHE")
    if env:
        path = Path(env).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def model_dir(model_cache_dir: Path) -> Path:
    """The assembled, verified embedded model directory (model.bin, config.json, tokenizer.json, ...)."""
    from smapd import model  # lazy: the unit tests must not need the model

    ensure = getattr(model, "ensure_model", None) or getattr(model, "ensure_embedded", None)
    if ensure is None:
        pytest.fail("smapd.model has neither ensure_model() nor ensure_embedded()")
    return Path(ensure(model_cache_dir))


@pytest.fixture(scope="session")
def sphinx_transcribe(tools_dir: Path) -> Path:
    """tests/tools/sphinx-transcribe, after checking pocketsphinx is installed (tests/run.sh installs it)."""
    model = Path("/usr/share/pocketsphinx/model/en-us")
    if shutil.which("pocketsphinx_continuous") is None or not model.is_dir():
        pytest.fail("pocketsphinx is not installed: run `bash tests/run.sh` "
                    "(or apt-get install pocketsphinx pocketsphinx-en-us)")
    return tools_dir / "sphinx-transcribe"


# --------------------------------------------------------------------------------------------
# No leaked threads (STYLE.md 12; watchdog's tests/conftest.py does the same)
# --------------------------------------------------------------------------------------------

THREAD_LEAK_GRACE_SECONDS = 5.0


@pytest.fixture(autouse=True)
def no_thread_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves new non-daemon threads running after its teardown.

    Threads get a grace period to finish (joined with a timeout, no bare sleep). Daemon threads are
    not counted: they cannot keep the process alive. Session fixtures are set up before this one,
    so their threads are part of the baseline.
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_LEAK_GRACE_SECONDS
    leaked = []
    for t in threading.enumerate():
        if t in before or t.daemon or t is threading.current_thread():
            continue
        t.join(timeout=max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            leaked.append(t)
    if leaked:
        names = ", ".join(f"{t.name} (target={getattr(t, '_target', None)!r})" for t in leaked)
        pytest.fail(f"{request.node.nodeid} leaked {len(leaked)} non-daemon thread(s): {names}",
                    pytrace=False)
