"""The message contract: every rejection reason, timestamps, forecasts and DLQ headers."""

from __future__ import annotations

import hashlib
import json
import math
import random

import numpy as np
import pytest

from streamer.core.batch import HorizonResult
from streamer.core.rejections import Reason
from streamer.serving.codec import (
    CUT_KEEP_BYTES,
    HEADER_FRAMING_BYTES,
    MAX_DEAD_LETTER_BYTES,
    Reading,
    Rejection,
    dead_letter,
    decode_batch,
    decode_reading,
    dlq_headers,
    encode_anomalies,
    encode_forecasts,
    forecast_key,
    largest_output_bytes,
)
from tests.serving.forecast_reference import encode_forecast

GOOD = b'{"sensor_id": "s1", "ts": 1700000000.5, "value": 21.5}'


@pytest.mark.parametrize(
    ("key", "value", "reason", "detail"),
    [
        (b"s1", b'{"not json', Reason.NOT_JSON, None),
        (b"s1", b"", Reason.NOT_JSON, None),
        (b"s1", b'{"sensor_id": "s\xff1", "ts": 1, "value": 1}', Reason.NOT_JSON, None),
        (b"s1", b"\xef\xbb\xbf" + GOOD, Reason.NOT_JSON, None),  # a BOM is not JSON
        (b"s1", None, Reason.NOT_JSON, "record has no value"),
        (b"s1", b"[1, 2]", Reason.SCHEMA_VIOLATION, "body must be a JSON object"),
        (b"s1", b'"s1"', Reason.SCHEMA_VIOLATION, "body must be a JSON object"),
        (b"s1", b'{"value": 1}', Reason.SCHEMA_VIOLATION,
         "ts: Field required (the record has no timestamp to stand in)"),
        (
            b"s1",
            b'{"ts": 1, "value": true}',
            Reason.SCHEMA_VIOLATION,
            "value: Input should be a valid number",
        ),
        (
            b"s1",
            b'{"ts": 1, "value": "1.5"}',
            Reason.SCHEMA_VIOLATION,
            "value: Input should be a valid number",
        ),
        (
            b"s1",
            b'{"ts": 1, "values": [1, false]}',
            Reason.SCHEMA_VIOLATION,
            "values.1: Input should be a valid number",
        ),
        (
            b"s1",
            b'{"ts": 1, "value": 1, "values": [1]}',
            Reason.SCHEMA_VIOLATION,
            "give exactly one of value and values, not both",
        ),
        (b"s1", b'{"ts": 1}', Reason.SCHEMA_VIOLATION, "give exactly one of value and values"),
        (
            b"s1",
            b'{"ts": true, "value": 1}',
            Reason.SCHEMA_VIOLATION,
            "ts: must be epoch seconds (a number) or an RFC 3339 string",
        ),
        (
            b"s1",
            b'{"ts": "1700000000", "value": 1}',
            Reason.SCHEMA_VIOLATION,
            "ts: string is not an RFC 3339 timestamp",
        ),
        (
            b"s1",
            b'{"ts": "2024-03-10T14:30:15", "value": 1}',
            Reason.SCHEMA_VIOLATION,
            "ts: RFC 3339 timestamp must carry a timezone (Z or +hh:mm)",
        ),
        (
            b"s1",
            b'{"ts": "2024-13-10T14:30:15Z", "value": 1}',
            Reason.SCHEMA_VIOLATION,
            "ts: not a valid RFC 3339 timestamp: month value is outside expected range of 1-12",
        ),
        (
            b"s1",
            b'{"sensor_id": 7, "ts": 1, "value": 1}',
            Reason.SCHEMA_VIOLATION,
            'sensor_id: must be a string (write a numeric id as "17")',
        ),
        (
            None,
            b'{"ts": 1, "value": 1}',
            Reason.SCHEMA_VIOLATION,
            "sensor_id: required when the record has no key",
        ),
        (b"s\xff", b'{"ts": 1, "value": 1}', Reason.SCHEMA_VIOLATION, "key is not valid UTF-8"),
        (b"s2", GOOD, Reason.KEY_MISMATCH, "key 's2' differs from body sensor_id 's1'"),
        (b"s1", b'{"ts": 1, "value": NaN}', Reason.NON_FINITE, "value is not finite"),
        (b"s1", b'{"ts": 1, "value": 1e999}', Reason.NON_FINITE, "value is not finite"),
        (
            b"s1",
            b'{"ts": 1, "value": -1' + b"0" * 400 + b"}",
            Reason.NON_FINITE,
            "value is not finite",
        ),
        (
            b"s1",
            b'{"ts": 1, "values": [1, -Infinity]}',
            Reason.NON_FINITE,
            "values hold a non-finite number",
        ),
        (b"s1", b'{"ts": NaN, "value": 1}', Reason.NON_FINITE, "ts is not finite"),
    ],
)
def test_bad_record_is_rejected_with_its_reason(
    key: bytes | None, value: bytes | None, reason: Reason, detail: str | None
) -> None:
    rejection = decode_reading(key, value)
    assert isinstance(rejection, Rejection)
    assert rejection.reason is reason
    if detail is None:  # the JSON parser's own wording
        assert rejection.detail.startswith("Invalid JSON: ")
    else:
        assert rejection.detail == detail


