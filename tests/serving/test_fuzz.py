"""A seeded fuzz through the real broker: malformed records among valid readings, written by a
second client (librdkafka). Every valid reading is forecast once, every malformed record is
dead-lettered once with its bytes unchanged, and the worker never restarts."""

from __future__ import annotations

import json
import math
import random

import pytest

from streamer.serving.codec import DLQ_REASON, DLQ_SOURCE_OFFSET, DLQ_SOURCE_PARTITION
from tests.hostile_records import produce_with_librdkafka
from tests.serving.conftest import wait_for

pytestmark = pytest.mark.broker

T0 = 1.7e9
ANY = "any reason"  # random bytes: which rejection depends on the bytes


def _body(sensor: str, ts: float, value: object) -> bytes:
    return json.dumps({"sensor_id": sensor, "ts": ts, "value": value}).encode()


def _malformed(rng: random.Random, n: int) -> list[tuple[bytes | None, bytes | None, str]]:
    """``n`` hostile records as (key, value, expected dead-letter reason)."""
    def random_bytes():
        return None, rng.randbytes(rng.randint(0, 300)), ANY

    def truncated():
        whole = _body("v3", T0, 1.5)
        return b"v3", whole[: rng.randint(1, len(whole) - 1)], "not_json"

    def nested():
        inner = {"a": [1, {"b": [2, {"c": None}]}]}
        return b"v4", json.dumps({"sensor_id": "v4", "ts": inner, "value": inner}).encode(), \
            "schema_violation"

    def deeply_nested():
        depth = rng.randint(200, 5000)
        return b"v4", b"[" * depth + b"]" * depth, ANY

    def wrong_type():
        body = rng.choice([{"sensor_id": "v5", "ts": True, "value": 1.0},
                           {"sensor_id": "v5", "ts": T0, "value": "1.0"},
                           {"sensor_id": 5, "ts": T0, "value": 1.0},
                           {"sensor_id": "v5", "ts": T0, "values": "abc"},
                           [1, 2, 3], "a string", 42, None])
        return b"v5", json.dumps(body).encode(), "schema_violation"

    def non_finite():
        literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999"])
        return b"v6", b'{"sensor_id": "v6", "ts": %d, "value": %s}' % (T0, literal), \
            "non_finite"

    def out_of_range():
        return b"v7", _body("v7", T0 + 1e6, rng.choice([1e301, -1.7e308])), \
            "value_out_of_range"

    def huge_id():
        sensor = "x" * rng.choice([257, 10_000, 200_000])
        return sensor.encode(), _body(sensor, T0, 1.0), "bad_sensor_id"

    def huge_array():
        values = [1.0] * rng.choice([2, 1000, 100_000])
        return b"v8", json.dumps({"sensor_id": "v8", "ts": T0, "values": values}).encode(), \
            "wrong_feature_count"

    def bad_utf8_key():
        return rng.choice([b"\xff\xfe", b"v\x80", b"\xc3\x28"]), _body("v9", T0, 1.0), \
            "schema_violation"

    def tombstone():
        return b"v10", None, "not_json"

    kinds = [random_bytes, truncated, nested, deeply_nested, wrong_type, non_finite,
             out_of_range, huge_id, huge_array, bad_utf8_key, tombstone]
    return [rng.choice(kinds)() for _ in range(n)]


def test_seeded_fuzz_of_malformed_records_among_valid_readings(
        broker, topic_factory, group_id, worker_factory, consume_raw):
    rng = random.Random(20261203)
    inp, out, dlq = topic_factory(3), topic_factory(3), topic_factory(1)
    worker = worker_factory(inp, out, dlq, group_id).start()
    worker.wait_ready()

    # Valid: 20 sensors x 30 steps, keyed (one partition each); far-future sensors of their
    # own; after its first reading each of a few sensors also gets a stale (1970) reading.
    records: list[tuple[bytes | None, bytes | None, str | None]] = []
    for t in range(30):
        records += [(f"v{s}".encode(), _body(f"v{s}", T0 + 60.0 * t, math.sin(t + s)), None)
                    for s in range(20)]
        if t == 1:
            records += [(f"v{s}".encode(), _body(f"v{s}", 1.0, 0.0), "timestamp_not_after_last")
                        for s in range(0, 20, 4)]
    records += [(f"future-{i}".encode(), _body(f"future-{i}", 4.1e9 + i, 1.0), None)
                for i in range(5)]
    for hostile in _malformed(rng, 400):
        records.insert(rng.randint(20, len(records)), hostile)
    headers = [("fuzz", str(i).encode()) for i in range(len(records))]
    placed = produce_with_librdkafka(
        broker.bootstrap, inp, [(k, v, [h]) for (k, v, _), h in zip(records, headers)],
        compression=rng.choice(["none", "gzip", "lz4", "zstd", "snappy"]),
        **{"message.max.bytes": 2_000_000})
    assert len(placed) == len(records)
    expected = dict(zip(placed, records))
    valid = {source for source, (_, _, reason) in expected.items() if reason is None}

    n_dead = len(expected) - len(valid)
    consume_raw(out, len(valid), timeout_s=60)
    consume_raw(dlq, n_dead, timeout_s=30)
    wait_for(lambda: worker.metric("streamer_forecasts_produced_total") == len(valid), 10,
             "forecasts to be counted", worker.log)
    # Everything is out: one more than expected must not come, whatever the wait.
    forecasts = consume_raw(out, len(valid) + 1, timeout_s=2)
    dead = consume_raw(dlq, n_dead + 1, timeout_s=2)

    forecast_sources = [(json.loads(r.value)["partition"], json.loads(r.value)["offset"])
                        for r in forecasts]
    assert sorted(forecast_sources) == sorted(valid), worker.log()
    dead_sources = []
    for record in dead:
        h = dict(record.headers)
        source = (int(h[DLQ_SOURCE_PARTITION]), int(h[DLQ_SOURCE_OFFSET]))
        dead_sources.append(source)
        key, value, reason = expected[source]
        assert (record.key, record.value) == (key, value), source
        assert reason is not None, f"valid reading {source} dead-lettered: {h}"
        if reason != ANY:
            assert h[DLQ_REASON].decode() == reason, (source, value[:80] if value else value)
        assert record.headers[0] == headers[placed.index(source)]
    assert sorted(dead_sources) == sorted(set(expected) - valid)
    assert worker.proc.poll() is None and worker.log().count("started on") == 1
    assert worker.metric("streamer_broker_errors_total", required=True) == 0
    assert worker.metric("streamer_undecodable_batches_total", required=True) == 0
