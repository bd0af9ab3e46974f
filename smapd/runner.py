"""One job end to end: pipeline -> writers and report -> (for the daemon) spool.finish.

``JobConfig`` is built from Settings at the edge (cli, daemon) and carries plain values, so the
pipeline never reads the environment. ``execute`` is shared by ``smapd transcribe`` and the
daemon: it returns the rendered outputs and the report; the caller decides where they go.

Profiles (issue 11): a job's decoding options are the global settings (``JobConfig.defaults``),
then its profile's (the inbox/<profile>/ it was dropped in, or ``--profile``), then its sidecar's;
``JobConfig.for_job`` gives the job its own config. A job whose profile is unknown or whose sidecar
is bad goes to failed/ with a report naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from smapd import audio, pipeline, profiles, writers
from smapd.checkpoints import SpoolCheckpoints, fingerprint
from smapd.chunkstore import Checkpoints
from smapd.engine import EngineSpec
from smapd.errors import ClaimLost, ConfigError, PermanentJobError, TransientJobError
from smapd.model import EMBEDDED, EMBEDDED_NAME, download_named, resolve_model, sha256_file
from smapd.models import Outcome, Transcript
from smapd.pool import Pool
from smapd.profiles import Profiles
from smapd.report import EngineInfo, JobInfo, Measured, Report, input_info
from smapd.report import build as build_report
from smapd.settings import Settings, plan_workers
from smapd.spool import REPORT_SUFFIX, Claim, Spool
from smapd.spool.names import display as names_display

PUBLISH_RETRY_SECONDS = 60.0  # how long a finished job retries publishing before it gives up its claim


@dataclass(frozen=True)
class JobConfig:
    """Everything a job needs, derived once from Settings."""

    engine: EngineSpec
    workers: int
    pipeline: pipeline.PipelineOptions
    formats: tuple[str, ...]
    words: bool
    chunk_timeout: float
    chunk_retries: int
    max_file_bytes: int
    worker_max_chunks: int = 0
    worker_max_rss_mb: int = 0
    checkpoints: bool = False  # issue 10: keep finished chunks in the spool (SMAPD_CHECKPOINTS)
    share_chunks: bool = False  # ... and offer long files' chunks to other nodes (SMAPD_SHARE_CHUNKS)
    share_min_chunks: int = 6
    model_label: str = ""
    plan_reason: str = ""
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # global values of profile options
    profiles: Profiles = dataclasses.field(default_factory=Profiles)

    @classmethod
    def from_settings(cls, s: Settings) -> JobConfig:
        """Read the profiles file, resolve the model (assembling the embedded one if needed) and
        split the machine.

        Raises:
            ConfigError: The profiles file is bad (one line), the model cannot be found, ...
        """
        known = profiles.load(s)
        plan = plan_workers(s)
        if s.engine == "command":
            model = s.model if s.model != EMBEDDED else ""
            label = s.model
        else:
            model = resolve_model(s.model, s.model_cache)
            if not Path(model).is_dir():
                model = download_named(model, s.model_cache)
            label = f"whisper-base (embedded, {EMBEDDED_NAME})" if s.model == EMBEDDED else s.model
        device = s.device
        if device == "auto":
            device = "cuda" if _cuda_available() else "cpu"
        spec = EngineSpec(kind=s.engine, model=model, device=device,
                          compute_type=s.compute_type if device == "cpu" or s.compute_type != "int8"
                          else "int8_float16",
                          cpu_threads=plan.cpu_threads, command=s.command)
        return cls(engine=spec, workers=plan.workers, worker_max_chunks=s.worker_max_chunks,
                   worker_max_rss_mb=s.worker_max_rss_mb, model_label=label, plan_reason=plan.reason,
                   profiles=known, **reloadable(s))

    def for_job(self, profile: str | None = None, sidecar: Mapping[str, Any] | None = None) -> JobConfig:
        """This config with the decoding options of ``profile`` and then ``sidecar`` (validated
        options, see smapd.profiles) on top of the global ones.

        Raises:
            ConfigError: ``profile`` is not configured (the message lists the known ones).
        """
        layers = [self.profiles.get(profile).options] if profile else []
        o = profiles.effective(self.defaults, *layers, sidecar or {})
        return dataclasses.replace(
            self, formats=tuple(o["formats"].split(",")), words=o["word_timestamps"],
            pipeline=dataclasses.replace(self.pipeline, language=o["language"], task=o["task"],
                                         beam_size=o["beam_size"], vad=o["vad"], initial_prompt=o["initial_prompt"],
                                         hotwords=o["hotwords"], language_mode=o["language_mode"]))

    @property
    def options(self) -> dict[str, Any]:
        """The decoding options this config runs with (for the report's ``job.options``)."""
        p = self.pipeline
        return {"language": p.language, "task": p.task, "beam_size": p.beam_size, "formats": ",".join(self.formats),
                "word_timestamps": self.words, "vad": p.vad, "initial_prompt": p.initial_prompt,
                "hotwords": p.hotwords, "language_mode": p.language_mode}

    def make_pool(self) -> Pool:
        return Pool(self.engine, self.workers, chunk_timeout=self.chunk_timeout, retries=self.chunk_retries,
                    max_chunks=self.worker_max_chunks, max_rss_mb=self.worker_max_rss_mb)

    def engine_info(self) -> EngineInfo:
        """How jobs are transcribed, for the report."""
        return EngineInfo(name=self.engine.kind, model=self.model_label, device=self.engine.device,
                          compute_type=self.engine.compute_type if self.engine.kind != "command" else None,
                          workers=self.workers, cpu_threads=self.engine.cpu_threads,
                          beam_size=self.pipeline.beam_size, chunk_seconds=self.pipeline.chunk_seconds,
                          chunk_timeout=self.chunk_timeout, vad=self.pipeline.vad,
                          command=self.engine.command or None)


def _cuda_available() -> bool:
    try:
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return False


@dataclass(frozen=True)
class JobResult:
    """What ``execute`` produced: rendered outputs (empty when failed) and the report."""

    outcome: Outcome
    files: dict[str, bytes]
    record: Report
    error: str | None
    transcript: Transcript | None = None

    @property
    def report(self) -> dict[str, Any]:
        """The report as its JSON object."""
        return self.record.as_dict()

    def published_as(self, stem: str) -> JobResult:
        """This result with its report naming the outputs ``<stem><suffix>``."""
        return dataclasses.replace(self, record=self.record.published_as(stem, tuple(self.files)))


def _cpu_now() -> float:
    t = os.times()
    return t.user + t.system


def execute(path: Path, pool: Pool, config: JobConfig, *, job: JobInfo | Mapping[str, Any],
            display_name: str | None = None, key: str | None = None,
            on_progress: Callable[[pipeline.Progress], None] | None = None,
            checkpoints: Callable[[str | None], Checkpoints | None] | None = None) -> JobResult:
    """Transcribe ``path`` and render its outputs and report. Never raises for bad input.

    Args:
        path: The input file.
        pool: A started pool.
        config: The job's options.
        job: ``id``, ``attempt``, ``node`` and the like (``report.JobInfo`` fields), for the report.
        display_name: The name to report (the original name of a claimed file).
        key: Groups the job's chunks in the pool (the job id).
        on_progress: Progress callback, passed to the pipeline.
        checkpoints: Given the input's SHA-256, the job's checkpoints (the daemon's claims, issue 10).

    Returns:
        The result; its report names the outputs ``<name's stem><suffix>`` (``published_as`` renames).
    """
    info = job if isinstance(job, JobInfo) else JobInfo(**job)
    name = display_name or path.name
    started, cpu0 = time.monotonic(), _cpu_now()
    transcript: Transcript | None = None
    error: str | None = None
    size: int | None = None
    digest: str | None = None
    try:
        size = audio.check_file(path)
        if config.max_file_bytes and size > config.max_file_bytes:
            raise PermanentJobError(
                f"the file is {size:,} bytes, over SMAPD_MAX_FILE_BYTES={config.max_file_bytes:,}")
        digest = sha256_file(path) if size else None
        transcript = pipeline.run(path, pool, config.pipeline, job=name, key=key, on_progress=on_progress,
                                  checkpoints=checkpoints(digest) if checkpoints is not None else None)
    except PermanentJobError as e:
        error = str(e)
    except OSError as e:
        error = f"cannot read the file: {e.strerror or e}"
    wall = time.monotonic() - started
    chunk_cpu = sum(c.cpu_seconds for c in transcript.chunks) if transcript else 0.0
    # The job's own workers: each chunk carries its worker's RSS when it returned (pool-lifetime
    # maxima would charge a small job with a big one's memory). smapd's own process: Linux keeps only
    # its lifetime peak.
    workers = max((c.rss_mb for c in transcript.chunks), default=0.0) if transcript else 0.0
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, workers)
    measured = Measured(wall_seconds=wall, cpu_seconds=_cpu_now() - cpu0 + chunk_cpu, peak_rss_mb=peak)
    outcome = transcript.outcome if transcript and error is None else Outcome.FAILED
    if transcript is not None and outcome is Outcome.FAILED and error is None:
        errors = sorted({c.error or "unknown error" for c in transcript.chunks})
        error = f"no chunk could be transcribed ({len(transcript.chunks)} failed): {'; '.join(errors)}"[:600]
    files = writers.render(transcript, config.formats, config.words) \
        if transcript is not None and outcome is not Outcome.FAILED else {}
    record = build_report(transcript, input=input_info(name, size, digest), job=info, error=error,
                          engine=config.engine_info(), measured=measured,
                          outputs={s: (Path(name).stem or name) + s for s in files})
    log = logger.bind(job=name)
    if outcome is Outcome.FAILED:
        log.error("{}: failed: {}", name, record.error)
    else:
        t = record.totals
        log.info("{}: {} in {:.1f}s ({:.1f}x real time), {} chars, language {}. Success rate: {:.1f}% ({}/{})",
                 name, outcome.value, wall, t.real_time_factor or 0.0, len(transcript.text) if transcript else 0,
                 transcript.language if transcript else "-", t.success_rate, t.chunks_ok,
                 t.chunks_ok + t.chunks_failed)
    return JobResult(outcome=outcome, files=files, record=record, error=record.error, transcript=transcript)


