"""config/smapd.env stays in step with smapd.settings.Settings.

The file is the operator's only reference: every setting must be there, under its real name (SMAP's
four without a prefix, the rest with SMAPD_), with a comment and the true default; no stale entries.
Loading it through SMAPD_CONFIG, as shipped and with every line uncommented, proves it is valid.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from smapd.errors import ConfigError
from smapd.settings import _SMAP_NAMES, RESTART_REQUIRED, Settings, load_settings

CONFIG = Path(__file__).resolve().parent.parent / "config" / "smapd.env"

# Defaults computed at run time; the file leaves their value empty or shows the systemd value.
DYNAMIC = {"node"}  # the hostname
# Under systemd, CacheDirectory=smapd makes $CACHE_DIRECTORY (the model cache default) this path.
SYSTEMD_CACHE = "/var/cache/smapd"

_ASSIGNMENT = re.compile(r"^#([A-Z][A-Z0-9_]*)=(.*)$")


@dataclass(frozen=True)
class Entry:
    name: str
    value: str
    comment: str  # the comment lines directly above the assignment, joined
    line: int


def env_name(field: str) -> str:
    """The environment name of a Settings field, as the operator writes it."""
    upper = field.upper()
    return upper if upper in _SMAP_NAMES else f"SMAPD_{upper}"


def field_of(name: str) -> str:
    return name.lower().removeprefix("smapd_")


def parse(path: Path = CONFIG) -> list[Entry]:
    """Commented-out assignments (``#NAME=value``) with their comment blocks."""
    entries: list[Entry] = []
    comment: list[str] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.rstrip()
        m = _ASSIGNMENT.match(line)
        if m:
            entries.append(Entry(m.group(1), m.group(2), " ".join(comment), number))
            comment = []
        elif line.startswith("# ") and not line.startswith("# ----"):
            comment.append(line[2:])
        else:
            comment = []
    return entries


def uncommented(tmp_path: Path, skip: set[str] = frozenset()) -> Path:  # type: ignore[assignment]
    """A copy of the file with every assignment switched on, except the ``skip`` names."""
    out = []
    for raw in CONFIG.read_text(encoding="utf-8").splitlines():
        m = _ASSIGNMENT.match(raw.rstrip())
        out.append(raw[1:] if m and m.group(1) not in skip else raw)
    path = tmp_path / "smapd.env"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No smapd setting from the test runner's environment, no ./.env, and systemd's cache dir."""
    for key in list(os.environ):
        if key.startswith("SMAPD_") or key in _SMAP_NAMES or key.lower() in Settings.model_fields:
            monkeypatch.delenv(key)
    monkeypatch.setenv("CACHE_DIRECTORY", SYSTEMD_CACHE)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_every_setting_listed_once_and_nothing_stale() -> None:
    names = [e.name for e in parse()]
    expected = {env_name(f) for f in Settings.model_fields}
    assert len(names) == len(set(names)), f"listed twice: {sorted(n for n in names if names.count(n) > 1)}"
    assert not expected - set(names), f"missing from config/smapd.env: {sorted(expected - set(names))}"
    assert not set(names) - expected, (
        f"stale in config/smapd.env (no such setting): {sorted(set(names) - expected)}"
    )


def test_smap_names_keep_no_prefix() -> None:
    names = {e.name for e in parse()}
    for smap in _SMAP_NAMES:
        assert smap in names
        assert f"SMAPD_{smap}" not in names


def test_every_setting_has_a_comment() -> None:
    bare = [e.name for e in parse() if len(e.comment) < 10]
    assert not bare, f"settings without a comment line above them: {bare}"


def test_restart_marks_match_the_settings_that_need_a_restart() -> None:
    marked = {field_of(e.name) for e in parse() if "(restart)" in e.comment}
    assert marked == set(RESTART_REQUIRED), (
        f"marked (restart) but reloadable: {sorted(marked - RESTART_REQUIRED)}; "
        f"need a restart but not marked: {sorted(RESTART_REQUIRED - marked)}"
    )


def test_only_comments_and_blank_lines_as_shipped() -> None:
    # As shipped the file changes nothing: the defaults live in one place, the Settings class.
    for number, line in enumerate(CONFIG.read_text(encoding="utf-8").splitlines(), start=1):
        assert not line.strip() or line.startswith("#"), f"line {number} is active: {line!r}"
        assert not line.startswith("#export"), "EnvironmentFile= does not understand `export`"


def test_shipped_file_loads(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SMAPD_CONFIG", str(CONFIG))
    assert load_settings() == Settings()


def test_documented_defaults_are_the_real_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    entries = {e.name: e for e in parse()}
    for field in DYNAMIC:
        entry = entries[env_name(field)]
        assert entry.value == "" and "default" in entry.comment, (
            f"{entry.name}: dynamic default not explained"
        )
    clean_env.setenv("SMAPD_CONFIG", str(uncommented(tmp_path, skip={env_name(f) for f in DYNAMIC})))
    loaded = load_settings()
    clean_env.delenv("SMAPD_CONFIG")
    defaults = Settings()
    wrong = {
        env_name(f): (entries[env_name(f)].value, getattr(defaults, f))
        for f in Settings.model_fields
        if getattr(loaded, f) != getattr(defaults, f)
    }
    assert not wrong, f"documented value differs from the default (documented, real): {wrong}"


def test_model_cache_default_is_systemd_cache_directory(clean_env: pytest.MonkeyPatch) -> None:
    # The unit's CacheDirectory=smapd and install.sh's model assembly both rely on this.
    assert Settings().model_cache == Path(SYSTEMD_CACHE)
    assert {e.name: e.value for e in parse()}["SMAPD_MODEL_CACHE"] == SYSTEMD_CACHE


@pytest.mark.parametrize(
    "line, name",
    [
        ("MAX_PARALLEL_WORKERS=zero", "MAX_PARALLEL_WORKERS"),
        ("CHUNK_TIMEOUT=-5", "CHUNK_TIMEOUT"),
        ("SMAPD_CHUNK_SECONDS=90", "SMAPD_CHUNK_SECONDS"),
    ],
)
def test_bad_value_in_the_file_names_the_setting(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, line: str, name: str
) -> None:
    path = tmp_path / "bad.env"
    path.write_text(CONFIG.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    clean_env.setenv("SMAPD_CONFIG", str(path))
    with pytest.raises(ConfigError, match=rf"^setting {name}=.* is invalid: "):
        load_settings()
