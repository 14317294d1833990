"""The partition ledger's rules, without a broker: what is fresh, held, due and released."""

from __future__ import annotations

import math

from streamer.kafka.client import InputRecord
from streamer.serving.ledger import PartitionLedger

A, B = ("in", 0), ("in", 1)


def _records(tp, offsets):
    return [InputRecord(tp[0], tp[1], o, None, b"{}", 0) for o in offsets]


def _applied(ledger, tp, offsets, sensors, acked_at=100.0):
    records = ledger.fresh(_records(tp, offsets))
    next_offsets = {tp: records[-1].offset + 1} if records else {}
    ledger.advance(next_offsets, [(tp, s) for s in sensors])
    ledger.acknowledged(next_offsets, len(records), acked_at)
    return records


def test_records_below_a_partitions_next_offset_are_not_fresh():
    ledger = PartitionLedger(now=0.0)
    assert len(_applied(ledger, A, range(0, 5), ["s1"])) == 5
    # A re-delivery after a reconnect overlaps what was applied: only the new part is fresh.
    fresh = ledger.fresh(_records(A, range(3, 8)) + _records(B, range(0, 2)))
    assert [(r.partition, r.offset) for r in fresh] == [(0, 5), (0, 6), (0, 7), (1, 0), (1, 1)]
    assert ledger.next_offset(A) == 5 and ledger.next_offset(B) is None


def test_a_batch_advances_offsets_and_records_which_sensors_each_partition_fed():
    ledger = PartitionLedger(now=0.0)
    _applied(ledger, A, range(0, 3), ["s2", "s1", "s2"], acked_at=50.0)
    _applied(ledger, B, range(0, 1), ["s9"], acked_at=60.0)
    assert ledger.offsets() == {A: 3, B: 1}
    assert ledger.sensors([A, B]) == {A: ["s1", "s2"], B: ["s9"]}
    assert ledger.current_at(A) == 50.0 and ledger.current_at(B) == 60.0
    assert ledger.current_at(("in", 7)) == -math.inf


def test_offsets_returned_are_a_copy_the_next_batch_cannot_change():
    ledger = PartitionLedger(now=0.0)
    _applied(ledger, A, range(0, 3), ["s1"])
    taken = ledger.offsets()
    _applied(ledger, A, range(3, 9), ["s1"])
    assert taken == {A: 3} and ledger.offsets() == {A: 9}


def test_a_checkpoint_is_due_by_time_or_count_only_after_new_readings():
    ledger = PartitionLedger(now=0.0)
    assert not ledger.checkpoint_due(100.0, 10.0, None)  # nothing applied: nothing to save
    _applied(ledger, A, range(0, 4), ["s1"])
    assert not ledger.checkpoint_due(5.0, 10.0, None)
    assert ledger.checkpoint_due(10.0, 10.0, None)
    assert ledger.checkpoint_due(5.0, None, 4) and not ledger.checkpoint_due(5.0, None, 5)
    assert not ledger.checkpoint_due(1e9, None, None)  # both intervals off: never
    ledger.checkpoint_taken(now=12.0)
    assert not ledger.checkpoint_due(30.0, 10.0, 1)  # taken, and nothing applied since
    _applied(ledger, A, range(4, 5), ["s1"])
    assert not ledger.checkpoint_due(21.0, 10.0, None) and ledger.checkpoint_due(22.0, 10.0, None)


def test_adopting_a_partition_from_a_checkpoint_replaces_what_was_held():
    ledger = PartitionLedger(now=0.0)
    _applied(ledger, A, range(0, 9), ["old"], acked_at=70.0)
    ledger.adopt(A, 4, ["s1", "s3"], current_at=65.0)
    assert ledger.next_offset(A) == 4 and A in ledger
    assert ledger.sensors([A]) == {A: ["s1", "s3"]} and ledger.current_at(A) == 65.0
    assert [r.offset for r in ledger.fresh(_records(A, range(2, 6)))] == [4, 5]


