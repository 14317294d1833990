"""Keeping the worker's state durable: checkpoints of the learner and the partition ledger.

Taken on the serving thread (a copy), written in the background (checkpoint_writer.py), read
back on start and, per partition, when partitions are assigned. The rules the guarantees in
the README rest on:

* a checkpoint is only taken when every applied reading's outputs are acknowledged (the caller
  makes sure of that before ``begin``);
* the offsets a checkpoint holds are handed out for committing (``written``) only once it is
  durable, so a committed offset is never ahead of a durable checkpoint, and a worker that
  crashes, even before its first checkpoint, replays into exactly the state it had.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from streamer.config import CheckpointSettings, setting_name
from streamer.core import Learner
from streamer.core import snapshot as snap
from streamer.kafka.client import PartitionId, partition_names
from streamer.observability.metrics import Metrics
from streamer.serving.checkpoint import CheckpointError, CheckpointStore
from streamer.serving.checkpoint_writer import CheckpointWriter
from streamer.serving.ledger import PartitionLedger

log = logging.getLogger("streamer.worker")


class CheckpointListener(Protocol):
    """Told which worker's checkpoint the start restored, when a checkpoint is taken (on the
    serving thread) and once it is durable."""

    def checkpoint_restored(self, worker: str, created: float) -> None: ...

    def checkpoint_taken(self) -> None: ...

    def checkpoint_durable(self, weights: dict, readings: int) -> None:
        """``weights``: the model's, as the checkpoint holds them; ``readings``: applied since
        the previous checkpoint."""


class Durability:
    def __init__(self, learner: Learner, ledger: PartitionLedger, settings: CheckpointSettings,
                 worker_id: str, metrics: Metrics, listener: CheckpointListener | None = None):
        self.learner, self.ledger, self.settings = learner, ledger, settings
        self.worker_id, self.metrics, self.listener = worker_id, metrics, listener
        self.store = CheckpointStore(settings.dir, worker_id, learner.config.fingerprint(),
                                     settings.keep)
        self.writer = CheckpointWriter(self.store)
        self._covered = 0  # readings the checkpoint in flight covers
        self.failed = False  # the latest checkpoint write failed (none has been durable since)

    def restore_on_start(self) -> None:
        """Resume from our newest valid checkpoint (else anyone's, for the weights)."""
        found = self.store.latest(prefer=self.worker_id)
        if found is None:
            unusable = self.store.has_any()  # (each one said why, reading it)
            if unusable and not self.settings.allow_fresh_start:
                raise CheckpointError(
                    f"no usable checkpoint in {self.store.directory} and "
                    f"{setting_name('checkpoint.allow_fresh_start')} is off"
                )
            if unusable:
                log.warning("no usable checkpoint in %s (each is of another model "
                            "configuration or damaged, above): starting fresh",
                            self.store.directory)
            else:
                log.info("no checkpoint in %s: starting fresh", self.store.directory)
            return
        self.learner.load(found.state)
        if self.listener is not None:
            self.listener.checkpoint_restored(found.worker, found.created)
        for tp, offset in found.offsets.items():
            self.ledger.adopt(tp, offset, found.sensors.get(tp, []), found.created,
                              found.topic_ids.get(tp))
        log.info("restored %s: %d sensors, %d updates, offsets %s", found.path.name,
                 self.learner.n_sensors, self.learner.updates, found.offsets)

    # -- taking and writing ------------------------------------------------------------------
    def due(self) -> bool:
        """Whether an interval has passed with new readings and no write is in flight."""
        return not self.writer.in_flight and self.ledger.checkpoint_due(
            time.monotonic(), self.settings.interval_seconds, self.settings.interval_readings)

    def begin(self) -> None:
        """Take a checkpoint (the learner's copy and the ledger's offsets) to be written in the
        background; every applied reading's outputs must be acknowledged."""
        offsets = self.ledger.offsets()
        self.ledger.forget_sensors_not_in(self.learner.table)
        copy_seconds = self.writer.begin(self.learner, offsets, self.ledger.sensors(offsets),
                                         self.ledger.topic_ids())
        self._covered = self.ledger.checkpoint_taken(time.monotonic())
        self.metrics.observe_checkpoint_copy(copy_seconds)
        if self.listener is not None:
            self.listener.checkpoint_taken()

    def written(self, wait: bool) -> dict[PartitionId, int]:
        """The offsets to commit once the checkpoint in flight is durable (waiting for it with
        ``wait``); empty while it is being written, when none is, or when it failed."""
        written = self.writer.finished(wait)
        if written is None:
            return {}
        self.failed = written.error is not None
        if written.error is not None:
            log.error("checkpoint failed: %s", written.error)
            self.metrics.observe_checkpoint_failure()
            self.ledger.checkpoint_failed(self._covered)  # retried at the next interval
            return {}
        saved = written.saved
        self.metrics.observe_checkpoint(saved.duration_seconds, saved.size_bytes, time.time())
        log.debug("checkpoint %s (%d bytes, %.1f ms on the serving thread)", saved.path.name,
                  saved.size_bytes, written.copy_seconds * 1e3)
        if self.listener is not None:
            self.listener.checkpoint_durable(written.model, self._covered)
        return written.offsets

    def close(self) -> None:
        self.writer.close()

    # -- partitions coming and going ---------------------------------------------------------
    def adopt(self, partitions: list[PartitionId]) -> dict[PartitionId, int]:
        """Take each partition's newest state (ours, or a newer checkpoint's); returns where
        to read each held partition from. No write may be in flight (``written(wait=True)``):
        the directory is read as it will stay, pruning included."""
        if self.writer.in_flight:
            raise RuntimeError("adopt() with a checkpoint write in flight: finish it first")
        seeks, read, unheld = {}, {}, []
        for tp in partitions:
            checkpoint = self.store.latest_for(tp, newer_than=self.ledger.current_at(tp),
                                               read=read)
            mine = checkpoint is not None and checkpoint.worker == self.worker_id
            if checkpoint is not None and not (mine and tp in self.ledger):
                ids = checkpoint.sensors.get(tp, [])
                self.learner.import_sensors(snap.sensors_of(checkpoint.state, ids))
                self.ledger.adopt(tp, checkpoint.offsets[tp], ids, checkpoint.created,
                                  checkpoint.topic_ids.get(tp))
                log.info("partition %s: restored %d sensors from %s at offset %d",
                         partition_names([tp]), len(ids), checkpoint.path.name,
                         checkpoint.offsets[tp])
            offset = self.ledger.next_offset(tp)
            if offset is not None:
                seeks[tp] = offset
            else:
                unheld.append(tp)
        if unheld:  # (every worker of a group must see the others' checkpoints: README)
            log.info("%s: no checkpoint holds %s: read from the group's committed offsets, "
                     "else as kafka.auto_offset_reset says, their sensors starting fresh",
                     partition_names(unheld), "it" if len(unheld) == 1 else "them")
        return seeks

    def release(self, partitions: list[PartitionId]) -> None:
        """Forget partitions and the sensors fed from them."""
        self.learner.drop_sensors(self.ledger.release(partitions))