def test_a_body_without_ts_takes_its_records_timestamp_and_a_body_ts_wins_over_it() -> None:
    assert decode_reading(b"s1", b'{"value": 2}', 1_700_000_000_500) == Reading(
        "s1", 1700000000.5, (2.0,))
    assert decode_reading(b"s1", b'{"ts": 5, "value": 2}', 1_700_000_000_500) == Reading(
        "s1", 5.0, (2.0,))
    for none in (-1, 0):  # kafka-python's and librdkafka's "no timestamp"
        assert decode_reading(b"s1", b'{"value": 2}', none).reason is Reason.SCHEMA_VIOLATION
    decoded = decode_batch([(b"s1", b'{"value": 1}'), (b"s2", b'{"value": 2}')], 1,
                           [1_000, -1])
    assert decoded.batch.ts.tolist() == [1.0] and decoded.index.tolist() == [0]
    assert [reason for _, reason, _ in decoded.rejections] == [Reason.SCHEMA_VIOLATION]


def test_a_field_written_as_null_counts_as_absent() -> None:
    # Serializers of optional fields (Jackson, dataclasses.asdict, pydantic) write them null:
    # such a producer's every reading was dead-lettered as a schema violation.
    assert decode_reading(b"s1", b'{"sensor_id": null, "ts": 5, "value": 2}') == Reading(
        "s1", 5.0, (2.0,))
    assert decode_reading(b"s1", b'{"ts": null, "value": 2}', 7_000) == Reading(
        "s1", 7.0, (2.0,))
    assert decode_reading(b"s1", b'{"ts": 5, "value": 2, "values": null}') == Reading(
        "s1", 5.0, (2.0,))
    assert decode_reading(b"s1", b'{"ts": 5, "value": null, "values": [1, 2]}') == Reading(
        "s1", 5.0, (1.0, 2.0))
    no_id = decode_reading(None, b'{"sensor_id": null, "ts": 5, "value": 2}')
    assert no_id == Rejection(Reason.SCHEMA_VIOLATION,
                              "sensor_id: required when the record has no key")
    no_ts = decode_reading(b"s1", b'{"ts": null, "value": 2}')
    assert no_ts.reason is Reason.SCHEMA_VIOLATION and no_ts.detail.startswith("ts: Field")