def test_releasing_partitions_returns_their_sensors_and_forgets_them():
    ledger = PartitionLedger(now=0.0)
    _applied(ledger, A, range(0, 2), ["a1", "a2"])
    _applied(ledger, B, range(0, 2), ["b1"])
    assert ledger.release([A, ("in", 5)]) == ["a1", "a2"]
    assert ledger.partitions() == {B} and A not in ledger
    assert ledger.current_at(A) == -math.inf
    assert len(ledger.fresh(_records(A, range(0, 2)))) == 2  # read again if it comes back
    # An acknowledgement for a partition no longer held does not bring it back.
    ledger.acknowledged({A: 2}, 2, 99.0)
    assert A not in ledger and ledger.current_at(A) == -math.inf


def test_a_sensor_also_fed_from_a_partition_still_held_is_not_released():
    # Records without a key are spread over partitions: one sensor can be fed from two.
    ledger = PartitionLedger(now=0.0)
    _applied(ledger, A, range(0, 3), ["s1", "s2"])
    _applied(ledger, B, range(0, 3), ["s2", "s3"])
    assert ledger.release([A]) == ["s1"]  # s2 goes on being fed from B
    assert ledger.release([B]) == ["s2", "s3"]


def test_a_partition_whose_log_ends_before_our_offset_is_read_from_its_start():
    ledger = PartitionLedger(now=0.0)
    _applied(ledger, A, range(0, 50), ["s1"])
    _applied(ledger, B, range(0, 10), ["s2"])
    # A was recreated (ends at 3 < 50, for 5 s); B's end is unknown or beyond: kept.
    assert ledger.recreated({A: 3, B: None}, now=100.0, after_s=5.0) == {}
    assert ledger.recreated({A: 3, B: None}, now=105.0, after_s=5.0) == {A: 50}
    assert ledger.recreated({B: 10}, now=200.0, after_s=0.0) == {}
    assert ledger.next_offset(A) is None and ledger.next_offset(B) == 10
    assert len(ledger.fresh(_records(A, range(0, 3)))) == 3
    assert ledger.sensors([A]) == {A: ["s1"]}  # its sensors stay: their state is still ours


def test_sensors_the_learner_no_longer_holds_are_forgotten_by_their_partitions():
    # With ids that churn and an idle TTL, the learner evicts sensors the ledger never heard
    # of leaving: its sets (and every checkpoint listing them) grew without bound.
    ledger = PartitionLedger(now=0.0)
    _applied(ledger, A, range(0, 3), ["s1", "s2", "s3"])
    _applied(ledger, B, range(0, 2), ["s4", "s5"])
    ledger.forget_sensors_not_in({"s2", "s5", "s9"})
    assert ledger.sensors([A, B]) == {A: ["s2"], B: ["s5"]}
    assert ledger.release([A, B]) == ["s2", "s5"]


def test_a_log_ending_before_our_offset_only_for_a_while_is_a_failover_not_a_new_log():
    # A new leader's high watermark lags the old one's until its followers catch up; an
    # empty fetch meanwhile reports it below our offset. Read from its start, the whole
    # retained log would be applied again (every old reading a dead letter).
    ledger = PartitionLedger(now=0.0)
    _applied(ledger, A, range(0, 50), ["s1"])
    assert ledger.recreated({A: 40}, now=100.0, after_s=5.0) == {}
    assert ledger.recreated({A: 45}, now=104.0, after_s=5.0) == {}
    assert ledger.recreated({A: 50}, now=104.5, after_s=5.0) == {}  # caught up
    assert ledger.recreated({A: 40}, now=106.0, after_s=5.0) == {}  # behind again: anew
    assert ledger.recreated({A: 40}, now=110.0, after_s=5.0) == {}
    assert ledger.recreated({}, now=111.0, after_s=5.0) == {}  # its end not read again
    assert ledger.recreated({A: 40}, now=111.0, after_s=5.0) == {A: 50}
    assert ledger.next_offset(A) is None


def test_a_partition_first_found_behind_says_so_for_its_topic_id_to_be_looked_up():
    ledger = PartitionLedger(now=0.0)
    ledger.adopt(A, 50, ["s1"], 0.0, topic_id="id-1")
    assert ledger.behind_for(A, 100.0) is None
    assert ledger.recreated({A: 0}, now=100.0, after_s=5.0) == {}
    assert ledger.behind_for(A, 100.0) == 0.0  # just now: look its topic's id up
    assert ledger.behind_for(A, 101.0) == 1.0
    assert ledger.replaced([A], {"in": "id-2"}) == {A: 50}  # made again: read from its start
    assert ledger.behind_for(A, 102.0) is None


