"""The message contract: readings in; forecasts (with intervals and anomaly scores), anomaly
events and rejected records (to the dead-letter topic) out.

Input record: key = sensor id (UTF-8, optional; an empty key counts as absent), value = JSON
``{"sensor_id": str?, "ts": <epoch seconds> | "<RFC 3339 with offset>", "value": number}`` or
``"values": [numbers]`` instead of ``value``; without ``ts`` the record's own timestamp stands
in. Other fields are ignored, and a field written as null counts as absent, except that a
null reading (``value``, or one of ``values``) is a missing one, rejected as a NaN is.
Decoding never raises on bad data: each record becomes a
``Reading`` or a ``Rejection``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, NamedTuple

import numpy as np
from pydantic import (
    AwareDatetime,
    BeforeValidator,
    ConfigDict,
    Strict,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import NotRequired, TypedDict

from streamer.core.batch import Batch, HorizonResult
from streamer.core.rejections import Reason

DLQ_REASON = "streamer.reason"
DLQ_DETAIL = "streamer.detail"
DLQ_SOURCE_TOPIC = "streamer.source.topic"
DLQ_SOURCE_PARTITION = "streamer.source.partition"
DLQ_SOURCE_OFFSET = "streamer.source.offset"
# Headers count against the broker's message size limit; a detail is a hint, not a payload.
MAX_DETAIL_CHARS = 512
# A dead letter larger than this (key + value + headers) is cut so that it can be delivered:
# producers refuse records over 1 MiB by default and brokers accept about that much, while a
# default Apache Kafka broker accepts an input record of up to ~1,048,500 bytes.
MAX_DEAD_LETTER_BYTES = 1_000_000
CUT_KEEP_BYTES = 65_536  # what a cut dead letter keeps of the key, of the value, of the headers
# A header's framing in a record (two varint lengths, 5 bytes at most each): counted, so that a
# record of a million empty headers, which carries no header bytes, is still cut to fit.
HEADER_FRAMING_BYTES = 10
DLQ_CUT = "streamer.cut"  # what was cut: "key", "value", "headers", comma-separated
DLQ_ORIGINAL_SIZE = "streamer.original.{}.size"  # bytes of the original key/value/headers
DLQ_ORIGINAL_SHA256 = "streamer.original.{}.sha256"  # hex digest of the original key/value

# Date, 'T' (or space, as RFC 3339 allows), time with seconds, optional fraction, optional offset.
# The offset is optional here only so that pydantic reports a missing one as such.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?", re.ASCII
)


def _rfc3339_shape(value: Any) -> str:
    # pydantic alone would also take "1700000000" or "2024-01-01_00:00Z" as datetimes.
    if not isinstance(value, str):
        raise PydanticCustomError("timestamp_type", "not a number or a string")
    if not _RFC3339.fullmatch(value):
        raise PydanticCustomError("rfc3339", "not an RFC 3339 timestamp")
    if value[17:19] == "60":  # a leap second, which RFC 3339 allows and epoch time lacks
        if _utc_minute(value) != 23 * 60 + 59:
            raise PydanticCustomError("leap_second", "second 60 outside a leap second")
        return value[:17] + "59" + value[19:]  # read as the second before it
    return value


def _utc_minute(value: str) -> int:
    """The minute of the UTC day of an RFC 3339-shaped string (its offset applied; none: UTC)."""
    minute = int(value[11:13]) * 60 + int(value[14:16])
    offset = re.search(r"[+-]\d{2}:\d{2}$", value)
    if offset:
        sign = 1 if offset.group()[0] == "+" else -1
        minute -= sign * (int(offset.group()[1:3]) * 60 + int(offset.group()[4:6]))
    return minute % (24 * 60)


# A ts string: lax datetime parsing of a string that already has RFC 3339's shape (the
# validator hands pydantic a Python str, which strict mode would refuse).
Rfc3339Time = Annotated[AwareDatetime, Strict(False), BeforeValidator(_rfc3339_shape)]
_STRICT = ConfigDict(strict=True, extra="ignore")


# Strict: booleans and numeric strings are not numbers. NaN and +-inf pass the schema and are
# rejected afterwards as NON_FINITE, which is the more useful reason; 1e999 parses as inf.
# null: a field written as null is absent (serializers of optional fields write them so), and a
# null reading is a missing one, NON_FINITE as NaN is (pandas' to_json writes NaN as null).
@with_config(_STRICT)
class _ReadingBody(TypedDict):
    sensor_id: NotRequired[str | None]
    ts: NotRequired[float | Rfc3339Time | None]
    value: NotRequired[float | None]
    values: NotRequired[list[float | None] | None]


_READING_BODY = TypeAdapter(_ReadingBody)
# The two forms of ts on their own, for timestamps written as text (timestamp_from_text).
_EPOCH_SECONDS = TypeAdapter(float, config=_STRICT)
_RFC3339_TIME = TypeAdapter(Rfc3339Time, config=_STRICT)


def timestamp_from_text(text: str) -> float:
    """Epoch seconds of a timestamp written as text (a CSV cell), read by the rule a record's
    ``ts`` follows: a JSON number, or an RFC 3339 string with a time zone. nan where that rule
    rejects it (the learner rejects a non-finite ts, as it does NaN given as a number)."""
    try:
        return _EPOCH_SECONDS.validate_json(text)
    except ValidationError:
        pass
    try:
        return _RFC3339_TIME.validate_python(text).timestamp()
    except ValidationError:
        return math.nan


class Reading(NamedTuple):
    """A decoded reading; ``values`` keeps whatever count the record carried."""

    sensor_id: str
    ts: float
    values: tuple[float, ...]


class Rejection(NamedTuple):
    """Why a record could not be decoded."""

    reason: Reason
    detail: str


@dataclass(frozen=True)
class DecodedBatch:
    """The good readings of a micro-batch and the rejections, both tied to input positions."""

    batch: Batch  # (N_good,) readings in input order
    index: np.ndarray  # (N_good,) int64 input position of each reading in ``batch``
    rejections: list[tuple[int, Reason, str]]  # (input position, reason, detail), in order


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_ts_errors(errors: list[Any]) -> str:
    types = {error["type"] for error in errors}
    if "timezone_aware" in types:
        return "ts: RFC 3339 timestamp must carry a timezone (Z or +hh:mm)"
    if "rfc3339" in types:
        return "ts: string is not an RFC 3339 timestamp"
    if "leap_second" in types:
        return "ts: second 60 outside a leap second (only 23:59:60 UTC is one)"
    for error in errors:
        if error["type"] in ("datetime_parsing", "datetime_from_date_parsing"):
            reason = error.get("ctx", {}).get("error", error["msg"])
            return f"ts: not a valid RFC 3339 timestamp: {reason}"
    return "ts: must be epoch seconds (a number) or an RFC 3339 string"


def _schema_rejection(err: ValidationError) -> Rejection:
    errors = err.errors(include_url=False, include_input=False)
    if errors[0]["type"] == "json_invalid":
        return Rejection(Reason.NOT_JSON, errors[0]["msg"])
    parts: list[str] = []
    ts_errors = [error for error in errors if error["loc"][:1] == ("ts",)]
    for error in errors:
        loc = error["loc"]
        if not loc:
            parts.append("body must be a JSON object")
        elif loc[0] == "sensor_id":  # the contract's id is text; say how to send a number
            parts.append('sensor_id: must be a string (write a numeric id as "17")')
        elif loc[0] != "ts":
            parts.append(".".join(str(part) for part in loc) + ": " + error["msg"])
    if ts_errors:
        parts.append(_describe_ts_errors(ts_errors))
    return Rejection(Reason.SCHEMA_VIOLATION, "; ".join(parts))


def _mismatch(key_id: str, body_id: str) -> str:
    show = repr
    if unicodedata.normalize("NFKC", key_id) == unicodedata.normalize("NFKC", body_id):
        show = ascii  # "café" composed and decomposed: they look the same; show code points
    return f"key {show(_clip(key_id))} differs from body sensor_id {show(_clip(body_id))}"


def decode_reading(key: bytes | None, value: bytes | None,
                   record_timestamp_ms: int = -1) -> Reading | Rejection:
    """Decode one record's key and value into a reading, or say why not. A body without
    ``ts`` takes the record's timestamp (milliseconds, as Kafka keeps it; none when <= 0)."""
    if value is None:
        return Rejection(Reason.NOT_JSON, "record has no value")
    try:
        body = _READING_BODY.validate_json(value)
    except ValidationError as err:
        return _schema_rejection(err)

    body_id = body.get("sensor_id")
    if key:
        try:
            sensor_id = key.decode("utf-8")
        except UnicodeDecodeError:
            return Rejection(Reason.SCHEMA_VIOLATION, "key is not valid UTF-8")
        if body_id is not None and body_id != sensor_id:
            return Rejection(Reason.KEY_MISMATCH, _mismatch(sensor_id, body_id))
    elif body_id is None:
        return Rejection(Reason.SCHEMA_VIOLATION, "sensor_id: required when the record has no key")
    else:
        sensor_id = body_id

    one, many = body.get("value"), body.get("values")
    if one is not None:
        if many is not None:
            return Rejection(
                Reason.SCHEMA_VIOLATION, "give exactly one of value and values, not both"
            )
        values: tuple[float, ...] = (one,)
    elif many is not None:
        if None in many:
            return Rejection(Reason.NON_FINITE, "values hold a null (a missing reading)")
        values = tuple(many)
    elif "value" in body or "values" in body:
        null = "value" if "value" in body else "values"
        return Rejection(Reason.NON_FINITE, f"{null} is null (a missing reading)")
    else:
        return Rejection(Reason.SCHEMA_VIOLATION, "give exactly one of value and values")

    ts = body.get("ts")
    if ts is not None:
        if isinstance(ts, datetime):
            ts = ts.timestamp()
        elif not math.isfinite(ts):
            return Rejection(Reason.NON_FINITE, "ts is not finite")
    elif record_timestamp_ms > 0:  # Kafka's: the producer's send time or the broker's append time
        ts = record_timestamp_ms / 1000.0
    else:  # -1: none (0 from librdkafka when not available)
        return Rejection(Reason.SCHEMA_VIOLATION,
                         "ts: Field required (the record has no timestamp to stand in)")
    if not all(map(math.isfinite, values)):
        return Rejection(
            Reason.NON_FINITE,
            "value is not finite" if one is not None else "values hold a non-finite number",
        )
    return Reading(sensor_id, ts, values)


