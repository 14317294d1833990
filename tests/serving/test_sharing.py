"""The model board's rules, without a broker: what is averaged, with what weight, and when not."""

from __future__ import annotations

import pytest
import torch

from streamer.core import Learner
from streamer.core import weights as w
from streamer.core.config import LearnerConfig
from streamer.kafka import KafkaConnection
from streamer.kafka.model_topic import ModelRecord, ModelTopic
from streamer.serving.sharing import (
    DEPARTED_AFTER_S,
    H_FINGERPRINT,
    H_GROUP,
    H_READINGS,
    H_SEQUENCE,
    ModelBoard,
    ModelSharing,
    record_key,
)
from tests.conftest import unscraped_metrics

CONFIG = LearnerConfig(hidden_size=8, initial_capacity=4)
FP = CONFIG.fingerprint()


def _weights(shift: float) -> w.Weights:
    return {k: t + shift for k, t in Learner(CONFIG).weights().items()}


def _record(worker: str, weights: w.Weights | None, readings: int = 10, at: float = 100.0,
            group: str = "g", fingerprint: str = FP, sequence: int = 1,
            offset: int | None = None, arrived: float | None = None,
            log: int = 0) -> ModelRecord:
    headers = [(H_GROUP, group.encode()), (H_FINGERPRINT, fingerprint.encode()),
               (H_READINGS, str(readings).encode()), (H_SEQUENCE, str(sequence).encode())]
    return ModelRecord(record_key(group, worker), None if weights is None else w.dumps(weights),
                       headers, at, offset, arrived, log)


def _offer(board: ModelBoard, record: ModelRecord, now: float = 100.0) -> str | None:
    return board.offer(record, now)


def _board(me: str = "a", ttl: float = 60.0) -> ModelBoard:
    return ModelBoard(me, "g", FP, Learner(CONFIG).weights(), ttl)


def _equal(x: w.Weights, y: w.Weights) -> bool:
    return all(torch.equal(x[k], y[k]) for k in x)


def test_a_worker_alone_never_averages():
    board = _board()
    board.ours(_weights(1.0), None, 10, 1, at=100.0)
    assert board.average(_weights(1.0), now=100.0) is None


def test_no_average_before_our_first_publish():
    board = _board()
    assert _offer(board, _record("b", _weights(2.0))) is None
    assert board.average(_weights(0.0), now=100.0) is None


def test_the_average_weighs_each_worker_by_the_readings_it_trained():
    board = _board()
    board.ours(_weights(0.0), None, 30, 1, at=100.0)
    _offer(board, _record("b", _weights(4.0), readings=10))
    new, distance = board.average(_weights(0.0), now=100.0)
    expected = {k: t + 1.0 for k, t in _weights(0.0).items()}  # (30 * 0 + 10 * 4) / 40
    for k in expected:
        torch.testing.assert_close(new[k], expected[k])
    assert distance > 0


def test_what_was_learned_since_publishing_is_kept_on_top_of_the_average():
    board = _board()
    published = _weights(0.0)
    board.ours(published, None, 10, 1, at=100.0)
    _offer(board, _record("b", _weights(2.0), readings=10))
    current = {k: t + 0.5 for k, t in published.items()}  # trained after the publish
    new, _ = board.average(current, now=100.0)
    for k in new:
        torch.testing.assert_close(new[k], published[k] + 1.0 + 0.5)
    # Averaging again with an unchanged board changes nothing (whole weights, read twice).
    again, _ = board.average(new, now=100.0)
    assert _equal(again, new)


def test_workers_holding_the_same_board_reach_bitwise_equal_weights_in_one_round():
    published = {name: _weights(float(i)) for i, name in enumerate("abcd")}
    results = []
    for me in "dbca":  # each worker, its board filled in a different arrival order
        board = _board(me)
        board.ours(published[me], None, 5 + ord(me), 1, at=100.0)
        for peer in sorted(published, reverse=me < "c"):
            _offer(board, _record(peer, published[peer], readings=5 + ord(peer)))
        results.append(board.average(published[me], now=100.0)[0])
    assert all(_equal(r, results[0]) for r in results[1:])


def test_incompatible_garbage_and_other_groups_are_ignored_and_said_why():
    board = _board()
    board.ours(_weights(0.0), None, 10, 1, at=100.0)
    assert _offer(board, _record("b", _weights(1.0), fingerprint="other")) == "incompatible"
    assert _offer(board, _record("c", _weights(1.0), group="other")) == "other_group"
    assert _offer(board, ModelRecord(b"g/d", b"not weights", _record("d", None).headers,
                                   100.0)) == "garbage"
    bad = _record("e", _weights(1.0))
    no_readings = ModelRecord(bad.key, bad.value, [h for h in bad.headers if h[0] != H_READINGS],
                              100.0)
    assert _offer(board, no_readings) == "garbage"
    assert _offer(board, ModelRecord(b"g/\xff", b"x", [(H_GROUP, b"g")], 100.0)) == "garbage"
    unkeyed = _record("f", _weights(1.0))  # our group's headers, a key without the group
    assert _offer(board, ModelRecord(b"f", unkeyed.value, unkeyed.headers, 100.0)) == "garbage"
    assert board.average(_weights(0.0), now=100.0) is None  # nothing usable arrived