def test_a_null_reading_is_a_missing_one_rejected_as_a_nan_is() -> None:
    # pandas' to_json writes NaN as null: the reason says what happened, not "not a number".
    assert decode_reading(b"s1", b'{"ts": 5, "value": null}') == Rejection(
        Reason.NON_FINITE, "value is null (a missing reading)")
    assert decode_reading(b"s1", b'{"ts": 5, "value": null, "values": null}') == Rejection(
        Reason.NON_FINITE, "value is null (a missing reading)")
    assert decode_reading(b"s1", b'{"ts": 5, "values": [1, null]}') == Rejection(
        Reason.NON_FINITE, "values hold a null (a missing reading)")
    assert decode_reading(b"s1", b'{"ts": 5, "values": null}') == Rejection(
        Reason.NON_FINITE, "values is null (a missing reading)")


def test_a_key_mismatch_between_ids_that_look_alike_shows_their_code_points() -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    rejection = decode_reading(composed.encode(), json.dumps(
        {"sensor_id": decomposed, "ts": 1, "value": 1}, ensure_ascii=False).encode())
    assert rejection == Rejection(
        Reason.KEY_MISMATCH, "key 'caf\\xe9' differs from body sensor_id 'cafe\\u0301'")
    unlike = decode_reading("caf\u00e9".encode(), b'{"sensor_id": "tea", "ts": 1, "value": 1}')
    assert unlike.detail == "key 'caf\u00e9' differs from body sensor_id 'tea'"


def test_key_and_body_that_agree_give_the_reading() -> None:
    assert decode_reading(b"s1", GOOD) == Reading("s1", 1700000000.5, (21.5,))


def test_sensor_id_may_come_from_the_key_alone() -> None:
    assert decode_reading(b"s1", b'{"ts": 5, "value": 2}') == Reading("s1", 5.0, (2.0,))


def test_sensor_id_may_come_from_the_body_alone_and_an_empty_key_counts_as_absent() -> None:
    assert decode_reading(None, GOOD) == Reading("s1", 1700000000.5, (21.5,))
    assert decode_reading(b"", GOOD) == Reading("s1", 1700000000.5, (21.5,))


def test_non_ascii_sensor_ids_survive() -> None:
    value = json.dumps({"sensor_id": "Kühlhaus-3", "ts": 1, "value": 1}).encode()
    assert decode_reading("Kühlhaus-3".encode(), value) == Reading("Kühlhaus-3", 1.0, (1.0,))


def test_extra_fields_are_ignored_even_when_they_hold_nan() -> None:
    value = b'{"ts": 1, "value": 2, "unit": "C", "quality": NaN, "meta": {"a": [1]}}'
    assert decode_reading(b"s1", value) == Reading("s1", 1.0, (2.0,))


def test_integers_are_numbers_and_values_keep_their_count() -> None:
    assert decode_reading(b"s1", b'{"ts": 10, "values": [1, 2.5, -3]}') == Reading(
        "s1", 10.0, (1.0, 2.5, -3.0)
    )
    assert decode_reading(b"s1", b'{"ts": 10, "values": []}') == Reading("s1", 10.0, ())


@pytest.mark.parametrize(
    ("ts", "epoch"),
    [
        ("2024-03-10T14:30:15.25+05:30", 1710061215.25),
        ("2024-03-10T09:00:15.25Z", 1710061215.25),
        ("2024-03-10T04:00:15.25-05:00", 1710061215.25),
        ("2024-03-10 09:00:15.25z", 1710061215.25),
        ("2024-03-10T09:00:15-00:00", 1710061215.0),
        ("1970-01-01T00:00:00Z", 0.0),
        # A leap second (23:59:60 UTC) is the second before it: epoch time has none.
        ("2016-12-31T23:59:60.5Z", 1483228799.5),
        ("2017-01-01T08:59:60+09:00", 1483228799.0),
        ("2016-12-31T18:29:60-05:30", 1483228799.0),
    ],
)
def test_rfc3339_timestamp_with_offset_becomes_exact_epoch_seconds(ts: str, epoch: float) -> None:
    value = json.dumps({"ts": ts, "value": 1.0}).encode()
    reading = decode_reading(b"s1", value)
    assert isinstance(reading, Reading)
    assert reading.ts == epoch


