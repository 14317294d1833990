"""Checkpoints written in the background: the serving thread only copies the learner.

Serializing, hashing, writing and fsync of a checkpoint take seconds at 100k sensors; a copy
of the learner into buffers reused from the previous checkpoint takes tens of milliseconds.
So the serving thread copies (a consistent state: nothing steps the learner meanwhile) and a
single background thread writes, at most one checkpoint at a time. The caller commits a
checkpoint's offsets only once ``finished`` reports it durable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from streamer.core import Learner
from streamer.kafka.client import PartitionId
from streamer.serving.checkpoint import CheckpointStore, SaveStats

log = logging.getLogger(__name__)
WRITER_NICENESS = 10  # added to the writer thread's: the serving thread comes first


@dataclass(frozen=True)
class Written:
    """A background write that ended: durable (``saved``) or failed (``error``)."""

    offsets: dict[PartitionId, int]  # what the checkpoint holds: commit these once durable
    copy_seconds: float  # the serving thread's part
    saved: SaveStats | None = None
    error: Exception | None = None
    model: dict | None = None  # the weights it holds (read before the next begin: reused)


class CheckpointWriter:
    def __init__(self, store: CheckpointStore):
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint",
                                        initializer=_yield_to_serving)
        self._future: Future[Written] | None = None
        self._buffer: dict | None = None  # the last snapshot, reused once its write ended

    @property
    def in_flight(self) -> bool:
        """Whether a write was begun and its end not yet taken with ``finished``."""
        return self._future is not None

    def begin(self, learner: Learner, offsets: dict[PartitionId, int],
              sensors: dict[PartitionId, list[str]],
              topic_ids: dict[PartitionId, str] | None = None) -> float:
        """Copy the learner now and write it with ``offsets``, ``sensors`` and ``topic_ids``
        in the background; returns the seconds the copy took (the caller's stall)."""
        if self._future is not None:
            raise RuntimeError("a checkpoint is in flight: take its end with finished() first")
        started, taken_at = time.perf_counter(), time.time()
        state = self._buffer = learner.snapshot(reuse=self._buffer)
        copy_seconds = time.perf_counter() - started
        self._future = self._pool.submit(self._write, state, offsets, sensors, topic_ids or {},
                                         taken_at, copy_seconds)
        return copy_seconds

    def finished(self, wait: bool = False) -> Written | None:
        """The write in flight once it ended (waiting for it with ``wait``); None while it
        runs, or when none is in flight."""
        if self._future is None or (not wait and not self._future.done()):
            return None
        future, self._future = self._future, None
        return future.result()

    def close(self) -> None:
        """Wait for a write in flight and stop the background thread."""
        self._pool.shutdown(wait=True)

    def _write(self, state: dict, offsets: dict[PartitionId, int],
               sensors: dict[PartitionId, list[str]], topic_ids: dict[PartitionId, str],
               taken_at: float, copy_seconds: float) -> Written:
        try:
            saved = self.store.save(state, offsets, sensors, created=taken_at,
                                    topic_ids=topic_ids)
        except Exception as exc:  # noqa: BLE001 - I/O or serialization: reported, never fatal
            return Written(offsets, copy_seconds, error=exc)
        return Written(offsets, copy_seconds, saved=saved, model=state["model"])


def _yield_to_serving() -> None:
    """Lower the writer thread's scheduling priority (Linux: per thread), so that on a busy
    machine the background write waits for the CPU rather than the serving thread, the Kafka
    client and whatever shares the host. Not idle priority: a write must still finish while
    the machine is saturated, or offsets would never be committed."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid)
                       + WRITER_NICENESS)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: same priority
        log.debug("checkpoint writer keeps its priority: %s", exc)
