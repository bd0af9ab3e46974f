"""What a job keeps of its chunks while it runs, and shares with other nodes, as the pipeline sees it
(issue 10): the ``Checkpoints`` protocol, and ``NoCheckpoints`` for ``smapd transcribe``.

``smapd.checkpoints.SpoolCheckpoints`` keeps them in the spool; this module knows nothing of it.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from smapd.models import Chunk, ChunkResult


class Checkpoints(Protocol):
    """Where a job's finished chunks are kept while it runs (issue 10; ``smapd.checkpoints`` keeps
    them in the spool). The pipeline asks it what an earlier attempt or another node already made,
    offers chunks to other nodes, takes a chunk before a slot makes it, and keeps every result."""

    def saved_plan(self) -> list[Chunk] | None:
        """The chunk plan an earlier attempt completed (the same cuts), or None."""

    def saved(self) -> dict[int, ChunkResult]:
        """Chunks already made (by an earlier attempt or a helper), by index."""

    def planned(self, chunks: list[Chunk]) -> None:
        """The plan is complete."""

    def share(self, duration: float, chunk_seconds: float) -> bool:
        """Whether this job's chunks are offered to other nodes."""

    def room(self) -> int:
        """How many more chunks to offer now (a few per helping node are kept on offer)."""

    def offer(self, chunk: Chunk, window: np.ndarray, speech: tuple) -> None:
        """Offer ``chunk`` to other nodes unless it is made or being made: ``window`` is its int16
        samples, ``speech`` its speech spans in window time (what a helper hands its engine, exactly
        as this node would)."""

    def take(self, chunk: Chunk) -> bool:
        """A slot of ours is about to make ``chunk``: False when another node has it."""

    def save(self, result: ChunkResult) -> ChunkResult:
        """Keep a chunk this node made; returns it marked with who made it."""

    def arrived(self, pending: set[int]) -> tuple[list[ChunkResult], list[int]]:
        """Of the chunks other nodes took: the results that arrived, and those to make here after all
        (their helper died or gave up)."""


class NoCheckpoints:
    """``smapd transcribe``: nothing is kept, nothing shared."""

    def saved_plan(self) -> list[Chunk] | None:
        return None

    def saved(self) -> dict[int, ChunkResult]:
        return {}

    def planned(self, chunks: list[Chunk]) -> None:
        pass

    def share(self, duration: float, chunk_seconds: float) -> bool:
        return False

    def room(self) -> int:
        return 0

    def offer(self, chunk: Chunk, window: np.ndarray, speech: tuple) -> None:
        pass

    def take(self, chunk: Chunk) -> bool:
        return True

    def save(self, result: ChunkResult) -> ChunkResult:
        return result

    def arrived(self, pending: set[int]) -> tuple[list[ChunkResult], list[int]]:
        return [], []
