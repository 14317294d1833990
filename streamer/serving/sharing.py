"""One model per consumer group: workers average what they learn through the model topic.

Periodic averaging of independently trained replicas (federated averaging, local SGD,
DiLoCo) over a compacted topic every worker reads whole (kafka/model_topic.py):

* a worker publishes only weights that are already in a durable checkpoint, so a crash can
  never take back weights that peers averaged in; whole weights, not deltas, so reading one
  twice is harmless;
* the **board** holds the newest compatible weights of every worker of the group (ours as
  we last published them), each with the readings trained since its previous publish;
* averaging, between updates on the serving thread: our weights become the board's
  readings-weighted average plus what we learned since the board last knew our weights
  (``target + (current - base)``). Workers holding the same board compute bitwise the same
  average, so once training stops one round makes every worker's weights equal; a worker
  alone never averages and behaves bitwise as without sharing. Optimizer state stays local.

What is guaranteed: sensor state and offsets exactly once, as without sharing; weights are
eventually shared, not bit-reproducible across crashes when there are several workers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from streamer.core import Learner
from streamer.core import weights as w
from streamer.kafka.model_topic import ModelRecord, ModelTopic
from streamer.observability.metrics import Metrics

log = logging.getLogger("streamer.worker")
H_GROUP, H_FINGERPRINT = "streamer.group", "streamer.fingerprint"
H_READINGS, H_SEQUENCE = "streamer.readings", "streamer.sequence"
RECORD_OVERHEAD = 512  # bytes of a record besides its value, key and headers (batch framing)
MAX_READINGS = 2**53  # a readings header above this is not a count
# A worker whose newest record is older than this left without a tombstone (killed: under a
# Kubernetes Deployment its id, the pod name, never comes back). A reader that has read the
# whole history, and then heard nothing newer from it for a peer TTL (a worker idle for a day
# that resumes as we start keeps its key), publishes its tombstone, so that compaction removes
# the key instead of every new worker fetching it forever.
DEPARTED_AFTER_S = 86400.0


def record_key(group: str, worker: str) -> bytes:
    """A worker's key on the model topic: ``group/worker``, so that two groups sharing the
    topic with the same worker ids never replace each other's records under compaction."""
    return f"{group}/{worker}".encode()


@dataclass(frozen=True)
class Entry:
    """One worker's newest published weights."""

    worker: str
    weights: w.Weights
    readings: int  # readings trained since that worker's previous publish: its weight
    sequence: int
    offset: int | None  # its record's position on the topic, which orders that worker's records
    heard_at: float  # when it arrived, on our wall clock (from history: its create time): its age
    log: int = 0  # the topic's log that offset is on (ModelRecord.log)
    written_s: float = -float("inf")  # its create time, on that worker's clock


