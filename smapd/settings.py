"""Settings: the only place that reads the environment.

Sources, strongest first: the process environment, then an env file (``SMAPD_CONFIG`` names it;
otherwise ``./.env`` when present). SMAP's four names work unchanged and without a prefix
(MAX_PARALLEL_WORKERS, USE_PARALLEL_TRANSCRIPTION, MAX_CONCURRENT_JOBS, CHUNK_TIMEOUT); every
newer setting takes the ``SMAPD_`` prefix. A bad value raises ``ConfigError`` with one line that
names the setting, the value and what is allowed.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from smapd.errors import ConfigError
from smapd.hooks import parse_template

FORMATS = ("txt", "srt", "vtt", "json")

# Fields whose names SMAP users already know: no prefix (the SMAPD_ spelling is accepted too).
_SMAP_NAMES = ("MAX_PARALLEL_WORKERS", "USE_PARALLEL_TRANSCRIPTION", "MAX_CONCURRENT_JOBS", "CHUNK_TIMEOUT")

# Settings that only take effect at the next start (SIGHUP logs that they need a restart).
RESTART_REQUIRED = frozenset({
    "max_parallel_workers", "use_parallel_transcription", "cpu_threads", "model", "model_cache",
    "engine", "command", "device", "compute_type", "spool_dir", "node", "watch", "log_format",
    "worker_max_chunks", "worker_max_rss_mb", "on_done", "hook_timeout", "metrics_file", "metrics_seconds",
})


def _smap(name: str, default: Any) -> Any:
    return Field(default, validation_alias=AliasChoices(name, f"SMAPD_{name}", name.lower()))


def _default_cache() -> Path:
    # systemd's CacheDirectory= exports CACHE_DIRECTORY (systemd.exec(5)).
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smapd"


class Settings(BaseSettings):
    """Every setting of smapd. ``config/smapd.env`` documents each one with its default."""

    model_config = SettingsConfigDict(env_prefix="SMAPD_", extra="ignore", populate_by_name=True)

    # --- SMAP's names ---
    max_parallel_workers: Literal["auto"] | int = _smap("MAX_PARALLEL_WORKERS", "auto")
    use_parallel_transcription: bool = _smap("USE_PARALLEL_TRANSCRIPTION", True)
    # auto: start another file while fewer files wait for a slot than there are slots (issue 8)
    max_concurrent_jobs: Literal["auto"] | int = _smap("MAX_CONCURRENT_JOBS", "auto")
    chunk_timeout: Literal["auto"] | float = _smap("CHUNK_TIMEOUT", "auto")

    # --- engine and model ---
    engine: Literal["faster-whisper", "command"] = "faster-whisper"
    model: str = "embedded"
    model_cache: Path = Field(default_factory=_default_cache)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compute_type: str = "int8"
    cpu_threads: Literal["auto"] | int = "auto"
    command: str = ""

    # --- decoding ---
    language: str = "auto"
    task: Literal["transcribe", "translate"] = "transcribe"
    beam_size: int = 5
    word_timestamps: bool = False
    vad: bool = True
    chunk_seconds: float = 30.0
    chunk_retries: int = 1
    formats: str = "txt,srt,vtt,json"
    # profiles (issue 11): defaults a profile or sidecar may override; see smapd/profiles.py
    initial_prompt: str = ""
    hotwords: str = ""
    language_mode: Literal["file", "chunk"] = "chunk"
    profiles: Path | None = None  # SMAPD_PROFILES; default: profiles.toml next to SMAPD_CONFIG

    # --- limits ---
    max_file_bytes: int = 4 * 1024**3
    max_duration_seconds: float = 12 * 3600.0
    worker_max_chunks: int = 500
    worker_max_rss_mb: int = 0

    # --- daemon ---
    spool_dir: Path = Path("/var/spool/smapd")
    node: str = Field(default_factory=socket.gethostname)
    watch: Literal["auto", "inotify", "polling"] = "auto"
    rescan_seconds: float = 5.0
    settle_seconds: float = 2.0
    lease_seconds: float = 120.0
    max_attempts: int = 3
    archive_retention_days: float = 0.0
    shutdown_grace_seconds: float = 60.0
    log_level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    # issue 10: keep each finished chunk in the spool (a takeover resumes); offer the chunks of long
    # files to idle nodes of the spool, and help theirs
    checkpoints: bool = True
    share_chunks: bool = True
    share_min_chunks: int = 6

    # --- operations ---
    on_done: str = ""  # the completion hook's command template ("" = none)
    hook_timeout: float = 60.0
    metrics_file: str = ""  # Prometheus textfile ("" = none)
    metrics_seconds: float = 5.0

    @field_validator("max_parallel_workers", "cpu_threads", "max_concurrent_jobs", mode="before")
    @classmethod
    def _auto_or_positive(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        n = int(str(v).strip()) if str(v).strip().lstrip("-").isdigit() else None
        if n is None or n < 1:
            raise ValueError("expected 'auto' or a whole number >= 1")
        return n

    @field_validator("profiles", mode="before")
    @classmethod
    def _path_or_default(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v  # empty: profiles.toml next to SMAPD_CONFIG

    @field_validator("chunk_timeout", mode="before")
    @classmethod
    def _auto_or_seconds(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError("expected 'auto' or a number of seconds > 0") from None
        if not f > 0:
            raise ValueError("expected 'auto' or a number of seconds > 0")
        return f

    @field_validator("beam_size", "max_attempts", "share_min_chunks")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("expected a whole number >= 1")
        return v

    @field_validator("chunk_retries", "worker_max_chunks", "worker_max_rss_mb", "max_file_bytes")
    @classmethod
    def _not_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("expected a whole number >= 0 (0 = no limit)" if v != -1 else "expected >= 0")
        return v

    @field_validator("chunk_seconds")
    @classmethod
    def _chunk_len(cls, v: float) -> float:
        # Whisper sees 30 s at a time; a longer chunk would be cut into windows blindly again.
        if not 5.0 <= v <= 30.0:
            raise ValueError("expected seconds between 5 and 30 (Whisper's window is 30 s)")
        return v

    @field_validator("rescan_seconds", "settle_seconds", "lease_seconds", "shutdown_grace_seconds",
                     "hook_timeout", "metrics_seconds",
                     "max_duration_seconds")
    @classmethod
    def _positive_seconds(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("expected a number of seconds > 0")
        return v

    @field_validator("archive_retention_days")
    @classmethod
    def _days(cls, v: float) -> float:
        if v < 0:
            raise ValueError("expected days >= 0 (0 = keep forever)")
        return v

    @field_validator("on_done")
    @classmethod
    def _hook(cls, v: str) -> str:
        if v.strip():
            parse_template(v)
        return v

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: str) -> str:
        items = [f.strip().lower() for f in v.split(",") if f.strip()]
        bad = [f for f in items if f not in FORMATS]
        if not items or bad:
            raise ValueError(f"expected a comma-separated subset of {','.join(FORMATS)}")
        return ",".join(dict.fromkeys(items))

    @field_validator("language")
    @classmethod
    def _language(cls, v: str) -> str:
        v = v.strip().lower()
        if v != "auto" and not (2 <= len(v) <= 3 and v.isalpha()) and v not in ("haw", "yue"):
            raise ValueError("expected 'auto' or a language code such as en, de, fr")
        return v

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        if not v or any(c in v for c in "/\0_ \n") or len(v) > 64:
            raise ValueError("expected a short name without '/', '_', spaces or newlines")
        return v

    # --- derived values ---
    @property
    def profiles_file(self) -> tuple[Path, bool]:
        """The profiles file and whether it was named explicitly (SMAPD_PROFILES: then it must exist)."""
        if self.profiles is not None:
            return self.profiles, True
        return Path(os.environ.get("SMAPD_CONFIG") or ".env").parent / "profiles.toml", False

    @property
    def format_list(self) -> tuple[str, ...]:
        return tuple(self.formats.split(","))

    @property
    def chunk_timeout_seconds(self) -> float:
        """CHUNK_TIMEOUT, or its generous default of max(120 s, 4 x the chunk length)."""
        if self.chunk_timeout == "auto":
            return max(120.0, 4 * self.chunk_seconds)
        return float(self.chunk_timeout)


@dataclass(frozen=True)
class WorkerPlan:
    """How many engine slots run, and how many CPU threads each may use."""

    workers: int
    cpu_threads: int
    cores: int
    reason: str


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _available_memory_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4096


# Whisper base int8 in a worker process peaks near 450 MB on a 30 s chunk (measured); leave room.
_MB_PER_SLOT = 700


def plan_workers(settings: Settings) -> WorkerPlan:
    """Split the machine into engine slots so that slots x threads never exceeds the cores."""
    cores = available_cores()
    if not settings.use_parallel_transcription:
        workers = 1
        reason = "USE_PARALLEL_TRANSCRIPTION=false: one chunk at a time"
    elif settings.max_parallel_workers == "auto":
        by_memory = max(1, _available_memory_mb() // _MB_PER_SLOT)
        workers = max(1, min(cores, by_memory))
        reason = f"auto: {cores} cores, memory for {by_memory} slots"
    else:
        workers = int(settings.max_parallel_workers)
        reason = "MAX_PARALLEL_WORKERS"
        if workers > cores:
            # More slots than cores only makes every chunk slower and the timeouts fire sooner.
            reason = f"MAX_PARALLEL_WORKERS={workers} capped to the {cores} cores"
            workers = cores
    if settings.cpu_threads == "auto":
        threads = max(1, cores // workers)
    else:
        threads = int(settings.cpu_threads)
    return WorkerPlan(workers=workers, cpu_threads=threads, cores=cores, reason=reason)


def _env_name(field: str) -> str:
    return field.upper() if field.upper() in _SMAP_NAMES else f"SMAPD_{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment and env file; ``overrides`` (CLI flags) win.

    Raises:
        ConfigError: one line naming the setting, the value and what is allowed.
    """
    env_file = os.environ.get("SMAPD_CONFIG")
    if env_file and not Path(env_file).is_file():
        raise ConfigError(f"SMAPD_CONFIG={env_file!r}: no such file")
    if env_file is None and Path(".env").is_file():
        env_file = ".env"
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(_env_file=env_file, **values)  # type: ignore[call-arg]
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]).lower().removeprefix("smapd_") if err["loc"] else "?"
        name = _env_name(field) if field in Settings.model_fields else field.upper()
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        raise ConfigError(f"setting {name}={err.get('input')!r} is invalid: {msg}") from None