def decode_batch(
    records: Sequence[tuple[bytes | None, bytes | None]], n_features: int,
    timestamps_ms: Sequence[int] | None = None,
) -> DecodedBatch:
    """Decode (key, value) records into a ``Batch`` of the good ones plus the rejections;
    ``timestamps_ms``, the records' own, stand in for a missing ``ts``."""
    readings: list[Reading] = []
    index: list[int] = []
    rejections: list[tuple[int, Reason, str]] = []
    stamps = [-1] * len(records) if timestamps_ms is None else timestamps_ms
    for position, ((key, value), stamp) in enumerate(zip(records, stamps, strict=True)):
        decoded = decode_reading(key, value, stamp)
        if isinstance(decoded, Reading):
            readings.append(decoded)
            index.append(position)
        else:
            rejections.append((position, decoded.reason, decoded.detail))
    return DecodedBatch(
        Batch.from_records(readings, n_features), np.asarray(index, dtype=np.int64), rejections
    )


def encode_forecasts(
    sensor_ids: Sequence[str],
    ts: np.ndarray,
    forecasts: np.ndarray,
    partitions: Sequence[int],
    offsets: Sequence[int],
    update_counts: np.ndarray,
    *,
    lower: np.ndarray,
    upper: np.ndarray,
    anomaly_scores: np.ndarray,
    anomalies: np.ndarray,
    horizon: HorizonResult | None = None,
) -> list[bytes]:
    """The forecast that follows each reading at (partition, offset), as UTF-8 JSON.

    ``lower`` / ``upper`` bound the forecast's prediction interval; ``anomaly_scores`` and
    ``anomalies`` are those of the reading at (partition, offset), given the forecast made
    before it. With ``horizon`` (the next H readings' forecasts made at each reading, step 1
    being the top-level forecast) a ``"horizon"`` list follows: ``{"step": k, "ts": expected
    time, "value" (or "values"), "lower", "upper"}`` per step. A non-finite number is written
    as ``null``: the output stays valid JSON. (tests/serving/forecast_reference.py states the
    same with one json.dumps per record; the tests pin them byte for byte.)

    The hot path's JSON: each record is one string format of pre-rendered numbers
    (``float.__repr__`` is JSON's shortest round-trip form; non-finite numbers become null).
    """
    escape = json.encoder.encode_basestring  # type: ignore[attr-defined]  # C-accelerated
    if not (forecasts.ndim == 2 and np.shape(lower) == np.shape(upper) == forecasts.shape):
        raise ValueError(f"expected forecasts and bounds of one (N, F) shape, got "
                         f"{forecasts.shape}, {np.shape(lower)} and {np.shape(upper)}")
    numbers, field = _render(forecasts)
    lows, _ = _render(lower)
    highs, _ = _render(upper)
    scores = _render_scores(anomaly_scores)
    flags = ["true" if x else "false" for x in np.asarray(anomalies).tolist()]
    ahead = [""] * len(flags) if horizon is None else _render_horizon(horizon, field)
    template = ('{"sensor_id":%s,"ts":%s,"' + field + '":%s,"lower":%s,"upper":%s,'
                '"anomaly_score":%s,"anomaly":%s,"partition":%d,"offset":%d,"model_updates":%d'
                '%s}')
    return [
        (template % row).encode()
        for row in zip(map(escape, sensor_ids), map(repr, ts.astype(np.float64).tolist()),
                       numbers, lows, highs, scores, flags, partitions, offsets,
                       np.asarray(update_counts).tolist(), ahead, strict=True)
    ]


