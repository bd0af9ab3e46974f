"""``smapd transcribe FILE...``: the daemon's pipeline from a terminal, outputs into a directory."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from smapd import profiles, writers
from smapd.errors import SmapdError
from smapd.logs import setup_logging
from smapd.models import Outcome
from smapd.pipeline import Progress
from smapd.report import JobInfo
from smapd.runner import JobConfig, execute
from smapd.settings import load_settings
from smapd.spool.names import SIDECAR_SUFFIXES


def _progress_bar(name: str) -> tuple[Callable[[Progress], None], Callable[[], None]]:
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(p: Progress) -> None:
        if p.kind == "planned":
            bar["t"] = tqdm(total=p.total, desc=name[:30], unit="chunk", file=sys.stderr, dynamic_ncols=True)
        elif p.kind == "finished" and "t" in bar:
            bar["t"].update(1)
            if p.result is not None:
                bar["t"].set_postfix_str(f"chunk {p.result.chunk.index}: {p.result.seconds:.1f}s")

    def close() -> None:
        if "t" in bar:
            bar["t"].close()

    return update, close


def _options_for(path: Path, config: JobConfig, profile: str | None, explicit: dict[str, Any]) -> JobConfig:
    """The daemon's layering for one file: settings < profile < its sidecar (``FILE.smapd.json`` or
    ``.toml`` next to it) < the options given on the command line.

    Raises:
        ConfigError: The profile is unknown or the sidecar is bad (one line).
    """
    sidecar: dict[str, Any] = {}
    for suffix in SIDECAR_SUFFIXES:
        side = path.with_name(path.name + suffix)
        if side.is_file():
            sidecar = profiles.parse_sidecar(side.read_bytes(), suffix, f"sidecar {side}")
            break
    return config.for_job(profile, {**sidecar, **explicit})


def transcribe_files(files: list[Path], out_dir: Path, overrides: dict[str, Any], *, progress: str = "auto",
                     quiet: bool = False, profile: str | None = None) -> int:
    """Transcribe each file into ``out_dir``; the exit code of the worst outcome.

    Args:
        files: The inputs.
        out_dir: Where outputs go.
        overrides: Settings given on the command line (None = not given); ``profiles`` names the
            profiles file.
        progress: "auto", "bar" or "log".
        quiet: Only warnings and errors.
        profile: A profile of the profiles file whose options apply (command-line options win).

    Raises:
        SmapdError: Bad settings, profiles file, profile or sidecar (exit 2).
    """
    settings = load_settings(**overrides)
    use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
    setup_logging("WARNING" if quiet or use_bar else settings.log_level, settings.log_format)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SmapdError(f"cannot create the output directory {out_dir}: {e.strerror}") from e
    config = JobConfig.from_settings(settings)
    config.for_job(profile)  # an unknown profile fails now, before the model loads
    explicit = {k: getattr(settings, k) for k in profiles.OPTIONS if overrides.get(k) is not None}
    logger.info("smapd transcribe: engine {}, model {}, {} workers x {} threads ({}), CHUNK_TIMEOUT={:g}s",
                config.engine.kind, config.model_label, config.workers, config.engine.cpu_threads,
                config.plan_reason, config.chunk_timeout)
    worst = 0
    pool = config.make_pool()
    pool.start(wait=False)  # the model loads in the workers while the first file decodes
    try:
        for path in files:
            update, close = _progress_bar(path.name) if use_bar else (None, lambda: None)
            started = time.monotonic()
            job_config = _options_for(path, config, profile, explicit)
            try:
                result = execute(path, pool, job_config, on_progress=update,
                                 job=JobInfo(id=None, attempt=1, node=settings.node, original_name=path.name,
                                             profile=profile, options=job_config.options))
            finally:
                close()
            stem = path.stem or path.name
            if result.outcome is not Outcome.FAILED:
                result = result.published_as(stem)  # the report names its outputs and stem
            written = writers.publish(out_dir, stem, result.files, result.record)
            code = {Outcome.SUCCESS: 0, Outcome.PARTIAL: 3, Outcome.FAILED: 1}[result.outcome]
            severity = {0: 0, 3: 1, 1: 2}  # failed > partial > success
            worst = code if severity[code] > severity[worst] else worst
            t = result.report["totals"]
            if result.outcome is Outcome.FAILED:
                print(f"smapd: {path}: {result.error}", file=sys.stderr)
            elif not quiet:
                print(f"{path}: {result.outcome.value} in {time.monotonic() - started:.1f}s "
                      f"({t['real_time_factor']}x real time), success rate {t['success_rate']:.1f}% "
                      f"({t['chunks_ok']}/{t['chunks_ok'] + t['chunks_failed']}), language "
                      f"{result.report['language']['code']} -> {', '.join(str(p) for p in written.values())}",
                      file=sys.stderr)
    finally:
        pool.close()
    return worst


def check() -> int:
    """Validate the settings and start the engine once (model load), for ``smapd check``."""
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    config = JobConfig.from_settings(settings)
    with config.make_pool():
        pass
    known = config.profiles
    where = f" from {known.source}" if known.source else ""
    print(f"ok: engine {config.engine.kind}, model {config.model_label} ({config.engine.model}), "
          f"{config.workers} workers x {config.engine.cpu_threads} threads ({config.plan_reason}); "
          f"{known.known()}{where}")
    return 0