@pytest.mark.parametrize("ts", ["2024-03-10T12:34:60Z", "2016-12-31T23:59:60+01:00",
                                "2016-12-31T23:58:60Z"])
def test_a_second_60_that_is_no_leap_second_is_a_schema_violation(ts: str) -> None:
    rejection = decode_reading(b"s1", json.dumps({"ts": ts, "value": 1.0}).encode())
    assert isinstance(rejection, Rejection) and rejection.reason == Reason.SCHEMA_VIOLATION
    assert "second 60 outside a leap second" in rejection.detail, rejection.detail


def test_decode_batch_keeps_good_readings_in_order_with_their_input_positions() -> None:
    records: list[tuple[bytes | None, bytes | None]] = [
        (b"a", b'{"ts": 1, "value": 10}'),
        (b"b", b"garbage"),
        (b"b", b'{"ts": 2, "values": [20, 21]}'),
        (None, b'{"sensor_id": "c", "ts": "1970-01-01T00:00:03Z", "value": 30}'),
        (b"d", b'{"ts": 4, "value": NaN}'),
    ]
    decoded = decode_batch(records, n_features=1)
    assert decoded.index.dtype == np.int64
    assert decoded.index.tolist() == [0, 2, 3]
    assert list(decoded.batch.sensor_ids) == ["a", "b", "c"]
    assert decoded.batch.ts.tolist() == [1.0, 2.0, 3.0]
    assert decoded.batch.values.tolist() == [[10.0], [20.0], [30.0]]
    assert decoded.batch.n_values.tolist() == [1, 2, 1]  # the learner rejects the 2-value one
    assert [(i, reason) for i, reason, _ in decoded.rejections] == [
        (1, Reason.NOT_JSON),
        (4, Reason.NON_FINITE),
    ]
    assert decoded.rejections[1][2] == "value is not finite"


def test_decode_batch_of_nothing_is_an_empty_batch_of_the_right_width() -> None:
    decoded = decode_batch([], n_features=3)
    assert len(decoded.batch) == 0
    assert decoded.batch.values.shape == (0, 3)
    assert decoded.index.tolist() == []
    assert decoded.rejections == []


def test_decoding_never_raises_on_garbage() -> None:
    rng = random.Random(1234)
    samples = [bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(500)]
    # Mutations of a good message reach the validator rather than dying in the parser.
    for _ in range(1500):
        mutated = bytearray(GOOD)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        samples.append(bytes(mutated))
    records = [(rng.choice([None, b"", b"s1", b"\xff"]), value) for value in samples]
    decoded = decode_batch(records, n_features=1)
    assert len(decoded.batch) + len(decoded.rejections) == len(records)
    assert {reason for _, reason, _ in decoded.rejections} <= {
        Reason.NOT_JSON,
        Reason.SCHEMA_VIOLATION,
        Reason.KEY_MISMATCH,
        Reason.NON_FINITE,
    }


def _bounds(f: int, score: float = 0.25, anomaly: bool = False) -> dict:
    return {"lower": [-1.0] * f, "upper": [1.0] * f, "anomaly_score": score, "anomaly": anomaly}


def _encoded(sensor_id: str, ts: float, values, partition: int, offset: int, updates: int, *,
             lower, upper, anomaly_score: float, anomaly: bool) -> bytes:
    """One forecast through the hot path's ``encode_forecasts``, checked equal to the plain
    reference (tests/serving/forecast_reference.py) on the same input."""
    from streamer.serving.codec import encode_forecasts

    values = np.asarray(values, dtype=np.float64)
    (encoded,) = encode_forecasts([sensor_id], np.array([ts]), values[None], [partition],
                                  [offset], np.array([updates]),
                                  lower=np.asarray(lower, dtype=np.float64)[None],
                                  upper=np.asarray(upper, dtype=np.float64)[None],
                                  anomaly_scores=np.array([anomaly_score]),
                                  anomalies=np.array([anomaly]))
    assert encoded == encode_forecast(sensor_id, ts, values, partition, offset, updates,
                                      len(values), lower=lower, upper=upper,
                                      anomaly_score=anomaly_score, anomaly=anomaly)
    return encoded


