"""The long-running worker: Kafka in, forecasts out, learning online."""

from __future__ import annotations

import errno
import gc
import logging
import math
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from streamer.config import ConfigError, Settings, setting_name, table_too_large
from streamer.core import Learner, LearnerConfig, Reason
from streamer.core.failpoints import failpoint
from streamer.core.learner import StateTooLarge
from streamer.kafka.admin import create_missing_topics, topic_ids
from streamer.kafka.client import (
    LOG_ENDED_AFTER_S,
    Delivery,
    PartitionId,
    StreamClient,
    open_client,
    partition_names,
)
from streamer.kafka.errors import (
    AuthenticationFailed,
    BrokerUnavailable,
    KafkaClientError,
    TopicMissing,
    UndecodableBatch,
    Unfixable,
)
from streamer.kafka.model_topic import ModelTopic
from streamer.observability.health import HealthServer
from streamer.observability.metrics import Metrics
from streamer.serving.checkpoint import WorkerIdInUse
from streamer.serving.codec import largest_output_bytes
from streamer.serving.durability import Durability
from streamer.serving.ledger import PartitionLedger
from streamer.serving.processor import BatchProcessor, Processed, latency_seconds
from streamer.serving.sharing import ModelSharing
from streamer.serving.signals import stop_on_signals

log = logging.getLogger("streamer.worker")
BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 30.0
# While a partition's log ends before our offset, its topic's id is looked up this often: a
# topic deleted (no id) or made again (a new one) is read from its start at once.
ID_LOOKUP_EVERY_S = 1.0
LIVENESS_TIMEOUT_S = 120.0  # the loop must come round at least this often to count as alive
UPDATE_LOG_EVERY = 50
GC_GEN0_THRESHOLD = 20_000  # net new container objects before a young collection
# A worker holding no partition this long says so once (it is ready, and idles: a group with
# more workers than the topic has partitions); `streamer_assigned_partitions` shows it always.
UNASSIGNED_WARN_S = 60.0
TABLE_FULL_WARN_EVERY_S = 60.0  # readings dead-lettered for a full sensor table: said this often
IN_FLIGHT_POLL_TIMEOUT_S = 0.005  # about the producer's linger: the acks come no sooner