def _render_horizon(horizon: HorizonResult, field: str) -> list[str]:
    """Per row, the ``,"horizon":[...]`` member of its forecast's JSON."""
    n, h, f = horizon.forecast.shape
    step_template = '{"step":%d,"ts":%s,"' + field + '":%s,"lower":%s,"upper":%s}'
    values, _ = _render(horizon.forecast.reshape(n * h, f))
    lows, _ = _render(horizon.lower.reshape(n * h, f))
    highs, _ = _render(horizon.upper.reshape(n * h, f))
    times = _render_scores(horizon.target_ts.reshape(n * h))
    steps = [step_template % (k % h + 1, t, v, lo, hi)
             for k, (t, v, lo, hi) in enumerate(zip(times, values, lows, highs))]
    return [',"horizon":[' + ",".join(steps[i * h:(i + 1) * h]) + "]" for i in range(n)]


def _render(numbers: np.ndarray) -> tuple[list[str], str]:
    """(N, F) numbers as JSON text per row: a number for one feature, else a list; and the
    forecast's field name for that shape."""
    rendered = [[repr(x) if math.isfinite(x) else "null" for x in row] for row in numbers.tolist()]
    if numbers.shape[1] == 1:
        return [row[0] for row in rendered], "value"
    return ["[" + ",".join(row) + "]" for row in rendered], "values"