def test_single_feature_forecast_is_exact_json() -> None:
    encoded = _encoded("s1", 1700000000.5, np.array([21.75]), 3, 42, np.int64(7),
                       lower=np.array([20.5]), upper=[23.0],
                       anomaly_score=np.float64(0.99912345678), anomaly=np.bool_(True))
    assert encoded == (
        b'{"sensor_id":"s1","ts":1700000000.5,"value":21.75,"lower":20.5,"upper":23.0,'
        b'"anomaly_score":0.99912345678,"anomaly":true,"partition":3,"offset":42,'
        b'"model_updates":7}'
    )


def test_multi_feature_forecast_round_trips_through_json() -> None:
    encoded = _encoded("Kühlhaus-3", 12.0, [1.5, -2.25, 1e-7], 0, 9, 0,
                       lower=[1.0, -3.0, 0.0], upper=[2.0, -2.0, 1e-6],
                       anomaly_score=1e-9, anomaly=False)
    assert json.loads(encoded) == {
        "sensor_id": "Kühlhaus-3",
        "ts": 12.0,
        "values": [1.5, -2.25, 1e-7],
        "lower": [1.0, -3.0, 0.0],
        "upper": [2.0, -2.0, 1e-6],
        "anomaly_score": 1e-9,
        "anomaly": False,
        "partition": 0,
        "offset": 9,
        "model_updates": 0,
    }


def test_non_finite_forecast_numbers_are_written_as_null() -> None:
    encoded = _encoded("s1", 1.0, [np.nan, 2.0], 0, 1, 1, lower=[np.nan, 1.0],
                       upper=[np.inf, 3.0], anomaly_score=0.0, anomaly=False)
    body = json.loads(encoded)
    assert (body["values"], body["lower"], body["upper"]) == ([None, 2.0], [None, 1.0],
                                                               [None, 3.0])


def test_forecasts_and_bounds_that_do_not_match_are_a_programming_error() -> None:
    from streamer.serving.codec import encode_forecasts

    def encode(forecasts: np.ndarray, lower: np.ndarray, upper: np.ndarray, n: int = 1,
               ) -> list[bytes]:
        return encode_forecasts(["s"] * n, np.ones(n), forecasts, [0] * n, list(range(n)),
                                np.zeros(n, int), lower=lower, upper=upper,
                                anomaly_scores=np.zeros(n), anomalies=np.zeros(n, bool))

    one, two = np.ones((1, 1)), np.ones((1, 2))
    assert len(encode(one, one, one)) == 1
    # a feature too many in the bounds, or one too few: never "value" beside a list of bounds
    with pytest.raises(ValueError, match=r"one \(N, F\) shape, got \(1, 1\), \(1, 2\)"):
        encode(one, two, two)
    with pytest.raises(ValueError, match=r"got \(1, 2\), \(1, 1\) and \(1, 2\)"):
        encode(two, one, two)
    # bounds for fewer rows than forecasts, or a row's metadata missing: never a row dropped
    with pytest.raises(ValueError):
        encode(np.ones((2, 1)), one, one, n=2)
    with pytest.raises(ValueError):
        encode(np.ones((2, 1)), np.ones((2, 1)), np.ones((2, 1)), n=1)
    # (the plain reference refuses the same)
    with pytest.raises(ValueError, match="expected 2 forecast values and bounds, got 1, 2"):
        encode_forecast("s1", 1.0, [1.0], 0, 1, 1, 2, **_bounds(2))