def test_a_silent_peer_drops_out_after_the_ttl_and_a_tombstone_at_once():
    board = _board(ttl=60.0)
    board.ours(_weights(0.0), None, 10, 1, at=0.0)
    _offer(board, _record("b", _weights(1.0), at=100.0))
    _offer(board, _record("c", _weights(1.0), at=100.0))
    assert board.peers(now=150.0) == 2
    _offer(board, _record("c", None))  # c left cleanly
    assert board.peers(now=150.0) == 1
    assert board.peers(now=161.0) == 0  # b silent for longer than the TTL; ours never expires
    assert board.average(_weights(0.0), now=161.0) is None


def test_our_own_records_read_back_from_the_topic_change_nothing():
    board = _board("a")
    board.ours(_weights(0.0), None, 10, 1, at=100.0)
    version = board.version
    assert _offer(board, _record("a", _weights(9.0))) is None
    assert board.version == version and _equal(board.entries["a"].weights, _weights(0.0))


def test_a_publish_of_weights_copied_before_an_average_still_ends_equal_to_the_peers():
    """Checkpoint copied, then an average, then that checkpoint published: with no training
    after it, the next round still gives exactly the board's average."""
    a0, b0, b1 = _weights(0.0), _weights(2.0), _weights(3.0)
    board = _board("a")
    board.ours(a0, None, 10, 1, at=100.0)
    _offer(board, _record("b", b0, readings=10))
    shift_at_copy, copied = board.shift, _weights(1.0)  # trained up to here, then the copy
    current, _ = board.average(copied, now=100.0)  # an average before that copy is published
    board.ours(copied, shift_at_copy, 10, 2, at=101.0)
    _offer(board, _record("b", b1, readings=10, at=101.0))
    final, _ = board.average(current, now=101.0)
    peer = _board("b")
    peer.ours(b1, None, 10, 2, at=101.0)
    _offer(peer, _record("a", copied, readings=10, at=101.0))
    expected, _ = peer.average(b1, now=101.0)
    for k in final:
        torch.testing.assert_close(final[k], expected[k], rtol=0, atol=1e-6)


def _learned_since(board: ModelBoard, current: w.Weights) -> float:
    """What our weights hold beyond what the board knows of them (0: nothing)."""
    return w.distance(current, board.base)


def test_an_earlier_checkpoint_published_between_a_copy_and_its_publish_keeps_the_accounting():
    """Copy k taken; checkpoint k-1 published; an average; then k published, with no training
    after copy k: the board then knows everything our weights hold."""
    board = _board("a")
    c_prev = _weights(0.0)
    board.ours(c_prev, board.shift, 10, 1, at=100.0)
    _offer(board, _record("b", _weights(4.0)))
    current, _ = board.average(c_prev, now=100.0)  # shift now non-zero
    c_k1 = {k: t + 1.0 for k, t in current.items()}  # trained, then copy k-1 ...
    shift_k1 = board.shift
    c_k = {k: t + 2.0 for k, t in current.items()}  # ... trained more, then copy k
    shift_k = board.shift
    board.ours(c_k1, shift_k1, 10, 2, at=101.0)  # k-1 published after copy k was taken
    _offer(board, _record("b", _weights(5.0), at=101.0))
    current, _ = board.average(c_k, now=101.0)
    board.ours(c_k, shift_k, 10, 3, at=102.0)
    assert _learned_since(board, current) < 1e-6


def test_a_copy_taken_before_our_first_publish_keeps_the_accounting():
    board = _board("a")
    shift_k = board.shift  # copy k taken before anything was published
    c_prev, c_k = _weights(0.0), _weights(1.0)
    board.ours(c_prev, None, 10, 1, at=100.0)  # the earlier checkpoint k-1
    _offer(board, _record("b", _weights(100.0)))
    current, _ = board.average(c_k, now=100.0)
    board.ours(c_k, shift_k, 10, 2, at=101.0)
    assert _learned_since(board, current) < 1e-6
    _offer(board, _record("b", _weights(100.0), at=101.0, sequence=2))
    final, _ = board.average(current, now=101.0)  # no training: exactly the board's average
    expected = w.weighted_average([(c_k, 10.0), (_weights(100.0), 10.0)])
    assert max(float((final[k] - expected[k]).abs().max()) for k in final) < 1e-5


