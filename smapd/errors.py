"""One flat error hierarchy. Third-party errors are wrapped with ``raise ... from e``.

Errors are caught in exactly two places: the job boundary (runner) and the CLI.
"""
from __future__ import annotations


class SmapdError(Exception):
    """Base of every error smapd raises on purpose. ``str(e)`` is one readable sentence."""


class ConfigError(SmapdError):
    """A setting has a bad value, or the model cannot be found or verified."""


class ModelError(ConfigError):
    """The model directory is missing, incomplete or fails its checksum."""


class JobError(SmapdError):
    """A job could not be completed."""


class PermanentJobError(JobError):
    """The input itself is bad (empty, corrupt, not audio, too long): retrying cannot help."""


class TransientJobError(JobError):
    """Something around the input failed (disk full, lost claim, killed worker): a retry may help."""


class ChunkError(SmapdError):
    """One chunk failed in its engine slot."""


class ChunkTimeout(ChunkError):
    """The chunk ran past CHUNK_TIMEOUT; its slot was killed."""


class WorkerDied(ChunkError):
    """The engine slot's process died (crash, OOM kill, signal) while working on the chunk."""


class ClaimLost(TransientJobError):
    """Another node took over this job's claim (our lease expired); we must publish nothing."""