def test_a_partition_behind_us_whose_topic_has_no_id_now_was_deleted():
    ledger = PartitionLedger(now=0.0)
    ledger.adopt(A, 50, ["s1"], 0.0, topic_id="id-1")
    ledger.adopt(B, 10, ["s2"], 0.0)  # its topic's id never known: a broker without ids
    assert ledger.replaced([A, B], {}, missing_is_gone=True) == {}  # nothing certain
    assert ledger.replaced([A, B], {"in": None}) == {}  # (at an assignment)
    assert ledger.replaced([A, B], {"in": None}, missing_is_gone=True) == {A: 50}
    assert ledger.next_offset(A) is None and ledger.next_offset(B) == 10
    assert ledger.replaced([A], {"in": "id-2"}) == {}  # made again: learnt, read from 0
    assert ledger.topic_ids() == {}  # (A's offset is none yet)


def test_a_partition_released_while_behind_starts_afresh_when_held_again():
    ledger = PartitionLedger(now=0.0)
    _applied(ledger, A, range(0, 50), ["s1"])
    assert ledger.recreated({A: 3}, now=100.0, after_s=5.0) == {}
    ledger.release([A])
    ledger.adopt(A, 50, ["s1"], 0.0)
    assert ledger.recreated({A: 3}, now=106.0, after_s=5.0) == {}  # behind since 106 only
    assert ledger.recreated({A: 3}, now=111.0, after_s=5.0) == {A: 50}


def test_a_partition_of_a_topic_whose_id_changed_is_read_from_its_start_however_long_its_log():
    ledger = PartitionLedger(now=0.0)
    ledger.adopt(A, 50, ["s1"], 0.0, topic_id="id-1")  # as a checkpoint left it
    ledger.adopt(B, 10, ["s2"], 0.0)  # a checkpoint from before topic ids: unknown
    assert ledger.replaced([A, B], {}) == {}  # the brokers cannot say: nothing known
    assert ledger.replaced([A, B], {"in": "id-1"}) == {}
    assert ledger.topic_ids() == {A: "id-1", B: "id-1"}  # B is now known to be in it
    assert ledger.replaced([A, B], {"in": "id-2"}) == {A: 50, B: 10}  # recreated
    assert ledger.next_offset(A) is None and ledger.sensors([A]) == {A: ["s1"]}
    _applied(ledger, A, range(0, 80), ["s1"])  # the new log, past the old offset
    assert ledger.topic_ids() == {A: "id-2"}
    assert ledger.replaced([A], {"in": "id-2"}) == {}  # read from its start once only


def test_a_partition_found_recreated_by_its_end_learns_its_new_topic_id_afresh():
    ledger = PartitionLedger(now=0.0)
    ledger.adopt(A, 50, ["s1"], 0.0, topic_id="id-1")
    assert ledger.recreated({A: 3}, now=0.0, after_s=0.0) == {A: 50}
    _applied(ledger, A, range(0, 10), ["s1"])
    assert ledger.replaced([A], {"in": "id-2"}) == {}  # not read from its start again
    assert ledger.topic_ids() == {A: "id-2"}


def test_a_checkpoint_that_failed_leaves_its_readings_due_at_the_next_interval():
    ledger = PartitionLedger(now=0.0)
    _applied(ledger, A, range(0, 4), ["s1"])
    assert ledger.checkpoint_due(10.0, 10.0, None)
    covered = ledger.checkpoint_taken(now=10.0)
    assert covered == 4 and not ledger.checkpoint_due(25.0, 10.0, None)  # nothing new
    ledger.checkpoint_failed(covered)  # the write failed, and the input went quiet
    assert not ledger.checkpoint_due(15.0, 10.0, None)
    assert ledger.checkpoint_due(20.0, 10.0, None) and ledger.checkpoint_due(15.0, None, 4)
