"""Profiles (issue 11): named sets of decoding options, and per-file sidecars that override them.

The profiles file is TOML (``profiles.toml`` next to the env file SMAPD_CONFIG names, or the file
SMAPD_PROFILES names), one table per profile::

    [profile.meetings-en]
    language = "en"
    formats = ["txt", "srt"]      # or "txt,srt"
    hotwords = "Kubernetes PostgreSQL"

A sidecar ``<file>.smapd.json`` or ``<file>.smapd.toml`` holds the same keys at its top level and
overrides them for that one file. Options left out come from the profile, then from the global
settings. Every value is checked by the validator of the setting of the same name (settings.py),
so a profile accepts exactly what SMAPD_<KEY> accepts; an error is one line naming the file, the
profile, the key, the value and what is allowed.
"""
from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from smapd.errors import ConfigError
from smapd.settings import Settings

# The decoding options a profile or sidecar may set: each is a Settings field of the same name.
OPTIONS = ("language", "task", "beam_size", "formats", "word_timestamps", "vad", "initial_prompt", "hotwords",
           "language_mode")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = "1-64 letters, digits, '-' or '_', starting with a letter or digit"
_BLANK = Settings.model_construct()  # a Settings instance to validate single values against


@dataclass(frozen=True)
class Profile:
    """One profile: its ``name`` and the options it sets (validated, by Settings field name)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Profiles:
    """The profiles of one profiles file (``source``; empty when there is none)."""

    by_name: Mapping[str, Profile] = field(default_factory=dict)
    source: Path | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.by_name))

    def get(self, name: str) -> Profile:
        """The profile ``name``.

        Raises:
            ConfigError: There is no such profile (the message lists the known ones).
        """
        if name not in self.by_name:
            raise ConfigError(f"no profile {name!r} in {self.source or 'the configuration'} ({self.known()})")
        return self.by_name[name]

    def known(self) -> str:
        """"known profiles: a, b" or "no profiles are configured", for messages and reports."""
        return f"known profiles: {', '.join(self.names)}" if self.by_name else "no profiles are configured"


def valid_name(name: str) -> bool:
    """Whether ``name`` can be a profile (and so a folder under inbox/, outbox/, ...)."""
    return _NAME_RE.fullmatch(name) is not None


def check_options(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate option values with the settings' own validators.

    Args:
        values: Key -> raw value (from TOML or JSON).
        where: The start of an error message, e.g. ``profiles file F: profile "x"``.

    Returns:
        Key -> validated value (``formats`` normalised to "txt,srt").

    Raises:
        ConfigError: One line naming the key, the value and what is allowed.
    """
    out: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in OPTIONS:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {', '.join(OPTIONS)}")
        value = ",".join(map(str, raw)) if key == "formats" and isinstance(raw, list) else raw
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: {key}={raw!r} is invalid: expected a single value")
        try:
            checked = Settings.__pydantic_validator__.validate_assignment(_BLANK.model_copy(), key, value)
        except ValidationError as e:
            msg = str(e.errors()[0].get("msg", "invalid")).removeprefix("Value error, ")
            raise ConfigError(f"{where}: {key}={raw!r} is invalid: {msg}") from None
        out[key] = getattr(checked, key)
    return out


def _parse(data: bytes, toml: bool, label: str) -> dict[str, Any]:
    try:
        parsed = tomllib.loads(data.decode("utf-8")) if toml else json.loads(data)
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{label}: not valid TOML: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{label}: not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{label}: expected a table of options at the top level")
    return parsed


def parse_profiles(data: bytes, source: Path) -> Profiles:
    """Parse a profiles file's content.

    Raises:
        ConfigError: Bad TOML, a bad profile name, an unknown key or a bad value (one line).
    """
    label = f"profiles file {source}"
    doc = _parse(data, True, label)
    extra = sorted(set(doc) - {"profile"})
    if extra:
        raise ConfigError(f"{label}: unknown top-level key {extra[0]!r}; allowed: [profile.NAME] tables")
    tables = doc.get("profile", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{label}: 'profile' must be tables [profile.NAME]")
    by_name: dict[str, Profile] = {}
    for name, options in tables.items():
        if not valid_name(name):
            raise ConfigError(f"{label}: profile name {name!r} is invalid: expected {NAME_RULE}")
        where = f"{label}: profile {name!r}"
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: expected a table of options, got {options!r}")
        by_name[name] = Profile(name, check_options(options, where))
    return Profiles(by_name, source)


def load(settings: Settings) -> Profiles:
    """The profiles file the settings name (SMAPD_PROFILES, else profiles.toml next to SMAPD_CONFIG).

    A default file that does not exist means no profiles; a named one must exist.

    Raises:
        ConfigError: The file cannot be read or is invalid (one line).
    """
    path, explicit = settings.profiles_file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"SMAPD_PROFILES={str(path)!r}: no such file") from None
        return Profiles()
    except OSError as e:
        raise ConfigError(f"profiles file {path}: cannot read it: {e.strerror or e}") from None
    return parse_profiles(data, path)


def parse_sidecar(data: bytes, suffix: str, label: str) -> dict[str, Any]:
    """The options of a sidecar's content (``suffix`` says JSON or TOML).

    Raises:
        ConfigError: Unparsable, not a table, an unknown key or a bad value (one line naming it).
    """
    return check_options(_parse(data, suffix.endswith(".toml"), label), label)


def effective(defaults: Mapping[str, Any], *layers: Mapping[str, Any]) -> dict[str, Any]:
    """The options of one job: ``defaults`` (the global settings), then each layer on top."""
    out = {k: defaults[k] for k in OPTIONS}
    for layer in layers:
        out.update(layer)
    return out


def defaults(settings: Settings) -> dict[str, Any]:
    """The global values of every profile option."""
    return {k: getattr(settings, k) for k in OPTIONS}
