"""A claimed job's chunk checkpoints and shared chunks, as the pipeline sees them (issue 10).

``SpoolCheckpoints`` implements ``pipeline.Checkpoints`` over the job's folder in the spool
(``smapd.spool.chunks``): it turns chunks and results into their JSON records, decides which
chunks to make here and which are another node's, and says who made each one. Checkpoints make a
job cheaper to resume; they never decide whether it succeeds: a checkpoint that cannot be written
(disk full, a read-only mount) is logged once and the job goes on without checkpoints, trying again
after RETRY_SECONDS.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from loguru import logger

from smapd.models import Chunk, ChunkResult, ChunkStatus
from smapd.results import chunk_from_dict, chunk_to_dict, result_from_dict, result_to_dict
from smapd.spool.chunks import HELPER, OWNER, JobChunks, Taken

RETRY_SECONDS = 30.0  # after a failed write, how long to go without checkpoints before trying again
OFFERED_PER_PEER = 3  # chunks kept on offer per other live node: enough for its idle slots to take at once


def fingerprint(options: dict[str, Any]) -> str:
    """What a chunk's text depends on besides its audio (model, decoding options, chunking)."""
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SpoolCheckpoints:
    """One attempt's view of its job's checkpoints.

    Args:
        board: The job's folder in the spool.
        attempt: This claim's attempt (its ``taken/`` entries are ``a<attempt>``).
        share: Offer the chunks of long files to other nodes (SMAPD_SHARE_CHUNKS).
        min_chunks: Only files of at least this many chunks are offered (SMAPD_SHARE_MIN_CHUNKS).
        peers: How many other nodes could help now.
    """

    def __init__(self, board: JobChunks, *, attempt: int, share: bool, min_chunks: int,
                 peers: Callable[[], int]) -> None:
        self.board, self.attempt = board, attempt
        self._share, self._min_chunks, self._peers = share, min_chunks, peers
        self._held: set[int] = set()  # chunks this attempt makes
        self._redone: set[int] = set()  # ... that a node which died had started
        self._failed_at: float | None = None  # the last write that failed (a full disk, a read-only mount)

    @property
    def _broken(self) -> bool:
        """A write failed lately: write nothing for RETRY_SECONDS (each try would fail again)."""
        return self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_SECONDS

    def _failed(self, what: str, e: OSError) -> None:
        if isinstance(e, FileNotFoundError) and not self.board.dir.exists():
            logger.debug("job {}: its checkpoints are gone (the job ended elsewhere)", self.board.job_id)
        elif self._failed_at is None:
            logger.warning("job {}: cannot {} in {} ({}); going on without checkpoints, trying again every {:.0f} s",
                           self.board.job_id, what, self.board.dir, e.strerror or e, RETRY_SECONDS)
        self._failed_at = time.monotonic()

    def _wrote(self) -> None:
        if self._failed_at is not None:
            logger.info("job {}: checkpoints are written again", self.board.job_id)
            self._failed_at = None

    # --- pipeline.Checkpoints --------------------------------------------------------------------------

    def saved_plan(self) -> list[Chunk] | None:
        try:
            plan = self.board.plan()
            return [chunk_from_dict(c) for c in plan] if plan else None
        except (KeyError, TypeError, ValueError):
            return None

    def saved(self) -> dict[int, ChunkResult]:
        out = {}
        for index, data in self.board.results().items():
            try:
                out[index] = dataclasses.replace(result_from_dict(data), resumed=True)
            except (KeyError, TypeError, ValueError):
                logger.warning("job {}: checkpoint of chunk {} is unreadable; making it again", self.board.job_id,
                               index)
        return out

    def planned(self, chunks: list[Chunk]) -> None:
        try:
            self.board.save_plan([chunk_to_dict(c) for c in chunks])
        except OSError as e:
            self._failed("save the chunk plan", e)

    def share(self, duration: float, chunk_seconds: float) -> bool:
        return self._share and not self._broken and duration >= self._min_chunks * chunk_seconds \
            and self._peers() > 0

    def room(self) -> int:
        return 0 if self._broken else max(0, OFFERED_PER_PEER * max(1, self._peers()) - len(self.board.offered()))

    def offer(self, chunk: Chunk, window: np.ndarray, speech: tuple) -> None:
        i = chunk.index
        if self._broken or i in self._held or i in self.board.offered() or self.board.takers(i):
            return  # being made, or on offer already (a chunk with a result is never offered: see pipeline)
        try:
            self.board.offer(i, {"chunk": chunk_to_dict(chunk), "speech": [list(s) for s in speech]}, window)
        except OSError as e:
            self._failed("offer chunks to other nodes", e)

    def take(self, chunk: Chunk) -> bool:
        i = chunk.index
        if i in self._held:
            return True  # a retry of a chunk we hold
        try:
            taken = self.board.take(i, OWNER, self.attempt) is not None
            others = [t for t in self.board.takers(i) if not self._ours(t)]
            if not taken:
                if self.board.result(i) is not None or self._live_helper(others):
                    return False
                self.board.mark(i, self.attempt)
        except OSError as e:
            self._failed("take a chunk", e)
            others = []
        if others:  # a node that died (an earlier attempt, a helper past its lease) had started it
            self._redone.add(i)
        self._held.add(i)
        return True

    def save(self, result: ChunkResult) -> ChunkResult:
        result = dataclasses.replace(result, made_by={"node": self.board.node, "attempt": self.attempt,
                                                      "helper": False},
                                     redone=result.chunk.index in self._redone)
        if result.status is ChunkStatus.OK and not self._broken:
            try:
                self.board.save(result.chunk.index, result_to_dict(result))
                self._wrote()
            except OSError as e:
                self._failed("save a checkpoint", e)
        return result

    def arrived(self, pending: set[int]) -> tuple[list[ChunkResult], list[int]]:
        came, redo = [], []
        for i in sorted(pending):
            data = self.board.result(i)
            if data is not None:
                try:
                    came.append(result_from_dict(data))
                    continue
                except (KeyError, TypeError, ValueError):
                    pass
            if not self._live_helper(self.board.takers(i)):
                redo.append(i)  # its helper died, stopped or gave up: make it here
        return came, redo

    # --- helpers ----------------------------------------------------------------------------------------

    def _ours(self, t: Taken) -> bool:
        return t.kind == OWNER and t.n == self.attempt and t.node == self.board.node

    def _live_helper(self, takers: list[Taken]) -> bool:
        """Whether a helper holds the chunk within its lease (the spool clock is read only if one might)."""
        helpers = [t for t in takers if t.kind == HELPER]
        if not helpers:
            return False
        now = self.board.clock.now()
        return any(self.board.live(t, now) for t in helpers)