class Worker:
    """poll -> decode -> step (trains when due) -> produce -> await acks -> checkpoint + commit."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None):
        self.settings, k = settings, settings.kafka
        _check_outputs_fit(settings)
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        try:
            self.learner = Learner(settings.learner_config())
        except StateTooLarge as exc:
            raise table_too_large(exc) from exc
        self.processor = BatchProcessor(self.learner, k.output_topic, k.dlq_topic,
                                        k.anomaly_topic)
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry, max_grad_norm=self.learner.config.max_grad_norm,
                               device=str(self.learner.device),
                               coverage_target=self.learner.config.coverage,
                               horizon=self.learner.config.horizon,
                               max_sensors=self.learner.config.max_sensors)
        # Health is served even with metrics off: the probes restart a pod they cannot reach.
        metrics_served = self.registry if settings.metrics.enabled else None
        self.health = HealthServer(metrics_served, liveness=self._alive,
                                   readiness=self._readiness, host=settings.metrics.host,
                                   port=settings.metrics.port)
        c = settings.checkpoint
        self.metrics.set_checkpoint_interval(c.interval_seconds)
        self.worker_id = c.worker_id or _host_worker_id()
        self.ledger = PartitionLedger(time.monotonic())
        self.sharing = _sharing(settings, self.learner, self.worker_id, self.metrics)
        try:
            self.durability = Durability(self.learner, self.ledger, c, self.worker_id,
                                         self.metrics, listener=self.sharing)
            # Written to: a read-only one failed every checkpoint, and no offset was committed.
            with tempfile.NamedTemporaryFile(dir=c.dir, prefix=".streamer-probe-"):
                pass
        except WorkerIdInUse as exc:
            raise ConfigError(f"invalid configuration: {setting_name('checkpoint.worker_id')}: "
                              f"{exc} (the id defaults to the host name: give each worker "
                              f"on one host its own)") from exc
        except OSError as exc:  # the directory cannot be created, listed or written to
            # (mkdir says "File exists" of a file: say what is wrong with it)
            why = "a file, not a directory" if c.dir.is_file() else exc.strerror or exc
            raise ConfigError(f"invalid configuration: {setting_name('checkpoint.dir')}: cannot "
                              f"use {str(c.dir)!r}: {why}") from exc
        self._client: StreamClient | None = None
        self._topics_ready = False  # the topics it writes to exist (created when missing)
        self._outputs_seen = False  # ... and were there once (since start-up)
        # Whether partitions were ever assigned: until then the ledger holds what the restore
        # read (maybe another worker's partitions), which is no state of ours to checkpoint.
        self._assigned = False
        # Whether the current consumer's join has ended (an assignment, maybe of nothing). A
        # consumer opened again after broker trouble may find the partitions it held given to
        # another worker meanwhile: until its join says which it holds, nothing is committed
        # or checkpointed, which would move their new owner's offsets back or date our stale
        # state of them as new.
        self._joined = False
        self._uncommitted: dict[PartitionId, int] = {}  # durable while not joined: see _commit
        self._ids_looked_up_at = -math.inf  # monotonic: input topic ids, for a log behind us
        # Stepped batches whose outputs are not acknowledged yet, oldest first. A batch joins
        # before its outputs are handed to the producer and leaves only once every one of them
        # is acknowledged: state and offsets never move past output that could still be lost.
        self._in_flight: deque[_Pending] = deque()
        self._stop = threading.Event()
        self._backoff = BACKOFF_START_S
        self._heartbeat = time.monotonic()
        self._not_ready_reason = "not connected to the broker yet"
        self._unassigned_since: float | None = None  # monotonic: the latest look, idle
        self._idle_warned = False  # "more workers than partitions", once per idle stretch
        # monotonic: when the join under way began (a consumer opened, partitions revoked for
        # a rebalance); None once it has ended (_on_assign)
        self._join_since: float | None = None
        self._join_warned = False  # "the join has not ended", once per join
        self._table_full = _TableFullWarning(self.learner.config)
        self._connected_once = False  # a client was opened: the credentials worked then
        self._stalled_reason = ""  # partitions held at an undecodable batch, if any

    # -- the loop (one screen) --------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit status."""
        self._listen()  # first: a port taken is a setup error, before anything starts
        try:
            self.durability.restore_on_start()
            if self.sharing is not None:
                self.sharing.start()
        except BaseException:
            self._close()
            raise
        with gc_tuned_for_serving():
            return self._serve()

    def _listen(self) -> None:
        m = self.settings.metrics
        try:
            self.health.start()
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):  # taken, or privileged (< 1024)
                raise ConfigError(
                    f"invalid configuration: {setting_name('metrics.port')}: cannot listen on "
                    f"{m.host}:{m.port}: {exc.strerror or exc} (another process has it, or it "
                    "is below 1024? 0 picks a free port)") from exc
            # Not the port: a host that is not an address of this machine, or no address.
            raise ConfigError(
                f"invalid configuration: {setting_name('metrics.host')}: cannot listen on "
                f"{m.host}:{m.port}: {exc.strerror or exc} (0.0.0.0: every interface)") from exc

    def _serve(self) -> int:
        log.info("worker %s started on %s, consuming %s", self.worker_id, self.learner.device,
                 self.settings.kafka.input_topic)
        try:
            self._loop()
        except BaseException:  # a topic we write to cannot be created, before any batch was
            self._close()  # applied (ConfigError, _output_topics), or a defect: no checkpoint
            raise  # (it would date restored state as new), the clients closed
        return self._shutdown()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
            try:
                client = self._connected()
                records = client.poll_batch(self.settings.kafka.max_poll_records,
                                            self._poll_timeout_s())
                if records and not self._topics_ready:  # the input exists now, so can they
                    self._topics_ready = self._output_topics() or True
                assigned = client.assignment()
                self._watch_assignment(assigned)
                # (every partition held: one found behind is looked at again on every turn)
                self._reset_recreated(client, {(r.topic, r.partition) for r in records}
                                      | assigned)
                if records:
                    pending = _Pending(self._process(records))  # decode, step, train
                    self._in_flight.append(pending)  # from here on: sent until acknowledged
                    failpoint("after_step")
                    pending.delivery = client.send(pending.processed.outputs)
                # Batch k's acks are awaited after k+1 was polled and stepped (pipelining).
                self._complete(client, keep=1 if records else 0)
                if not records:  # gauges go on moving while the input is idle
                    self.metrics.observe_flagged([], time.time())
                    # From the client's cached end offsets and positions: no broker round-trip.
                    self.metrics.set_lag(client.lag())
                self._backoff = BACKOFF_START_S
                self._maybe_checkpoint(client)
                self._share()
            except UndecodableBatch as exc:  # that partition is paused; the others go on
                self._undecodable(exc)
            except KafkaClientError as exc:
                if isinstance(exc, AuthenticationFailed) and not self._connected_once:
                    raise  # refused from the start: a setting to fix (exit 2), not an outage
                self._broker_trouble(exc)  # (refused later: credentials rotated? retried)

    def stop(self, *_: object) -> None:
        """Ask the loop to finish the batch in flight and exit (signal-handler safe)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the loop cleanly; a second one exits at once (``signals``)."""
        stop_on_signals(self._stop)

    # -- steps of the loop ------------------------------------------------------------------
    def _poll_timeout_s(self) -> float:
        """Wait briefly while a batch awaits its acks: when the input goes quiet, that batch
        is completed (metrics, checkpoint eligibility) within milliseconds, not a full poll."""
        full = self.settings.kafka.poll_timeout_ms / 1000
        return min(full, IN_FLIGHT_POLL_TIMEOUT_S) if self._in_flight else full

    def _watch_assignment(self, assigned: set[PartitionId]) -> None:
        """Export how many partitions this worker holds. While it holds none, look at the
        input topic every UNASSIGNED_WARN_S: warn (again each time) while it does not exist,
        else once per idle stretch (a group with more workers than the topic has partitions:
        this one idles, ready, until another leaves) once a join has ended giving it nothing,
        or once per join that has gone on for UNASSIGNED_WARN_S (the coordinator holds a join
        until every member has rejoined: one slow to poll holds the group; this worker was
        said to idle for want of partitions while its join was under way)."""
        self.metrics.set_assigned_partitions(len(assigned))
        now = time.monotonic()
        if assigned:  # so the input topic exists, whatever the latest look found
            self._unassigned_since, self._idle_warned = None, False
            self.metrics.set_input_topic_missing(False)
        elif self._unassigned_since is None:
            self._unassigned_since = now
        elif (idle := now - self._unassigned_since) >= UNASSIGNED_WARN_S:
            self._topics_ready = self._output_topics()  # warns while the input topic is missing
            self._unassigned_since = now  # (not when that raised: looked at again next turn)
            k = self.settings.kafka
            if not self._topics_ready:
                return
            if self._join_since is None and not self._idle_warned:
                self._idle_warned = True
                log.warning("no partition of %s assigned to this worker for %.0f s: group %s "
                            "may have more workers than the topic has partitions (this one "
                            "idles until one is free)", k.input_topic, idle, k.group_id)
            elif (self._join_since is not None and not self._join_warned
                  and (joining := now - self._join_since) >= UNASSIGNED_WARN_S):
                self._join_warned = True
                log.warning("this worker's join to group %s has not ended after %.0f s, and it "
                            "holds no partition of %s meanwhile: the group's coordinator waits "
                            "for every member to rejoin, up to the rebalance timeout "
                            "(max.poll.interval.ms, %.0f s), so a member slow to poll holds "
                            "the whole group", k.group_id, joining, k.input_topic,
                            k.consumer().max_poll_interval_ms / 1000)

    def _connected(self) -> StreamClient:
        if self._client is None:
            k = self.settings.kafka
            if not self._topics_ready:  # else again once the input topic has records
                self._topics_ready = self._output_topics()
            self._client = open_client(k.client, k.connection(), k.consumer(), k.producer())
            self._joined = False
            self._join_since, self._join_warned = time.monotonic(), False
            self._connected_once = True
            self._client.subscribe([k.input_topic], on_assign=self._on_assign,
                                   on_revoke=self._on_revoke)
            for pending in self._in_flight:  # unacknowledged: send again
                pending.delivery = self._client.send(pending.processed.outputs)
            self._set_ready(True, "")
            self._track_stalled(self._client)
            log.info("connected to %s as group %s", k.bootstrap_servers, k.group_id)
        return self._client

    def _process(self, records: list) -> Processed:
        fresh = self.ledger.fresh(records)  # re-deliveries of applied records are skipped
        processed = self.processor.process(fresh)
        self.ledger.advance(processed.next_offsets, processed.fed)
        return processed

    def _reset_recreated(self, client: StreamClient, partitions: set[PartitionId]) -> None:
        """Read a partition again from its start when its log now ends before our offset: at
        once when its topic's id changed or it has none (looked up every ID_LOOKUP_EVERY_S
        meanwhile), else once it has for LOG_ENDED_AFTER_S (a failover's lagging high
        watermark is no new log)."""
        now = time.monotonic()
        ends = {tp: client.highwater(tp) for tp in partitions}
        reset = self.ledger.recreated(ends, now, LOG_ENDED_AFTER_S)
        for tp, offset in reset.items():
            log.warning("partition %s ends at %d, before our offset %d: it was recreated or "
                        "lost its data; reading it from its start", partition_names([tp]), ends[tp],
                        offset)
        behind = [tp for tp in ends if self.ledger.behind_for(tp, now) is not None]
        if behind and now - self._ids_looked_up_at >= ID_LOOKUP_EVERY_S:
            # Before its new log grows past our offset, which would hide it.
            self._ids_looked_up_at = now
            try:
                reset.update(self._replaced(behind, missing_is_gone=True))
            except KafkaClientError as exc:  # the end-offset rule still holds
                log.info("could not read the input topic's id (%s)", exc)
        if reset:  # out of range on a log that starts later: the client resets
            client.seek(dict.fromkeys(reset, 0))

    def _replaced(self, partitions: list[PartitionId],
                  missing_is_gone: bool = False) -> dict[PartitionId, int]:
        """Of ``partitions``, those whose topic's id changed since our offset (forgotten, to be
        read from their start), with a warning each (``PartitionLedger.replaced``)."""
        replaced = self.ledger.replaced(partitions, self._topic_ids(partitions), missing_is_gone)
        for tp, offset in replaced.items():
            log.warning("partition %s: its topic was deleted and recreated, or the brokers lost "
                        "their data, since our offset %d (the topic's id changed, or it has none "
                        "now: deleted); reading it from its start", partition_names([tp]), offset)
        return replaced

    def _complete(self, client: StreamClient, keep: int) -> None:
        """Wait for the acks of all but the newest ``keep`` in-flight batches."""
        while len(self._in_flight) > keep:
            pending = self._in_flight[0]
            processed = pending.processed
            client.wait(pending.delivery, self.settings.kafka.produce_timeout_s)
            failpoint("after_produce")
            self._in_flight.popleft()
            self._observe(client, processed)

    def _observe(self, client: StreamClient, processed: Processed) -> None:
        m = self.metrics
        m.observe_batch(processed.consumed, latency_seconds(processed.record_timestamps_ms))
        for reason, count in processed.decode_rejected.items():
            m.observe_dlq(reason, count)
        m.observe_step(processed.result)
        self._table_full.add(int(np.count_nonzero(processed.result.status == Reason.TABLE_FULL)))
        m.observe_flagged(processed.flagged_sensors, time.time())
        self._log_updates(processed)
        m.set_sensors(self.learner.n_sensors, self.learner.capacity)
        m.set_lag(client.lag())
        self.ledger.acknowledged(processed.next_offsets, processed.consumed, time.time())

    def _undecodable(self, exc: UndecodableBatch) -> None:
        """A batch no retry can decode: its partition waits there, loudly, for an operator."""
        log.error("cannot decode the record batch of %s; the partition is held there "
                  "(nothing skipped) until an operator acts, see README 'Undecodable batches'",
                  exc, extra={"partition": partition_names([exc.partition]), "offset": exc.offset})
        self.metrics.observe_undecodable_batch()
        if self._client is not None:
            self._track_stalled(self._client)

    def _track_stalled(self, client: StreamClient) -> None:
        stalled = client.stalled()
        self._stalled_reason = "; ".join(f"undecodable batch in {error}"
                                         for error in stalled.values())
        self.metrics.set_stalled_partitions(len(stalled))
        self.metrics.set_ready(self._readiness()[0])

    def _broker_trouble(self, exc: KafkaClientError) -> None:
        """Log, report not ready, drop the client and wait before reconnecting."""
        if self._stop.is_set():  # (asked to stop meanwhile: no retry is coming)
            log.warning("broker trouble (%s); stopping", exc)
        else:
            log.warning("broker trouble (%s); retrying in %.1f s", exc, self._backoff)
        self.metrics.observe_broker_error()
        self._set_ready(False, f"broker unavailable: {exc}")
        self._topics_ready = False  # checked again on reconnecting: the brokers may have lost them
        self._close_client()
        self._stop.wait(self._backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _maybe_checkpoint(self, client: StreamClient) -> None:
        self._commit(self.durability.written(wait=False))
        if self._joined and self.durability.due():
            self._complete(client, keep=0)  # a checkpoint never covers unacknowledged outputs
            self.durability.begin()

    def _share(self) -> None:
        """Between updates: publish durable weights, average with peers. Sharing can fail;
        serving goes on without it (logged and counted, tried again next turn)."""
        if self.sharing is None:
            return
        try:
            self.sharing.tick()
        except Exception:  # noqa: BLE001 - never let the shared model stop forecasting
            log.exception("sharing weights failed; serving goes on")
            self.metrics.observe_model_sync_failures(1)

    def checkpoint(self) -> None:
        """Checkpoint now and return once it is durable and its offsets are committed (unless
        outputs are still unacknowledged: then only the one in flight is finished)."""
        self._commit(self.durability.written(wait=True))  # the one in flight, if any, first
        if not self._in_flight:
            self.durability.begin()
            self._commit(self.durability.written(wait=True))

    def _commit(self, offsets: dict[PartitionId, int]) -> None:
        """Commit offsets of a durable checkpoint: here and only here do offsets move. Only
        for partitions still held: one given to another worker meanwhile (a reconnect without
        a revocation) must not have its new owner's offset moved back."""
        if not self._joined:  # kept for when the join ends (_on_assign)
            self._uncommitted.update(offsets)
            return
        offsets = {tp: offset for tp, offset in {**self._uncommitted, **offsets}.items()
                   if tp in self.ledger}
        self._uncommitted = {}
        if self._client is not None and offsets:
            try:
                self._client.commit(offsets)
            except KafkaClientError as exc:  # e.g. after a rebalance: the checkpoint has them
                log.info("offsets not committed (%s); the checkpoint holds them", exc)

    # -- partitions coming and going ---------------------------------------------------------
    def _on_assign(self, partitions: list[PartitionId]) -> None:
        """Adopt each partition's newest state (ours or a checkpoint's) and seek to it. Called
        at the end of every join, with no partition too: what we held and this join did not
        give us (a consumer opened again after broker trouble) is another worker's now."""
        self._joined, self._join_since = True, None
        durable = self.durability.written(wait=True)  # no write in flight while adopting
        client = self._client
        current = client.assignment() if client is not None else set(partitions)
        stale = [tp for tp in self.ledger.partitions() if tp not in current]
        if stale:
            log.info("released %s: given to another worker", partition_names(stale))
            self.durability.release(stale)
        self._commit(durable)  # after the release: only for partitions we still hold
        if partitions:
            log.info("assigned %s", partition_names(partitions))
            self._assigned = True
            seeks = self.durability.adopt(partitions)
            # (out of range on a log that starts later: the client resets)
            seeks.update(dict.fromkeys(self._replaced(partitions), 0))
            if seeks and client is not None:
                client.seek(seeks)
        if client is not None:  # a stalled partition may have left, or come back paused
            self._track_stalled(client)

    def _output_topics(self) -> bool:
        """``_create_output_topics``; once they were there, a refusal to create them again
        (brokers that lost them) is retried like any broker trouble, not a setup error that
        would stop the worker with its batches in flight."""
        try:
            ready = _create_output_topics(self.settings)
        except ConfigError as exc:
            if not self._outputs_seen:
                raise
            raise BrokerUnavailable(f"{exc} (they existed before: retrying)") from exc
        self.metrics.set_input_topic_missing(not ready)
        self._outputs_seen = self._outputs_seen or ready
        return ready

    def _topic_ids(self, partitions: list[PartitionId]) -> dict[str, str | None]:
        """The current id of the partitions' topics (None: no such topic, ``topic_ids``); none
        known when the brokers cannot say (a broker without ids, or one that refuses: the
        end-offset rule still holds). A broker that did not answer raises (BrokerUnavailable,
        from the rebalance callback to the loop), so that the lookup is made again at the next
        assignment, not skipped."""
        try:
            return topic_ids(self.settings.kafka.connection(), {t for t, _ in partitions})
        except Unfixable as exc:
            log.warning("could not read the input topic's id (%s): a topic recreated since "
                        "our offsets is recognised only if its log ends before them", exc)
            return {}

    def _on_revoke(self, partitions: list[PartitionId]) -> None:
        log.info("revoked %s", partition_names(partitions))
        if self._join_since is None:  # a rebalance: its join ends with _on_assign
            self._join_since, self._join_warned = time.monotonic(), False
        if self._client is not None:
            self._complete(self._client, keep=0)
        self.checkpoint()  # the next owner starts from here
        self.durability.release(partitions)
        # After the last acks: observing them sets the lag of every partition still assigned.
        self.metrics.forget_lag(partitions)  # or a moved partition is counted twice

    # -- start and stop ----------------------------------------------------------------------
    def _shutdown(self) -> int:
        """Flush, checkpoint, leave; the exit status: 1 where the last checkpoint failed (a
        supervisor saw a clean stop with nothing said: operator pass, a full disk)."""
        log.info("stopping: flushing and checkpointing")
        if self._client is not None:
            try:
                self._complete(self._client, keep=0)
            except KafkaClientError as exc:
                log.error("could not deliver the last batches (they will be re-read): %s", exc)
        status = 0
        try:
            # Never assigned: nothing was applied since the restore, whose checkpoint is on disk
            # already. Writing it again would date another worker's restored partitions as
            # new, to be adopted over (and prune) their owner's newer checkpoints.
            if self._assigned and self._joined:  # (not joined: see _joined)
                self.checkpoint()
                if self.durability.failed:
                    status = 1
                    log.warning("stopping without a final checkpoint (it failed: above): what "
                                "was read since the last durable one is read again by the "
                                "next owner of its partitions (nothing is lost: its offsets "
                                "were not committed); exit status 1")
        finally:  # leave the group at once, whatever happened: its partitions move on
            self._close()
        return status

    def _close(self) -> None:
        """Stop the checkpoint writer, leave the group, then the model topic and health."""
        try:
            self.durability.close()
            self._close_client()
            if self.sharing is not None:  # after the input: its partitions move on first
                self.sharing.close()
        finally:
            self.health.stop()
        log.info("stopped")

    def _close_client(self) -> None:
        self._joined = False  # left the group: what we hold may be another worker's soon
        if self._client is not None:
            self._client.close()
            self._client = None
            self.metrics.set_lag({})  # no client, no partitions: others may hold them now

    # -- health ------------------------------------------------------------------------------
    def _set_ready(self, ready: bool, reason: str) -> None:
        self._not_ready_reason = reason
        self.metrics.set_ready(ready)

    def _readiness(self) -> tuple[bool, str]:
        reason = self._not_ready_reason or self._stalled_reason
        ready = self._client is not None and not reason
        return ready, "ready" if ready else reason

    def _alive(self) -> bool:
        return time.monotonic() - self._heartbeat < LIVENESS_TIMEOUT_S

    def _log_updates(self, processed: Processed) -> None:
        for u in processed.result.updates:
            if u.update_index % UPDATE_LOG_EVERY == 0:
                log.info("update %d: loss %.4g grad_norm %.4g%s slots %d (%.1f ms)",
                         u.update_index, u.loss, u.grad_norm, " clipped" if u.clipped else "",
                         u.slots, u.duration_seconds * 1e3,
                         extra={"update": u.update_index, "loss": u.loss,
                                "grad_norm": u.grad_norm})


@dataclass
class _Pending:
    """A stepped batch whose outputs are not all acknowledged yet."""

    processed: Processed
    # None only between joining the queue and the send in the same loop turn: a send that
    # fails drops the client, and the next one sends every pending batch again on connect.
    delivery: Delivery | None = None


@contextmanager
def gc_tuned_for_serving() -> Iterator[None]:
    """Keep Python's cyclic garbage collector off the hot path while serving (process-wide).

    Everything alive at start-up (torch, the model, the clients: ~300k objects) is frozen out
    of its reach: otherwise every full collection walks that heap again (~130 ms each, several
    per 10k readings in tests/bench_e2e.py). Frozen objects are still freed by reference
    counting. And a micro-batch allocates tens of thousands of short-lived containers (records,
    parsed JSON) that die by reference count within the batch: with the default generation-0
    threshold of 700 they set off ~500 collections a second, 4.5 % of the worker's time.
    On exit, however it happens, the heap is unfrozen and the thresholds are put back.
    """
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], GC_GEN0_THRESHOLD), *thresholds[1:])
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def _create_output_topics(settings: Settings) -> bool:
    """Create the topics the worker writes to when missing, with the input topic's partition
    count (never left to a broker's auto-creation); a cluster that refuses, or an error that
    retrying cannot fix, is a setup error at start-up (ConfigError), not a batch stuck at its
    first dead letter or anomaly days later. A missing input topic leaves them as they are,
    with a warning (False: to be tried again once it has records)."""
    k = settings.kafka
    named = {"kafka.output_topic": k.output_topic, "kafka.dlq_topic": k.dlq_topic,
             "kafka.anomaly_topic": k.anomaly_topic}
    try:
        create_missing_topics(k.connection(), [t for t in named.values() if t],
                              like=k.input_topic)
    except TopicMissing as exc:  # the input may yet be created (by an operator, auto-creation)
        log.warning("waiting for the input topic, named by %s: %s (a topic these credentials "
                    "may not describe looks missing too)", setting_name("kafka.input_topic"), exc)
        return False
    except AuthenticationFailed:  # the credentials, not the topics: said as such (cli.main)
        raise
    except Unfixable as exc:  # refused, unauthorized, unsupported: retrying cannot help
        # (any other KafkaClientError propagates: the loop backs off and tries again)
        settings_named = ", ".join(f"{topic!r}: {setting_name(key)}"
                                   for key, topic in named.items() if topic)
        raise ConfigError(
            f"{exc}. Create the topics the worker writes to, or name existing ones "
            f"({settings_named}; an empty anomaly topic disables anomaly events)"
        ) from exc
    return True


