"""Helping other nodes' long jobs (issue 10): a node whose engine slots would idle, with nothing to
claim in inbox/, takes chunks that other nodes offer, makes them on its own pool and checkpoints
them for their owner, which merges and publishes.

A helper decodes nothing: it reads the chunk's window exactly as the owner cut and levelled it
(``audio/<i>.pcm``, the chunk's own share of the bytes), decodes it with the owner's options and
the language the job's chunks agree on so far, so its text is the text the owner would have made.
Its ``taken/`` entry is a lease it refreshes while it works; if it dies, the owner makes the chunk
itself once the lease has run out. A chunk it fails on is left to the owner, not offered again.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from smapd import pipeline
from smapd.models import ChunkStatus
from smapd.pool import Pool
from smapd.results import chunk_from_dict, result_from_dict, result_to_dict
from smapd.spool import Spool
from smapd.spool.chunks import HELPER, JobChunks
from smapd.worker import TranscribeRequest

LOOK_SECONDS = 1.0  # how often an idle node lists the offered chunks
VOTE_CHUNKS = 8  # a helped chunk's language prior: the vote of the chunks just before it


@dataclass
class Help:
    """One chunk of another node's job that this node is making."""

    job_id: str
    index: int
    name: str
    owner: str
    taken: Path
    started: float = field(default_factory=time.monotonic)


class Helper:
    """This node's help for other nodes' jobs.

    Args:
        spool: This node's spool.
        pool: The engine pool (helped chunks queue in it like a job's, under ``help:<job>``).
        model: This node's model label: only jobs decoded with the same model are helped.
        executor: Where the threads that wait for helped chunks run.
        wake: Called when a helped chunk is done (a slot is free again).
    """

    def __init__(self, spool: Spool, pool: Pool, model: str, executor: Executor, wake: Callable[[], None]) -> None:
        self.spool, self.pool, self.model, self.executor, self.wake = spool, pool, model, executor, wake
        self.helping: dict[tuple[str, int], Help] = {}
        self.made = 0  # chunks made for other nodes since start (status, bench)
        self.audio_seconds = 0.0  # ... their audio seconds
        self.bytes_read = 0  # ... and the bytes read from the spool for them
        self._lock = threading.Lock()
        self._looked = 0.0
        self._stopping = False

    def help(self, free: int, mine: set[str]) -> int:
        """Take up to ``free`` offered chunks of jobs not in ``mine`` (main thread); returns how many."""
        now = time.monotonic()
        if free <= 0 or self._stopping or now - self._looked < LOOK_SECONDS:
            return 0
        self._looked = now
        taken, records = 0, {}
        for job_id, index in self.spool.chunk_offers(mine):
            if taken >= free:
                break
            board = self.spool.job_chunks(job_id)
            if job_id not in records:
                records[job_id] = board.job()
            record = records[job_id]
            if not record or record.get("model") != self.model:
                continue  # another model's text would differ from the owner's
            path = board.take(index, HELPER, os.getpid())
            if path is None:
                continue  # the owner or another helper was first
            h = Help(job_id, index, str(record.get("name") or job_id), str(record.get("owner") or "?"), path)
            with self._lock:
                self.helping[(job_id, index)] = h
            self.executor.submit(self._make, board, record, h)
            taken += 1
        return taken

    def _make(self, board: JobChunks, record: dict[str, Any], h: Help) -> None:
        log = logger.bind(job=h.name)
        try:
            offer = board.offer_of(h.taken)
            if offer is None:
                return
            chunk = chunk_from_dict(offer["chunk"])
            window = board.window(h.index).astype(np.float32) / 32768.0
            known = {f.name for f in dataclasses.fields(pipeline.PipelineOptions)}
            options = pipeline.PipelineOptions(**{k: v for k, v in record.get("decode", {}).items() if k in known})
            forced = None if options.language == "auto" else options.language
            done = []  # the language vote of the chunks before this one (a few: the bytes read stay small)
            for data in board.results(set(range(chunk.index - VOTE_CHUNKS, chunk.index)) if forced is None
                                      else set()).values():
                try:
                    done.append(result_from_dict(data))
                except (KeyError, TypeError, ValueError):
                    continue
            request = TranscribeRequest(
                window, pipeline.decode_options(options, forced or pipeline.language_prior(done), follow=forced is None),
                tuple((float(a), float(b)) for a, b in offer.get("speech", ())))
            log.info("helping {} with chunk {} of {} ({:.1f}-{:.1f} s)", h.owner, chunk.index, h.name, chunk.start,
                     chunk.end)
            result = self.pool.submit(f"help:{h.job_id}", chunk, lambda: request).result()
            if result is None or result.status is not ChunkStatus.OK:
                log.warning("chunk {} of {} failed here ({}); leaving it to {}", chunk.index, h.name,
                            result.short_error if result else "no result", h.owner)
                h.taken.unlink(missing_ok=True)
                return
            result = dataclasses.replace(result, made_by={"node": self.spool.node, "attempt": None, "helper": True})
            board.save(chunk.index, result_to_dict(result))
            self.made += 1
            self.audio_seconds += sum(b - a for a, b in chunk.spans)
            log.info("[{}] Completed in {:.1f}s: {} chars (chunk of {} for {})", chunk.index, result.seconds,
                     result.chars, h.name, h.owner)
        except CancelledError:  # this node is stopping: offer it again rather than make the owner wait a lease
            board.reoffer_taken(h.taken, h.index)
        except (OSError, KeyError, TypeError, ValueError) as e:  # the job ended (its folder is gone), a full disk
            log.info("chunk {} of {}: not helped ({}); leaving it to {}", h.index, h.name,
                     getattr(e, "strerror", None) or e, h.owner)
            h.taken.unlink(missing_ok=True)  # the owner makes it now, not after a lease
        finally:
            with self._lock:
                self.helping.pop((h.job_id, h.index), None)
                self.bytes_read += board.bytes_read
            self._looked = 0.0  # a slot is free: look for the next offered chunk at once, not in LOOK_SECONDS
            self.wake()

    def refresh(self) -> None:
        """Keep the leases of the chunks in the making fresh (any thread)."""
        with self._lock:
            helping = list(self.helping.values())
        for h in helping:
            try:
                os.utime(h.taken)
            except FileNotFoundError:
                pass  # the job ended: its folder is gone
            except OSError as e:
                logger.warning("cannot refresh the lease of chunk {} of {}: {}", h.index, h.name, e.strerror or e)

    def active(self) -> list[dict[str, Any]]:
        """The chunks in the making, JSON-ready (heartbeat, `smapd status`)."""
        now = time.monotonic()
        with self._lock:
            return [{"job_id": h.job_id, "name": h.name, "owner": h.owner, "chunk": h.index,
                     "seconds": round(now - h.started, 1)} for h in self.helping.values()]

    def stop(self) -> None:
        """Take no more chunks; the queued ones are cancelled with the pool and offered again."""
        self._stopping = True