def test_anomaly_event_carries_the_reading_what_was_expected_and_the_score() -> None:
    (one,) = encode_anomalies(["pump-7"], np.array([1.7e9]), np.array([[950.0]]),
                              np.array([[20.5]]), np.array([[19.0]]), np.array([[22.0]]),
                              np.array([0.99999912]), [2], [314])
    assert json.loads(one) == {
        "sensor_id": "pump-7", "ts": 1.7e9, "value": 950.0, "forecast": 20.5, "lower": 19.0,
        "upper": 22.0, "anomaly_score": 0.99999912, "anomaly": True, "partition": 2,
        "offset": 314,
    }
    (two,) = encode_anomalies(["m"], np.array([5.0]), np.array([[1.0, 2.0]]),
                              np.array([[1.5, np.nan]]), np.array([[1.0, 1.0]]),
                              np.array([[2.0, 3.0]]), np.array([1.0]), [0], [1])
    body = json.loads(two)
    assert (body["values"], body["forecast"], body["lower"], body["upper"]) == (
        [1.0, 2.0], [1.5, None], [1.0, 1.0], [2.0, 3.0])


@pytest.mark.parametrize(("n_features", "horizon", "id_length"), [(1, 1, 16), (3, 12, 256),
                                                                 (2, 40, 1)])
def test_no_forecast_or_anomaly_event_is_larger_than_the_largest_output_bound(
        n_features: int, horizon: int, id_length: int) -> None:
    bound = largest_output_bytes(n_features, horizon, id_length)
    rng = np.random.default_rng(0)
    nasty = np.array([-2.2250738585072014e-308, -1.7976931348623157e+308, -1e-300, 0.1 + 0.2,
                      -123456789.12345678, math.pi * 1e-200, math.nan, -math.inf])
    largest, n = 0, 64

    def pick(*shape: int) -> np.ndarray:
        return rng.choice(nasty, size=shape)

    for sensor_id in ["\x01" * id_length, "\U0001f600" * id_length, "é" * id_length]:
        ahead = None if horizon == 1 else HorizonResult(
            pick(n, horizon, n_features), pick(n, horizon, n_features),
            pick(n, horizon, n_features), pick(n, horizon), np.empty((n, 0)),
            np.empty(0, dtype=np.int64))
        forecasts = encode_forecasts(
            [sensor_id] * n, pick(n), pick(n, n_features), [2**31 - 1] * n, [2**63 - 1] * n,
            np.full(n, 2**63 - 1), lower=pick(n, n_features), upper=pick(n, n_features),
            anomaly_scores=pick(n), anomalies=rng.random(n) < 0.5, horizon=ahead)
        events = encode_anomalies([sensor_id] * n, pick(n),
                                  *(pick(n, n_features) for _ in range(4)), pick(n),
                                  [2**31 - 1] * n, [2**63 - 1] * n)
        key = len(forecast_key(sensor_id))
        largest = max(largest, *(key + len(v) for v in forecasts + events))
    assert largest <= bound
    assert largest > 0.6 * bound  # a bound, not a guess far above what is written


def test_forecast_key_is_the_utf8_sensor_id() -> None:
    assert forecast_key("Kühlhaus-3") == "Kühlhaus-3".encode()


def test_dlq_headers_name_the_reason_and_the_source_record() -> None:
    headers = dlq_headers(Reason.KEY_MISMATCH, "key 's2' differs", "sensor-readings", 3, 1234)
    assert headers == [
        ("streamer.reason", b"key_mismatch"),
        ("streamer.detail", b"key 's2' differs"),
        ("streamer.source.topic", b"sensor-readings"),
        ("streamer.source.partition", b"3"),
        ("streamer.source.offset", b"1234"),
    ]