def _render_scores(scores: np.ndarray) -> list[str]:
    return [repr(x) if math.isfinite(x) else "null"
            for x in np.asarray(scores, dtype=np.float64).tolist()]


def encode_anomalies(
    sensor_ids: Sequence[str],
    ts: np.ndarray,
    values: np.ndarray,
    expected: np.ndarray,
    expected_lower: np.ndarray,
    expected_upper: np.ndarray,
    anomaly_scores: np.ndarray,
    partitions: Sequence[int],
    offsets: Sequence[int],
) -> list[bytes]:
    """One event per flagged reading for the anomaly topic, as UTF-8 JSON: the reading
    (``value`` / ``values``), the forecast made for it and that forecast's interval
    (``forecast``, ``lower``, ``upper``: lists for several features), its score, and where it
    came from."""
    escape = json.encoder.encode_basestring  # type: ignore[attr-defined]
    readings, field = _render(values)
    forecasts, _ = _render(expected)
    lows, _ = _render(expected_lower)
    highs, _ = _render(expected_upper)
    scores = _render_scores(anomaly_scores)
    template = ('{"sensor_id":%s,"ts":%s,"' + field + '":%s,"forecast":%s,"lower":%s,'
                '"upper":%s,"anomaly_score":%s,"anomaly":true,"partition":%d,"offset":%d}')
    return [
        (template % row).encode()
        for row in zip(map(escape, sensor_ids), map(repr, ts.astype(np.float64).tolist()),
                       readings, forecasts, lows, highs, scores, partitions, offsets)
    ]


# The longest text float.__repr__ gives (-2.2250738585072014e-308): every number of a record
# at its longest, for its largest size.
_LONGEST_NUMBER = -2.2250738585072014e-308