@pytest.mark.parametrize(("headers", "expected"), [
    ([(H_GROUP, b"g"), (H_FINGERPRINT, FP.encode()), (H_READINGS, None), (H_SEQUENCE, b"1")],
     "garbage"),
    ([(H_GROUP, b"g"), (H_FINGERPRINT, FP.encode()), (H_READINGS, b"9" * 400),
      (H_SEQUENCE, b"1")], "garbage"),
    ([(H_GROUP, b"g"), (H_FINGERPRINT, FP.encode()), (H_READINGS, b"-3"), (H_SEQUENCE, b"1")],
     "garbage"),
    ([(H_GROUP, None), (H_FINGERPRINT, None)], "other_group"),
], ids=["null-readings", "huge-readings", "negative-readings", "null-group"])
def test_malformed_headers_are_garbage_or_skipped_never_an_exception(headers, expected):
    board = _board()
    board.ours(_weights(0.0), None, 10, 1, at=100.0)
    reason = _offer(board, ModelRecord(b"g/b", w.dumps(_weights(1.0)), headers, 100.0))
    assert reason == expected
    assert board.average(_weights(0.0), now=100.0) is None


def test_a_record_written_before_the_held_one_or_history_past_the_ttl_is_not_taken():
    board = _board(ttl=60.0)
    board.ours(_weights(0.0), None, 10, 1, at=100.0)
    _offer(board, _record("b", _weights(2.0), at=100.0, offset=5))
    _offer(board, _record("b", _weights(7.0), at=90.0, offset=3))  # a re-read: written before
    assert _equal(board.entries["b"].weights, _weights(2.0))
    # Later on the topic is newer, whatever its create time (that peer's clock stepped back).
    _offer(board, _record("b", _weights(8.0), at=50.0, offset=9, arrived=100.0))
    assert _equal(board.entries["b"].weights, _weights(8.0))
    _offer(board, _record("c", _weights(3.0), at=10.0), now=100.0)
    assert "c" not in board.entries  # history past the TTL when read: skipped


def test_records_on_a_remade_model_topic_are_taken_though_their_offsets_start_again():
    # (the brokers lost the topic: its new log starts at offset 0; compared with the offsets
    # held from the old one, a peer's new weights and its tombstone were ignored for a TTL)
    board = _board(ttl=60.0)
    board.ours(_weights(0.0), None, 10, 1, at=100.0)
    _offer(board, _record("b", _weights(2.0), at=90.0, offset=5, arrived=100.0))
    _offer(board, _record("b", _weights(4.0), at=95.0, offset=3, arrived=100.0, log=1))
    assert _equal(board.entries["b"].weights, _weights(4.0))
    # The same log read again as a new one (a reader that took a failover for a new log):
    # a record older, by its writer's clock, than the one held is not taken.
    _offer(board, _record("b", _weights(1.0), at=80.0, offset=0, arrived=100.0, log=2))
    assert _equal(board.entries["b"].weights, _weights(4.0))
    _offer(board, _record("b", None, at=96.0, offset=4, arrived=100.0, log=2))
    assert "b" not in board.entries


@pytest.mark.parametrize("skew", [-3600.0, 3600.0])
def test_a_peer_whose_clock_is_off_is_averaged_and_ages_from_when_its_record_arrived(skew):
    # Read live, a record's age runs on our clock from its arrival: a peer an hour behind is
    # not dropped as an hour old, and one an hour ahead does not stay fresh for an hour.
    board = _board(ttl=60.0)
    board.ours(_weights(0.0), None, 10, 1, at=100.0)
    assert _offer(board, _record("b", _weights(2.0), at=100.0 + skew, arrived=100.0),
                  now=100.0) is None
    assert board.peers(now=150.0) == 1
    assert board.average(_weights(0.0), now=150.0) is not None
    # History (read at start-up, before the topic's end) has only its create time to go by:
    # an hour old is skipped, dated ahead of us counts as written when read.
    assert _offer(board, _record("c", _weights(2.0), at=100.0 + skew), now=100.0) is None
    assert ("c" in board.entries) == (skew > 0)
    assert board.peers(now=161.0) == 0  # both silent for longer than the TTL since read


def test_records_are_keyed_by_group_and_worker_so_groups_never_replace_each_others():
    # The topic is compacted by key: two groups sharing it with the same worker ids must not
    # collide, and a worker of one group reads only its own group's records.
    assert record_key("g1", "w1") != record_key("g2", "w1")
    board = _board()
    board.ours(_weights(0.0), None, 10, 1, at=100.0)
    assert _offer(board, _record("w1", _weights(1.0), group="other")) == "other_group"
    assert _offer(board, _record("w1", _weights(1.0))) is None
    assert set(board.entries) == {board.me, "w1"}