# What a record takes in a produce request besides its key and value (batch and record
# headers, with room to spare).
RECORD_OVERHEAD_BYTES = 512


def _check_outputs_fit(settings: Settings) -> None:
    """ConfigError for settings whose largest forecast the producer would refuse: it would be
    sent again and again, and nothing forecast after it (found at start-up, not at the first
    reading whose numbers are long enough)."""
    limit = settings.kafka.producer().max_request_bytes - RECORD_OVERHEAD_BYTES
    size = largest_output_bytes(settings.model.n_features, settings.forecast.horizon,
                                settings.sensors.max_sensor_id_length)
    if size > limit:
        raise ConfigError(
            f"invalid configuration: a forecast can take {size:,} bytes with "
            f"{setting_name('model.n_features')} = {settings.model.n_features}, "
            f"{setting_name('forecast.horizon')} = {settings.forecast.horizon} and "
            f"{setting_name('sensors.max_sensor_id_length')} = "
            f"{settings.sensors.max_sensor_id_length}, above the {limit:,} a record may take "
            "(Kafka's default max.request.size, 1 MiB, less the record's overhead): lower one "
            "of them")


def _sharing(settings: Settings, learner: Learner, worker_id: str,
             metrics: Metrics) -> ModelSharing | None:
    """The group's weight sharing, or None when off; ConfigError for weights too large to
    publish (found at start-up, never as a stuck consumer)."""
    s = settings.sharing
    metrics.set_model_sync_interval(s.interval_seconds if s.enabled else 0.0)
    if not s.enabled:
        return None
    k = settings.kafka
    topic = ModelTopic(k.connection(), k.model_topic, s.max_message_bytes)
    sharing = ModelSharing(learner, topic, worker_id, k.group_id, s.interval_seconds,
                           s.peer_ttl_seconds, metrics)
    size = sharing.message_bytes()
    if size > s.max_message_bytes:
        raise ConfigError(
            f"the model's weights take {size:,} bytes per record, above the limit of "
            f"{s.max_message_bytes:,} (sharing.max_message_bytes, STREAMER_SHARING__MAX_MESSAGE_"
            "BYTES; Kafka's default message.max.bytes is 1,048,588): raise both the setting and "
            "the broker's or the model topic's max.message.bytes, use a smaller model.hidden_size,"
            " or turn sharing off (STREAMER_SHARING__ENABLED=false)"
        )
    return sharing