def largest_output_bytes(n_features: int, horizon: int, max_sensor_id_length: int) -> int:
    """The most bytes (key and value) a forecast or anomaly event can take with these
    settings: every number at its longest, a sensor id of the longest length in the characters
    that take most room (6 in JSON's \\u escape, 4 in the key's UTF-8), the largest partition,
    offset and update count. The worker refuses settings whose records the producer would
    refuse (a record refused is sent again and again: nothing would be forecast again)."""
    n, f, h = 1, n_features, horizon
    worst = np.full((n, f), _LONGEST_NUMBER)
    at = np.full(n, _LONGEST_NUMBER)
    sensor_ids = ["\x01" * max_sensor_id_length]
    largest = 2**63 - 1
    ahead = None if h == 1 else HorizonResult(
        np.full((n, h, f), _LONGEST_NUMBER), np.full((n, h, f), _LONGEST_NUMBER),
        np.full((n, h, f), _LONGEST_NUMBER), np.full((n, h), _LONGEST_NUMBER),
        np.empty((n, 0)), np.empty(0, dtype=np.int64))
    forecast = encode_forecasts(sensor_ids, at, worst, [2**31 - 1], [largest],
                                np.array([largest]), lower=worst, upper=worst,
                                anomaly_scores=at, anomalies=np.ones(n, bool), horizon=ahead)
    event = encode_anomalies(sensor_ids, at, worst, worst, worst, worst, at, [2**31 - 1],
                             [largest])
    return 4 * max_sensor_id_length + max(len(forecast[0]), len(event[0]))


def forecast_key(sensor_id: str) -> bytes:
    """The output record's key: the sensor id, so one sensor's forecasts share a partition."""
    return sensor_id.encode("utf-8")


class DeadLetter(NamedTuple):
    """A rejected record as it goes to the dead-letter topic."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def dead_letter(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]],
    reason: Reason, detail: str, topic: str, partition: int, offset: int,
) -> DeadLetter:
    """The dead letter of a rejected record: its key, value (None stays None) and headers
    unchanged, then streamer's headers; cut to fit when over ``MAX_DEAD_LETTER_BYTES``.

    A cut dead letter keeps the first ``CUT_KEEP_BYTES`` of an oversized key and value, and the
    original headers only if they total at most that (with ``HEADER_FRAMING_BYTES`` each: their
    size in the record); for each part cut, headers give its
    original size (and, for key and value, its SHA-256), and ``streamer.cut`` names the parts.
    """
    ours = dlq_headers(reason, detail, topic, partition, offset)
    # Kafka allows null header values and records with neither key nor value; kafka-python's
    # producer sends neither, so a null header value goes as b"" and such a record with key b"".
    theirs = [(k, b"" if v is None else v) for k, v in headers]
    if key is None and value is None:
        key = b""
    content_bytes = sum(len(k.encode()) + len(v) for k, v in theirs)
    header_bytes = content_bytes + HEADER_FRAMING_BYTES * len(theirs)  # as sent
    if _size(key) + _size(value) + header_bytes <= MAX_DEAD_LETTER_BYTES:
        return DeadLetter(key, value, theirs + ours)
    cut: list[str] = []
    notes: list[tuple[str, bytes]] = []
    parts = {"key": key, "value": value}
    for part, data in parts.items():
        if data is not None and len(data) > CUT_KEEP_BYTES:
            cut.append(part)
            notes += [(DLQ_ORIGINAL_SIZE.format(part), str(len(data)).encode()),
                      (DLQ_ORIGINAL_SHA256.format(part), hashlib.sha256(data).hexdigest().encode())]
            parts[part] = data[:CUT_KEEP_BYTES]
    if header_bytes > CUT_KEEP_BYTES:
        cut.append("headers")
        notes.append((DLQ_ORIGINAL_SIZE.format("headers"), str(content_bytes).encode()))
        theirs = []
    return DeadLetter(parts["key"], parts["value"],
                      theirs + ours + notes + [(DLQ_CUT, ",".join(cut).encode())])


def _size(data: bytes | None) -> int:
    return 0 if data is None else len(data)


def dlq_headers(
    reason: Reason, detail: str, topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """streamer's headers on a dead letter: why, and where the record came from."""
    return [
        (DLQ_REASON, reason.label.encode()),
        (DLQ_DETAIL, _clip(detail, MAX_DETAIL_CHARS).encode("utf-8", "backslashreplace")),
        (DLQ_SOURCE_TOPIC, topic.encode("utf-8")),
        (DLQ_SOURCE_PARTITION, str(int(partition)).encode()),
        (DLQ_SOURCE_OFFSET, str(int(offset)).encode()),
    ]