class ModelBoard:
    """The newest compatible weights of every worker of the group, ours included (pure logic:
    the records come from the topic, the weights go to the learner, both through the caller)."""

    def __init__(self, me: str, group: str, fingerprint: str, like: w.Weights, ttl_s: float):
        self.me, self.group, self.fingerprint, self.ttl_s = me, group, fingerprint, ttl_s
        self.like = like
        self.entries: dict[str, Entry] = {}
        self.base: w.Weights | None = None  # our weights as the board knows them
        # Every averaging step moved our weights by (target - base); their running sum (None:
        # none yet). Never changed in place: a reference taken at a checkpoint's copy stays.
        self.shift: w.Weights | None = None
        self.version = 0  # changes whenever new weights arrive (ours or a peer's)
        self._skewed: set[str] = set()  # peers whose clock was said to be off (said once)
        # Workers whose newest record so far, from history, is older than DEPARTED_AFTER_S:
        # their keys, to tombstone once the whole history has been read.
        self.departed: dict[str, bytes] = {}
        # The worker whose checkpoint our weights were restored from (a pod replacing one
        # that was killed), and when that checkpoint was taken: its records in the history,
        # and anyone's history from before then, hold weights ours already contain.
        self.restored_from: str | None = None
        self.restored_at = -float("inf")
        # Our key was tombstoned while we serve (another worker took us for departed, or a
        # previous run of our id closed late): peers dropped us; publish ours again.
        self.erased = False

    def ours(self, weights: w.Weights, shift_at_copy: w.Weights | None, readings: int,
             sequence: int, at: float) -> None:
        """We published ``weights``, copied when the averaging shifts added up to
        ``shift_at_copy``: the board (and every peer's) now knows what we had learned up to
        that copy, so our base is those weights plus the averaging shifts applied since."""
        self.entries[self.me] = Entry(self.me, weights, readings, sequence, None, at)
        if shift_at_copy is self.shift:  # no average since the copy: exactly those weights
            self.base = weights
        else:
            since = self.shift if shift_at_copy is None else \
                {n: self.shift[n] - shift_at_copy[n] for n in self.shift}
            self.base = {n: weights[n] + since[n] for n in weights}
        self.version += 1

    def offer(self, record: ModelRecord, now: float) -> str | None:
        """Take a record of the model topic; the reason it was ignored, or None. Whatever the
        bytes, never raises: a peer's record cannot stop this worker."""
        try:
            return self._offer(record, now)
        except Exception:  # noqa: BLE001 - any malformed record is garbage, never fatal
            return "garbage"

    def _offer(self, record: ModelRecord, now: float) -> str | None:
        headers = {k: v for k, v in record.headers if isinstance(v, bytes)}
        if headers.get(H_GROUP, b"").decode(errors="replace") != self.group:
            return None if record.value is None else "other_group"
        prefix = record_key(self.group, "")
        if not (record.key or b"").startswith(prefix) or record.key == prefix:
            return "garbage"
        worker = record.key[len(prefix):].decode()
        if worker == self.me:  # ours: the board has them already
            # A tombstone of our key while we serve (read live, or written after our last
            # publish and read as history after a reconnect): peers dropped us.
            mine = self.entries.get(self.me)
            if record.value is None and mine is not None and (
                    record.arrived_s is not None or record.timestamp_s > mine.heard_at):
                self.erased = True
            return None
        held = self.entries.get(worker)
        if held is not None and None not in (held.offset, record.offset) and (
                record.offset <= held.offset if record.log == held.log
                else record.timestamp_s < held.written_s):  # another log: by its own clock
            return None  # written before what we hold (a re-read): the newer one stays
        self.departed.pop(worker, None)  # a newer record of it: not departed, or said already
        if record.value is None:  # a worker that left cleanly: left out of later averages
            self.entries.pop(worker, None)  # (its weights are in ours already: no new average)
            return None
        # Its age on our clock: from its arrival when read live, so that a peer whose clock is
        # off still counts; history has only its create time to go by (one dated ahead of our
        # clock counts as written now).
        arrived = record.arrived_s
        heard_at = min(record.timestamp_s if arrived is None else arrived, now)
        if now - heard_at > self.ttl_s:
            if arrived is None and now - record.timestamp_s > DEPARTED_AFTER_S:
                self.departed[worker] = record.key
            return None  # too old to average with: not even decoded (a replay of history)
        if arrived is None and (worker == self.restored_from
                                or record.timestamp_s <= self.restored_at):
            # Published from a checkpoint no newer than the one we started from (or, from
            # before it was taken, averaged into it: a pod killed before the one we replace):
            # averaging with it would pull us back towards our own past until the TTL (a lone
            # worker restarted under a new id would not behave as without sharing). Live
            # records, from workers still serving, are averaged as any peer's.
            return None
        if headers.get(H_FINGERPRINT, b"").decode(errors="replace") != self.fingerprint:
            return "incompatible"
        readings = int(headers[H_READINGS])
        sequence = int(headers[H_SEQUENCE])
        if not 0 <= readings <= MAX_READINGS:
            return "garbage"
        weights = w.loads(record.value, self.like)
        if arrived is not None and abs(arrived - record.timestamp_s) > self.ttl_s \
                and worker not in self._skewed:
            self._skewed.add(worker)
            log.warning("model topic: worker %s's clock is %.0f s %s ours (more than the peer "
                        "TTL); its weights are aged from their arrival instead", worker,
                        abs(arrived - record.timestamp_s),
                        "behind" if record.timestamp_s < arrived else "ahead of")
        self.entries[worker] = Entry(worker, weights, readings, sequence, record.offset,
                                     heard_at, record.log, record.timestamp_s)
        self.version += 1
        return None

    def fresh(self, now: float) -> list[Entry]:
        """Ours and the peers heard from within the TTL, in worker-id order (the same order on
        every worker: equal boards give bitwise equal averages). Forgets the others."""
        stale = [k for k, e in self.entries.items()
                 if k != self.me and now - e.heard_at > self.ttl_s]
        for k in stale:  # like a tombstone: no new average by itself
            del self.entries[k]
        return [self.entries[k] for k in sorted(self.entries)]

    def peers(self, now: float) -> int:
        return sum(1 for e in self.fresh(now) if e.worker != self.me)

    def average(self, current: w.Weights, now: float) -> tuple[w.Weights, float] | None:
        """Our next weights and the distance of ``current`` to the board's average; None
        before our first publish or with no fresh peer (nothing to average with)."""
        entries = self.fresh(now)
        if self.base is None or len(entries) < 2:
            return None
        target = w.weighted_average([(e.weights, float(e.readings)) for e in entries])
        distance = w.distance(current, target)
        new = w.rebased(current, self.base, target)
        step = {n: target[n] - self.base[n] for n in target}
        self.shift = step if self.shift is None else {n: self.shift[n] + step[n] for n in step}
        self.base = target
        return new, distance