def reloadable(s: Settings) -> dict[str, Any]:
    """The JobConfig fields a SIGHUP may change without reloading the model or the pool (the
    profiles file too: ``with_profiles``)."""
    return {
        "pipeline": pipeline.PipelineOptions(language=s.language, task=s.task, beam_size=s.beam_size, vad=s.vad,
                                             chunk_seconds=s.chunk_seconds, max_seconds=s.max_duration_seconds,
                                             initial_prompt=s.initial_prompt, hotwords=s.hotwords,
                                             language_mode=s.language_mode),
        "formats": s.format_list, "words": s.word_timestamps, "chunk_timeout": s.chunk_timeout_seconds,
        "chunk_retries": s.chunk_retries, "max_file_bytes": s.max_file_bytes, "defaults": profiles.defaults(s),
        "checkpoints": s.checkpoints, "share_chunks": s.share_chunks and s.checkpoints,
        "share_min_chunks": s.share_min_chunks,
    }


def with_profiles(config: JobConfig, s: Settings) -> JobConfig:
    """``config`` with the profiles file re-read (SIGHUP).

    Raises:
        ConfigError: The file is bad (one line); the caller keeps the running profiles.
    """
    return dataclasses.replace(config, profiles=profiles.load(s))


def job_config(claim: Claim, spool: Spool, config: JobConfig) -> JobConfig:
    """The config of one claimed job: its profile folder's options, then its sidecar's.

    Raises:
        ConfigError: Its profile is not configured, or its sidecar is bad (one line naming the key).
        OSError: The sidecar cannot be moved or read (transient: the job is retried).
    """
    found = spool.sidecar(claim)
    label = f"sidecar {names_display(claim.original_name)}{found[0]}" if found else ""
    overrides = profiles.parse_sidecar(found[1], found[0], label) if found else {}
    if claim.profile and claim.profile not in config.profiles.by_name:
        raise ConfigError(f"it was dropped in inbox/{claim.profile}/, but there is no profile "
                          f"{claim.profile!r} ({config.profiles.known()})")
    return config.for_job(claim.profile, overrides)