def _host_worker_id() -> str:
    return "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in socket.gethostname())


class _TableFullWarning:
    """Readings of new sensors dead-lettered for want of a slot (TABLE_FULL), said in a
    WARNING at most once every TABLE_FULL_WARN_EVERY_S: every new sensor of a full table is
    dead-lettered for good unless slots of idle sensors are freed, and the log said nothing
    (operator pass; the metrics and alerts did)."""

    def __init__(self, config: LearnerConfig) -> None:
        self.config = config
        self.count, self.warned_at = 0, -math.inf

    def add(self, count: int) -> None:
        self.count += count
        now = time.monotonic()
        if not self.count or now - self.warned_at < TABLE_FULL_WARN_EVERY_S:
            return
        c = self.config
        ttl = setting_name("sensors.idle_ttl_seconds")
        freed = (f"a sensor idle {c.sensor_ttl_seconds:g} s frees its slot ({ttl})"
                 if c.sensor_ttl_seconds is not None
                 else f"no idle sensor frees its slot, {ttl} being unset")
        log.warning("the sensor table is full (%d sensors): %d readings of new sensors "
                    "dead-lettered (table_full) since this was last said; %s; raise %s",
                    c.max_sensors, self.count, freed, setting_name("sensors.max_sensors"))
        self.count, self.warned_at = 0, now