class ModelSharing:
    """Publishes durable weights and averages with peers, on the serving thread, never
    waiting for Kafka (the topic's I/O runs in its own thread)."""

    def __init__(self, learner: Learner, topic: ModelTopic, worker_id: str, group: str,
                 interval_s: float, ttl_s: float, metrics: Metrics):
        self.learner, self.topic, self.worker_id, self.metrics = learner, topic, worker_id, metrics
        self.interval_s = interval_s
        fingerprint = learner.config.fingerprint()
        self.board = ModelBoard(worker_id, group, fingerprint, learner.weights(), ttl_s)
        self._headers = [(H_GROUP, group.encode()), (H_FINGERPRINT, fingerprint.encode())]
        self._key = record_key(group, worker_id)
        self._pending: w.Weights | None = None  # the newest durable weights not published
        self._pending_shift: w.Weights | None = None  # the board's shift when they were copied
        self._shift_at_copy: w.Weights | None = None  # ... for the checkpoint being written
        self._readings = 0  # trained into the durable weights since our last publish
        self._sequence = 0
        self._published_at = self._averaged_at = -float("inf")  # monotonic
        self._averaged_version = 0
        self._failures_seen = self._published_seen = 0
        self._caught_up_at: float | None = None  # monotonic; None: reading history

    def message_bytes(self) -> int:
        """The size of one published record: the serialized weights, key, headers, framing."""
        headers = self._headers + [(H_READINGS, str(MAX_READINGS).encode()),
                                   (H_SEQUENCE, str(MAX_READINGS).encode())]
        return (len(w.dumps(self.learner.weights())) + len(self._key)
                + sum(len(k) + len(v) for k, v in headers) + RECORD_OVERHEAD)

    def start(self) -> None:
        self.topic.start()

    def checkpoint_restored(self, worker: str, created: float) -> None:
        """Our weights were restored from ``worker``'s checkpoint, taken at ``created`` (wall
        clock), before ``start``."""
        if worker != self.worker_id:
            self.board.restored_from, self.board.restored_at = worker, created

    def checkpoint_taken(self) -> None:
        """A checkpoint copied the learner: remember the averaging shift at that moment."""
        self._shift_at_copy = self.board.shift

    def checkpoint_durable(self, weights: w.Weights, readings: int) -> None:
        """A checkpoint holding ``weights`` is durable; ``readings`` were applied since the
        previous one. Published at the next ``tick`` the interval allows. Never raises (run
        where the worker commits offsets, and in rebalance callbacks): a copy that fails (out
        of device memory) is logged and counted, and the next checkpoint's is published."""
        self._readings += readings
        if not self._readings:  # nothing new was learned: peers already have what we know
            return
        try:
            pending = w.copied(weights, self.learner.device)  # the checkpoint's are on the cpu
        except Exception:  # noqa: BLE001 - never let the shared model stop forecasting
            log.exception("copying the checkpoint's weights to publish failed; serving goes on")
            self.metrics.observe_model_sync_failures(1)
            # An older copy waiting for the interval would go out with these readings too.
            self._pending = None
            return
        self._pending, self._pending_shift = pending, self._shift_at_copy

    def tick(self) -> None:
        """Between micro-batches: read the board, publish, and average when due."""
        now_wall, now = time.time(), time.monotonic()
        if not self.topic.caught_up:
            self._caught_up_at = None
        elif self._caught_up_at is None:
            self._caught_up_at = now
        for record in self.topic.received():
            reason = self.board.offer(record, now_wall)
            if reason is not None:
                self.metrics.observe_model_ignored(reason)
        if self.board.departed and self._caught_up_at is not None \
                and now - self._caught_up_at >= self.board.ttl_s:
            self._tombstone_departed()
        if self.board.erased:
            self._republish()
        # Weights only: tombstoning departed workers is not this worker sharing what it learned.
        failures, published = self.topic.failures, self.topic.weights_published
        if failures > self._failures_seen:
            self.metrics.observe_model_sync_failures(failures - self._failures_seen)
            self._failures_seen = failures
        if published > self._published_seen:  # acknowledged by the broker since the last tick
            self.metrics.observe_model_published(now_wall)
            self._published_seen = published
        if self._pending is not None and now - self._published_at >= self.interval_s:
            self._publish(now_wall, now)
        self.metrics.set_model_peers(self.board.peers(now_wall))
        if self.board.version != self._averaged_version \
                and now - self._averaged_at >= self.interval_s:
            self._average(now_wall, now)

    def _tombstone_departed(self) -> None:
        for key in self.board.departed.values():
            self.topic.publish(key, None, list(self._headers))
        log.info("model topic: tombstoned %d workers silent for more than %.0f h (%s)",
                 len(self.board.departed), DEPARTED_AFTER_S / 3600,
                 ", ".join(sorted(self.board.departed)))
        self.board.departed.clear()

    def _send(self, weights: w.Weights, readings: int) -> None:
        self._sequence += 1
        headers = self._headers + [(H_READINGS, str(readings).encode()),
                                   (H_SEQUENCE, str(self._sequence).encode())]
        self.topic.publish(self._key, w.dumps(weights), headers)

    def _republish(self) -> None:
        """Our newest published weights once more, after a tombstone under our key."""
        self.board.erased = False
        mine = self.board.entries[self.board.me]
        self._send(mine.weights, mine.readings)
        log.warning("model topic: our key was tombstoned while we serve; published our "
                    "weights again")

    def _publish(self, now_wall: float, now: float) -> None:
        weights, shift, self._pending = self._pending, self._pending_shift, None
        self._send(weights, self._readings)
        self.board.ours(weights, shift, self._readings, self._sequence, now_wall)
        self._readings, self._published_at = 0, now

    def _average(self, now_wall: float, now: float) -> None:
        self._averaged_version = self.board.version
        averaged = self.board.average(self.learner.weights(), now_wall)
        if averaged is None:
            return
        new, distance = averaged
        self.learner.set_weights(new)
        self._averaged_at = now
        self._averaged_version = self.board.version
        self.metrics.observe_model_averaged(distance, now_wall)
        log.debug("averaged weights with %d peers (distance %.3g)",
                  len(self.board.entries) - 1, distance)

    def close(self) -> None:
        """Leave: a tombstone tells the peers to stop averaging with our last weights."""
        self.topic.publish(self._key, None, list(self._headers))
        self.topic.close()