def chunk_fingerprint(config: JobConfig) -> str:
    """What a checkpointed chunk's text depends on besides its audio: a checkpoint of another
    fingerprint (the model or an option changed) is never reused."""
    p = config.pipeline
    return fingerprint({**config.options, "model": config.model_label, "engine": config.engine.kind,
                        "compute_type": config.engine.compute_type, "chunk_seconds": p.chunk_seconds, "pack": p.pack,
                        "max_seconds": p.max_seconds})


def claim_checkpoints(claim: Claim, spool: Spool, config: JobConfig, node: str,
                      digest: str | None) -> SpoolCheckpoints | None:
    """The checkpoints of a claimed job: its own folder (a takeover finds the earlier attempts'),
    or the one a graceful stop left of the same bytes; None when the spool will not take them."""
    board, fp = spool.job_chunks(claim.job_id), chunk_fingerprint(config)
    p = config.pipeline
    try:
        if digest and not board.exists():
            spool.adopt_chunks(claim.job_id, digest, fp)
        board.begin({"job_id": claim.job_id, "name": names_display(claim.original_name), "digest": digest,
                     "fingerprint": fp, "model": config.model_label, "owner": node, "attempt": claim.attempt,
                     "decode": {"language": p.language, "task": p.task, "beam_size": p.beam_size,
                                "initial_prompt": p.initial_prompt, "hotwords": p.hotwords,
                                "language_mode": p.language_mode}})
    except OSError as e:
        logger.warning("{}: no chunk checkpoints ({})", claim.original_name, e.strerror or e)
        return None
    return SpoolCheckpoints(board, attempt=claim.attempt, share=config.share_chunks,
                            min_chunks=config.share_min_chunks, peers=lambda: len(spool.live_peers()))


