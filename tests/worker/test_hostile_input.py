"""Input no producer of ours would write: other clients, codecs, undecodable batches."""

from __future__ import annotations

import math

import pytest

from tests.hostile_records import CODECS, produce_undecodable, produce_with_librdkafka
from tests.worker.conftest import forecasts_by_source, reading, wait_for

pytestmark = pytest.mark.broker


def _partitioned_stream(partitions: int, steps: int, t0: float = 1.7e9) -> list[tuple]:
    """Readings of sensor ``p<i>`` sent to partition i, as (key, value, headers, partition)."""
    return [(*reading(f"p{p}", t0 + 60.0 * t, math.sin(t / 3 + p)), None, p)
            for t in range(steps) for p in range(partitions)]


@pytest.mark.parametrize("codec", CODECS)
def test_readings_compressed_by_librdkafka_with_each_codec_are_all_forecast(
        codec, broker, topic_factory, group_id, worker_factory, consume_raw):
    inp, out, dlq = topic_factory(2), topic_factory(2), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id,
                            STREAMER_KAFKA__COMPRESSION_TYPE=codec).start()
    worker.wait_ready()

    placed = produce_with_librdkafka(broker.bootstrap, inp, _partitioned_stream(2, 30),
                                     compression=codec)

    got = forecasts_by_source(consume_raw(out, len(placed), timeout_s=30))
    assert sorted(got) == sorted(placed), worker.log()
    assert all(len(forecasts) == 1 for forecasts in got.values())
    assert worker.metric("streamer_undecodable_batches_total") == 0


def test_undecodable_batch_holds_its_partition_not_ready_while_the_others_are_served(
        broker, topic_factory, group_id, worker_factory, consume_raw):
    inp, out, dlq = topic_factory(2), topic_factory(2), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()
    stream = _partitioned_stream(2, 20)
    before = produce_with_librdkafka(broker.bootstrap, inp, stream[:20])
    bad_offset = produce_undecodable(broker.bootstrap, inp, partition=0)
    after = produce_with_librdkafka(broker.bootstrap, inp, stream[20:])

    expected = before + [placed for placed in after if placed[0] == 1]
    got = forecasts_by_source(consume_raw(out, len(after) + len(before), timeout_s=15))
    assert sorted(got) == sorted(expected), worker.log()

    where = f"{inp}[0] at offset {bad_offset}"
    wait_for(lambda: worker.get("/readyz")[0] == 503, 10, "not ready", worker.log)
    status, body = worker.get("/readyz")
    assert where in body and "decompressing" in body
    assert worker.get("/healthz")[0] == 200  # alive: a restart would not help
    assert worker.metric("streamer_undecodable_batches_total") >= 1
    assert worker.metric("streamer_stalled_partitions") == 1
    assert worker.metric("streamer_ready") == 0
    assert f"ERROR streamer.worker: cannot decode the record batch of partition {where}" \
        in worker.log()
    assert worker.proc.poll() is None