def test_a_worker_whose_newest_record_in_history_is_a_day_old_is_marked_departed():
    board = _board(ttl=60.0)
    now = 10 * DEPARTED_AFTER_S
    old = now - DEPARTED_AFTER_S - 1
    _offer(board, _record("gone", _weights(1.0), at=old, offset=1), now=now)
    _offer(board, _record("back", _weights(1.0), at=old, offset=2), now=now)
    _offer(board, _record("idle", _weights(1.0), at=now - 3600, offset=3), now=now)  # < a day
    _offer(board, _record("back", _weights(2.0), at=now - 10, offset=4), now=now)  # newer
    _offer(board, _record("left", _weights(1.0), at=old, offset=5), now=now)
    _offer(board, _record("left", None, at=old, offset=6), now=now)  # its tombstone is there
    # Read live, an old create time is a clock that is off, not a worker that left: kept, or
    # skipped as stale when it arrived more than the TTL ago (a stalled loop), never marked.
    _offer(board, _record("skewed", _weights(1.0), at=old, offset=7, arrived=now), now=now)
    _offer(board, _record("stalled", _weights(1.0), at=old, offset=8, arrived=now - 120),
           now=now)
    assert "skewed" in board.entries and "stalled" not in board.entries
    assert board.departed == {"gone": record_key("g", "gone")}


def test_history_of_the_worker_whose_checkpoint_we_restored_is_not_averaged_with():
    # A pod replacing a killed one (a new id) starts from the dead pod's checkpoint: that
    # pod's last record holds weights ours contain already. A live record of it is a peer's.
    # So does the history of a pod killed before that one (its weights averaged into the
    # checkpoint we restored), anything written before that checkpoint was taken.
    board = _board(ttl=60.0)
    board.restored_from, board.restored_at = "dead", 85.0
    board.ours(_weights(1.0), None, 10, 1, at=100.0)
    assert _offer(board, _record("dead", _weights(0.5), at=90.0, offset=1), now=100.0) is None
    assert _offer(board, _record("dead-before", _weights(0.5), at=80.0, offset=2),
                  now=100.0) is None
    assert board.peers(now=100.0) == 0 and board.average(_weights(1.0), now=100.0) is None
    assert _offer(board, _record("other", _weights(0.5), at=90.0, offset=3), now=100.0) is None
    assert _offer(board, _record("dead", _weights(2.0), at=100.0, offset=4, arrived=100.0),
                  now=100.0) is None
    assert set(board.entries) == {"a", "other", "dead"}


def test_a_tombstone_of_our_own_key_read_live_while_we_serve_marks_us_erased():
    # Another worker took us for departed (a clock a day behind), or our id's previous run
    # closed late: peers dropped our weights, so we must publish them again. History (our
    # own clean exit of an earlier run) and a tombstone before our first publish do not.
    board = _board(me="a")
    assert _offer(board, _record("a", None, offset=1, arrived=100.0)) is None
    assert not board.erased  # nothing published yet: nothing to restore
    board.ours(_weights(1.0), None, 10, 1, at=100.0)
    assert _offer(board, _record("a", None, offset=2, at=90.0)) is None
    assert not board.erased  # history from before our publish
    assert _offer(board, _record("a", None, offset=3, arrived=100.0)) is None
    assert board.erased and "a" in board.entries


def test_a_tombstone_of_our_key_written_while_our_reader_was_away_marks_us_erased():
    # Read after a reconnect it is history (no arrival time), but written after our publish:
    # ignored, peers left us out until our next publish (never, for an idle worker).
    board = _board(me="a")
    board.ours(_weights(1.0), None, 10, 1, at=100.0)
    assert _offer(board, _record("a", None, offset=4, at=150.0), now=160.0) is None
    assert board.erased


def test_a_checkpoint_whose_weights_cannot_be_copied_is_counted_never_raised(monkeypatch):
    # Called where the worker commits offsets: an exception there stopped serving.
    learner, metrics = Learner(CONFIG), unscraped_metrics()
    sharing = ModelSharing(learner, ModelTopic(KafkaConnection("127.0.0.1:1"), "t", 1 << 20),
                           "a", "g", 0.0, 60.0, metrics)  # never started: no I/O

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    sharing.checkpoint_durable(learner.weights(), readings=3)  # waits for the interval
    monkeypatch.setattr(w, "copied", out_of_memory)
    sharing.checkpoint_durable(learner.weights(), readings=5)
    assert metrics.model_sync_failures._value.get() == 1
    assert sharing._pending is None  # the older copy does not go out with these readings
    monkeypatch.undo()
    sharing.checkpoint_durable(learner.weights(), readings=5)  # the next one is published
    assert sharing._pending is not None and sharing._readings == 13