def test_dlq_detail_is_bounded() -> None:
    headers = dict(dlq_headers(Reason.NOT_JSON, "x" * 10_000, "t", 0, 0))
    assert len(headers["streamer.detail"]) == 512
    assert headers["streamer.detail"].endswith(b"...")


def test_dead_letter_keeps_key_value_and_headers_and_a_tombstone_stays_null() -> None:
    theirs = [("trace", b"t-1"), ("none", None)]
    letter = dead_letter(b"k", None, theirs, Reason.NOT_JSON, "record has no value", "in", 2, 7)
    assert letter.key == b"k" and letter.value is None
    # kafka-python cannot send a null header value: it goes as b"".
    assert letter.headers == [("trace", b"t-1"), ("none", b"")] + dlq_headers(
        Reason.NOT_JSON, "record has no value", "in", 2, 7)


def test_dead_letter_of_a_record_with_neither_key_nor_value_gets_an_empty_key() -> None:
    letter = dead_letter(None, None, [], Reason.NOT_JSON, "record has no value", "in", 0, 1)
    assert letter.key == b"" and letter.value is None


def test_dead_letter_just_under_the_limit_is_whole() -> None:
    value = b"v" * (MAX_DEAD_LETTER_BYTES - 1 - len("trace") - 3 - HEADER_FRAMING_BYTES)
    letter = dead_letter(b"k", value, [("trace", b"t-1")], Reason.NOT_JSON, "", "in", 0, 0)
    assert letter.value == value and "streamer.cut" not in dict(letter.headers)


def test_oversized_dead_letter_is_cut_to_fit_saying_what_it_was() -> None:
    key, value = b"k" * 70_000, bytes(range(256)) * 5000
    headers = [("big", b"h" * 70_000)]
    letter = dead_letter(key, value, headers, Reason.BAD_SENSOR_ID, "too long", "in", 1, 9)
    assert letter.key == key[:CUT_KEEP_BYTES] and letter.value == value[:CUT_KEEP_BYTES]
    got = dict(letter.headers)
    assert "big" not in got
    assert got["streamer.reason"] == b"bad_sensor_id"
    assert got["streamer.cut"] == b"key,value,headers"
    assert got["streamer.original.key.size"] == b"70000"
    assert got["streamer.original.value.size"] == b"1280000"
    assert got["streamer.original.value.sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert got["streamer.original.key.sha256"] == hashlib.sha256(key).hexdigest().encode()
    assert got["streamer.original.headers.size"] == str(3 + 70_000).encode()  # keys + values
    size = len(letter.key) + len(letter.value) + sum(len(k) + len(v) for k, v in letter.headers)
    assert size < MAX_DEAD_LETTER_BYTES // 4


def test_a_dead_letter_of_a_million_empty_headers_fits_a_producer_request():
    # Each header costs its framing in the record even when it carries no bytes: a record the
    # broker took (~1 MB of value, 500,000 empty headers) must still leave as a dead letter
    # the producer sends, or its partition would retry it forever.
    from kafka.record.default_records import DefaultRecordBatchBuilder

    headers = [("", b"")] * 500_000
    letter = dead_letter(b"k", b"v" * 1_000_000, headers, Reason.NOT_JSON, "", "in", 0, 0)
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        letter.key, letter.value, letter.headers)
    assert size <= 1_048_576  # kafka-python's and librdkafka's default request limit
    assert dict(letter.headers)["streamer.cut"] == b"value,headers"


