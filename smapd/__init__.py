"""smapd: a transcription daemon. Drop audio into a spool inbox, get transcripts in the outbox."""

__version__ = "0.1.0"