def run_claim(claim: Claim, spool: Spool, pool: Pool, config: JobConfig, *, node: str, lost: threading.Event,
              cancelled: threading.Event, on_progress: Callable[[pipeline.Progress], None] | None = None,
              on_finished: Callable[[Path, Report], None] | None = None) -> str:
    """One claimed file end to end; returns "done", "failed", "lost" or "cancelled".

    Data flows one way: transcribe and render -> (success) reserve the output stem and name the
    outputs in the report -> ``spool.finish(claim, files, report)``, which verifies the lease,
    publishes (report last) and archives, or moves the original to failed/. A job whose claim was
    taken over (``lost``) publishes nothing; a cancelled one (shutdown grace ran out) leaves its
    claim for the daemon to hand back. A transient error (disk full, unwritable outbox/) is retried
    for PUBLISH_RETRY_SECONDS under the live lease, then propagates: the claim stays in processing/,
    its lease runs out, and it is retried as the next attempt. ``on_finished(report_path, report)``
    is called once the job is in archive/ or failed/ (the completion hook, the metrics).
    """
    log = logger.bind(job=claim.original_name)
    log.info("{}: job {} started (attempt {}, node {}{})", claim.original_name, claim.job_id, claim.attempt, node,
             f", profile {claim.profile}" if claim.profile else "")
    job = JobInfo(id=claim.job_id, attempt=claim.attempt, node=node, claimed_as=claim.path.name,
                  original_name=claim.original_name, attempts=claim.history, profile=claim.profile)
    try:
        config = job_config(claim, spool, config)
    except ConfigError as e:  # bad sidecar, unknown profile: the file goes to failed/ saying why
        result = JobResult(outcome=Outcome.FAILED, files={}, error=str(e), record=build_report(
            None, input=input_info(claim.original_name), job=job, error=str(e), engine=config.engine_info()))
    else:
        job = dataclasses.replace(job, options=config.options)
        result = execute(claim.path, pool, config, job=job, display_name=claim.original_name, key=claim.job_id,
                         on_progress=on_progress,
                         checkpoints=(lambda digest: claim_checkpoints(claim, spool, config, node, digest))
                         if config.checkpoints else None)
    if lost.is_set():
        log.warning("{}: claim lost to another node during the job; publishing nothing", claim.original_name)
        return "lost"
    if cancelled.is_set():
        return "cancelled"
    chunks = result.transcript.chunks if result.transcript is not None else ()
    if result.outcome is Outcome.FAILED and chunks and all(c.crashed for c in chunks) \
            and claim.attempt < spool.max_attempts:
        # Every chunk lost its worker (killed, OOM, hung) on every retry: that says little about the
        # file. Spend one of its MAX_ATTEMPTS on it, as for a node crash, instead of failing it now;
        # a file that really kills workers still ends in failed/ after the last attempt.
        raise TransientJobError(f"every chunk's worker was killed or hung ({chunks[0].short_error}); the file is "
                                "retried as the next attempt")
    deadline = time.monotonic() + PUBLISH_RETRY_SECONDS
    while True:
        try:
            if result.outcome is not Outcome.FAILED and result.record.job.output_stem is None:
                # Reserve a stem only with something to publish, and only while the claim is ours
                # (a node that slept past its lease must not).
                spool.heartbeat(claim)
                result = result.published_as(spool.output_stem(claim))
            where = spool.finish(claim, result.files, result.record)
            break
        except ClaimLost:
            log.warning("{}: claim lost to another node before publishing; publishing nothing", claim.original_name)
            return "lost"
        except (OSError, TransientJobError) as e:
            # A full disk or an unwritable outbox/ is usually brief: keep the claim (the daemon keeps
            # its lease fresh) and try again, instead of spending one of the file's MAX_ATTEMPTS on it.
            if time.monotonic() > deadline or lost.is_set() or cancelled.is_set():
                raise
            log.warning("{}: cannot publish yet ({}); retrying in 2 s", claim.original_name, e)
            cancelled.wait(2.0)
    if result.outcome is Outcome.FAILED:
        log.error("{}: moved to {}: {}", claim.original_name, where, result.error)
        if on_finished is not None:
            on_finished(Path(f"{where}{REPORT_SUFFIX}"), result.record)
        return "failed"
    log.info("{}: published {} outputs as {}.* in outbox/", claim.original_name, len(result.files),
             result.record.job.output_stem)
    if on_finished is not None:
        on_finished(spool.layout.outbox_dir(claim.profile) / f"{result.record.job.output_stem}{REPORT_SUFFIX}",
                    result.record)
    return "done"