def test_batch_encoding_is_byte_identical_to_one_by_one():
    import numpy as np

    from streamer.serving.codec import encode_forecasts

    ids = ["a", 'q"uote', "ünï", "back\\slash", "tab\tnl\n"]
    ts = np.array([1.5, 1.7e9, 3.25, 1e20, -0.0])
    for forecasts in (np.array([[1.0], [np.nan], [1e-300], [-2.5e10], [np.inf]]),
                      np.array([[1.0, 2.0], [np.inf, 3.0], [0.1, 0.2], [5, 6], [-1e-5, 7]])):
        f = forecasts.shape[1]
        lower, upper = forecasts - 1.5, forecasts * 2
        scores = np.array([0.0, 0.5, 0.123456789, 1.0, np.nan])  # nan: written as null
        flags = np.array([False, False, True, True, False])
        batch = encode_forecasts(ids, ts, forecasts, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9],
                                 np.array([1, 2, 3, 4, 5]), lower=lower, upper=upper,
                                 anomaly_scores=scores, anomalies=flags)
        single = [encode_forecast(i, t, v, p, o, u, f, lower=lo, upper=hi, anomaly_score=sc,
                                  anomaly=fl)
                  for i, t, v, p, o, u, lo, hi, sc, fl in
                  zip(ids, ts, forecasts, [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [1, 2, 3, 4, 5],
                      lower, upper, scores, flags)]
        assert batch == single


def test_a_forecast_with_a_horizon_lists_each_step_with_its_time_and_interval() -> None:
    horizon = HorizonResult(
        forecast=np.array([[[21.75], [22.5], [np.nan]]]), lower=np.array([[[20.5], [20.0], [1.0]]]),
        upper=np.array([[[23.0], [25.0], [2.0]]]), target_ts=np.array([[600.0, 1200.0, np.nan]]),
        step_error=np.full((1, 2), np.nan), steps=np.array([2, 3]))
    encoded = encode_forecast("s1", 0.5, [21.75], 3, 42, 7, 1, lower=[20.5], upper=[23.0],
                              anomaly_score=0.5, anomaly=False, horizon=horizon)
    assert encoded == (
        b'{"sensor_id":"s1","ts":0.5,"value":21.75,"lower":20.5,"upper":23.0,'
        b'"anomaly_score":0.5,"anomaly":false,"partition":3,"offset":42,"model_updates":7,'
        b'"horizon":[{"step":1,"ts":600.0,"value":21.75,"lower":20.5,"upper":23.0},'
        b'{"step":2,"ts":1200.0,"value":22.5,"lower":20.0,"upper":25.0},'
        b'{"step":3,"ts":null,"value":null,"lower":1.0,"upper":2.0}]}'
    )


def test_batch_encoding_with_a_horizon_is_byte_identical_to_one_by_one():
    from streamer.serving.codec import encode_forecasts

    rng = np.random.default_rng(0)
    for f in (1, 2):
        n, h = 4, 5
        forecasts = rng.normal(size=(n, f)) * 1e3
        horizon = HorizonResult(rng.normal(size=(n, h, f)), rng.normal(size=(n, h, f)) - 3,
                                rng.normal(size=(n, h, f)) + 3, rng.uniform(0, 1e9, (n, h)),
                                np.full((n, 3), np.nan), np.array([2, 4, 5]))
        horizon.forecast[1, 2, 0] = np.inf  # written as null
        horizon.target_ts[0] = np.nan  # gap not known yet: null
        ids, ts = ["a", "b", "c", "d"], np.arange(n, dtype=float)
        batch = encode_forecasts(ids, ts, forecasts, [0] * n, list(range(n)), np.zeros(n, int),
                                 lower=forecasts - 1, upper=forecasts + 1,
                                 anomaly_scores=np.zeros(n), anomalies=np.zeros(n, bool),
                                 horizon=horizon)
        single = [encode_forecast(ids[i], ts[i], forecasts[i], 0, i, 0, f,
                                  lower=forecasts[i] - 1, upper=forecasts[i] + 1,
                                  anomaly_score=0.0, anomaly=False,
                                  horizon=horizon.take(np.array([i])))
                  for i in range(n)]
        assert batch == single
        document = json.loads(batch[1])
        assert [s["step"] for s in document["horizon"]] == [1, 2, 3, 4, 5]
        step3 = document["horizon"][2]
        assert (step3["value"] if f == 1 else step3["values"][0]) is None
