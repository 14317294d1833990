"""The partition ledger: what one worker holds of each input partition.

Per partition: the next offset to apply (records below it were applied already), the sensors
whose readings came from it (they move with it), and when our state of it was last current
(a checkpoint older than that is stale for us). Across partitions: how many readings were
applied since the last checkpoint was taken. The ledger is plain bookkeeping: no broker, no
learner, no clock of its own (callers pass times), so every rule durability depends on is
tested without a broker (tests/serving/test_ledger.py).
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Mapping, Sequence

from streamer.kafka.client import InputRecord, PartitionId


class PartitionLedger:
    def __init__(self, now: float) -> None:
        """``now``: monotonic seconds; the first checkpoint interval runs from here."""
        self._next: dict[PartitionId, int] = {}
        self._sensors: dict[PartitionId, set[str]] = {}
        self._current_at: dict[PartitionId, float] = {}  # wall-clock seconds (time.time())
        self._topic_id: dict[PartitionId, str] = {}  # the topic id our offset is in, if known
        self._behind_since: dict[PartitionId, float] = {}  # monotonic: its log ends before us
        self._since_checkpoint = 0
        self._checkpoint_taken_at = now  # monotonic seconds

    # -- what is held ------------------------------------------------------------------------
    def __contains__(self, tp: PartitionId) -> bool:
        return tp in self._next

    def partitions(self) -> set[PartitionId]:
        return set(self._next)

    def next_offset(self, tp: PartitionId) -> int | None:
        return self._next.get(tp)

    def offsets(self) -> dict[PartitionId, int]:
        """The next offset to apply of every held partition (a copy)."""
        return dict(self._next)

    def sensors(self, partitions: Iterable[PartitionId]) -> dict[PartitionId, list[str]]:
        """The sensors fed from each of ``partitions``, sorted."""
        return {tp: sorted(self._sensors.get(tp, ())) for tp in partitions}

    def topic_ids(self) -> dict[PartitionId, str]:
        """The topic id each held partition's offset is in, where known (a copy)."""
        return {tp: i for tp, i in self._topic_id.items() if tp in self._next}

    def current_at(self, tp: PartitionId) -> float:
        """When our state of ``tp`` was last current; -inf if we hold none."""
        return self._current_at.get(tp, -math.inf)

    # -- a batch ----------------------------------------------------------------------------
    def fresh(self, records: Sequence[InputRecord]) -> list[InputRecord]:
        """The records not applied yet: a re-delivery below a partition's next offset (after a
        reconnect or a restored checkpoint) is dropped, so each reading changes state once."""
        return [r for r in records if r.offset >= self._next.get((r.topic, r.partition), 0)]

    def advance(self, next_offsets: Mapping[PartitionId, int],
                fed: Iterable[tuple[PartitionId, str]]) -> None:
        """Record a batch as applied: its partitions' new next offsets, and (partition, sensor)
        of each reading that fed a sensor."""
        for tp, sensor_id in fed:
            self._sensors.setdefault(tp, set()).add(sensor_id)
        self._next.update(next_offsets)

    def forget_sensors_not_in(self, held: Container[str]) -> None:
        """Forget the sensors the learner no longer holds (evicted when idle): each
        partition's set stays within the sensor table, however many ids come and go, and so
        do the checkpoints that list them."""
        for sensors in self._sensors.values():
            gone = [sensor_id for sensor_id in sensors if sensor_id not in held]
            sensors.difference_update(gone)

    def acknowledged(self, next_offsets: Mapping[PartitionId, int], readings: int,
                     wall_time: float) -> None:
        """A batch's outputs are all acknowledged: our state of its partitions is current."""
        for tp in next_offsets:
            if tp in self._next:
                self._current_at[tp] = wall_time
        self._since_checkpoint += readings

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_due(self, now: float, every_seconds: float | None,
                       every_readings: int | None) -> bool:
        """Whether readings were applied since the last checkpoint and one of the intervals
        (either may be None: never by that measure) has passed since it was taken."""
        if not self._since_checkpoint:
            return False
        by_time = every_seconds is not None and now - self._checkpoint_taken_at >= every_seconds
        by_count = every_readings is not None and self._since_checkpoint >= every_readings
        return by_time or by_count

    def checkpoint_taken(self, now: float) -> int:
        """A checkpoint copied the state as it is now: the next one counts from here. Returns
        the readings it covers (for ``checkpoint_failed``)."""
        covered, self._since_checkpoint, self._checkpoint_taken_at = self._since_checkpoint, 0, now
        return covered

    def checkpoint_failed(self, readings: int) -> None:
        """The checkpoint taken did not become durable: its readings count towards the next
        one again, which is due an interval after the failed one was taken."""
        self._since_checkpoint += readings

    # -- partitions coming and going --------------------------------------------------------
    def adopt(self, tp: PartitionId, next_offset: int, sensor_ids: Iterable[str],
              current_at: float, topic_id: str | None = None) -> None:
        """Hold ``tp`` as a checkpoint left it (replacing what we held of it); ``topic_id``:
        the id of the topic its offset is in, if the checkpoint knew it."""
        self._next[tp] = next_offset
        self._sensors[tp] = set(sensor_ids)
        self._current_at[tp] = current_at
        self._behind_since.pop(tp, None)
        if topic_id is None:
            self._topic_id.pop(tp, None)
        else:
            self._topic_id[tp] = topic_id

    def release(self, partitions: Iterable[PartitionId]) -> list[str]:
        """Stop holding ``partitions``; returns the sensors fed from them and from no partition
        still held (to drop). A sensor fed from several partitions (records produced without a
        key, spread over partitions) keeps its state while one of them stays."""
        released: set[str] = set()
        for tp in partitions:
            self._next.pop(tp, None)
            self._current_at.pop(tp, None)
            self._topic_id.pop(tp, None)
            self._behind_since.pop(tp, None)
            released |= self._sensors.pop(tp, set())
        still_fed = set().union(*self._sensors.values()) if self._sensors else set()
        return sorted(released - still_fed)

    def recreated(self, ends: Mapping[PartitionId, int | None], now: float,
                  after_s: float) -> dict[PartitionId, int]:
        """Partitions whose log has ended before our next offset for ``after_s`` (deleted and
        recreated, or the brokers lost its data): they hold new readings, so their offset is
        forgotten (returned) and they are read from their start. Ending before us for a
        shorter while is a new leader's high watermark still catching up after a failover,
        not a new log: read again from its start, the partition's whole retained log would be
        applied twice. ``ends``: each partition's end offset or None; ``now``: monotonic."""
        for tp, end in ends.items():
            if end is not None and tp in self._next and end < self._next[tp]:
                self._behind_since.setdefault(tp, now)
            else:
                self._behind_since.pop(tp, None)
        reset = {tp: self._next[tp] for tp in ends  # (read just now: still behind)
                 if tp in self._behind_since and now - self._behind_since[tp] >= after_s}
        for tp in reset:
            del self._next[tp], self._behind_since[tp]
            self._topic_id.pop(tp, None)  # the new log's id is learnt at the next assignment
        return reset

    def behind_for(self, tp: PartitionId, now: float) -> float | None:
        """How long ``tp``'s log has been found ending before our offset (``recreated``): 0
        when first found so at ``now``, None when it is not."""
        since = self._behind_since.get(tp)
        return None if since is None else now - since

    def replaced(self, partitions: Iterable[PartitionId], topic_ids: Mapping[str, str | None],
                 missing_is_gone: bool = False) -> dict[PartitionId, int]:
        """Of ``partitions``, those whose offset is in a topic other than the one of that name
        now (``topic_ids``: each topic's current id where known, None where the brokers say
        it does not exist): the topic was deleted and recreated, or the brokers lost their
        data, even if its new log has already grown past our offset. Their offset is forgotten
        (returned) and they are read from their start. The others are now known to be in the
        current topic. With ``missing_is_gone`` (for partitions whose log ends before our
        offset), a topic that had an id and does not exist now was deleted: its offsets are
        void whatever is made in its place."""
        reset = {}
        for tp in partitions:
            if tp[0] not in topic_ids:  # the brokers said nothing certain
                continue
            now, was = topic_ids[tp[0]], self._topic_id.get(tp)
            if now is None:
                if missing_is_gone and was is not None and tp in self._next:
                    reset[tp] = self._next.pop(tp)
                    self._behind_since.pop(tp, None)
                    del self._topic_id[tp]  # the new topic's is learnt when it is there
                continue
            if was is not None and was != now and tp in self._next:
                reset[tp] = self._next.pop(tp)
                self._behind_since.pop(tp, None)
            self._topic_id[tp] = now
        return reset
