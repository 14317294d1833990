"""Reading sensor CSVs: a row says what the same reading says on the input topic."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from streamer.core import LearnerConfig, Reason
from streamer.serving.codec import Reading, decode_reading
from streamer.tools.readings_csv import read_csv, timestamps_refused, well_formed
from streamer.tools.replay import backtest

TIMESTAMPS = ["1717171717", "1717171717.5", "-347155200", "1.7e9", "2024-05-31T16:08:37Z",
              "2024-05-31 16:10:37+02:00", "2024-05-31T16:08:37.25-05:30",
              "2024-05-31T16:08:37", "2024-05-31", "20240531T161137Z", "1_717_171_717",
              "+1717171717", "1717171717.", "0x66", "true", "not-a-time", ""]


def _worker_ts(text: str) -> float:
    """The ts the worker decodes from a record carrying ``text`` as a JSON number (when it is
    one) or else as a JSON string; nan when it rejects the record."""
    try:
        json.loads(text)
        body = f'{{"sensor_id":"a","ts":{text},"value":1}}'.encode()
    except ValueError:
        body = json.dumps({"sensor_id": "a", "ts": text, "value": 1}).encode()
    decoded = decode_reading(None, body)
    return decoded.ts if isinstance(decoded, Reading) else math.nan


def _write(tmp_path, cells: list[str]):
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\n" + "".join(f"a,{c},1\n" for c in cells))
    return path


def test_a_csv_timestamp_is_read_exactly_as_the_worker_reads_the_same_readings_ts(tmp_path):
    ts = read_csv(_write(tmp_path, TIMESTAMPS)).ts
    np.testing.assert_array_equal(ts, [_worker_ts(t) for t in TIMESTAMPS])
    accepted = dict(zip(TIMESTAMPS, ts.tolist()))
    assert accepted["2024-05-31T16:08:37Z"] == 1717171717.0
    assert accepted["2024-05-31 16:10:37+02:00"] == 1717164637.0
    rejected = ["2024-05-31T16:08:37", "20240531T161137Z", "1_717_171_717", "+1717171717"]
    assert all(math.isnan(accepted[t]) for t in rejected)


@pytest.fixture
def time_zone(monkeypatch):
    """``set(name)``: the process's local time zone, restored after the test."""

    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


def test_timestamps_read_the_same_in_every_local_time_zone(tmp_path, time_zone):
    path = _write(tmp_path, TIMESTAMPS)
    time_zone("UTC")
    in_utc = read_csv(path).ts
    time_zone("America/New_York")
    np.testing.assert_array_equal(read_csv(path).ts, in_utc)


def test_rows_whose_timestamp_the_worker_would_reject_are_rejected_and_not_sent(tmp_path):
    path = _write(tmp_path, ["1717171717", "2024-05-31T16:09:37", "20240531T161037Z",
                             "1_717_171_777", "2024-05-31T16:10:37Z"])
    readings = read_csv(path)
    status = backtest(readings, LearnerConfig(device="cpu"))[0].status
    assert [Reason(int(s)).label for s in status] == [
        "accepted", "non_finite", "non_finite", "non_finite", "accepted"]
    sendable, skipped = well_formed(readings)  # what `streamer produce` sends
    assert skipped == 3 and sendable.ts.tolist() == [1717171717.0, 1717171837.0]


def test_rows_the_worker_would_refuse_as_out_of_range_are_not_sent(tmp_path):
    # A ts in epoch milliseconds (1e12 s) or a value beyond 1e300: the worker refuses both
    # (value_out_of_range). Sent, the ts also set a looped file's first-round shift.
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1\na,1717171717000,2\n"
                    "a,1717171777,1e301\na,1717171837,-1e300\n")
    readings = read_csv(path)
    status = backtest(readings, LearnerConfig(device="cpu"))[0].status
    assert [Reason(int(s)).label for s in status] == [
        "accepted", "value_out_of_range", "value_out_of_range", "accepted"]
    sendable, skipped = well_formed(readings)  # what `streamer produce` sends
    assert skipped == 2 and sendable.values[:, 0].tolist() == [1.0, -1e300]


def test_a_value_with_digit_groups_is_rejected_not_read_as_its_digits(tmp_path):
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\na,1717171717,1_000\na,1717171777,1000\n")
    readings = read_csv(path)
    assert math.isnan(readings.values[0, 0]) and readings.values[1, 0] == 1000.0
    sendable, skipped = well_formed(readings)  # what `streamer produce` sends
    assert skipped == 1 and sendable.values[:, 0].tolist() == [1000.0]


def test_the_timestamps_the_worker_would_refuse_are_counted_by_what_is_wrong(tmp_path):
    path = tmp_path / "readings.csv"
    path.write_text("sensor_id,ts,value\na,1600000000,1\na,2024-01-01 00:00:00,2\n"
                    "a,1600000600000,3\na,1600000600000000,4\na,2024-01-01T00:00:00Z,5\n")
    assert timestamps_refused(read_csv(path)) == (
        "of 5 timestamps, 1 could not be read (a local time without a zone?) and 2 are beyond "
        "+-1e+11 s (epoch milliseconds?): a timestamp is epoch seconds or RFC 3339 with a time "
        "zone (2024-01-01T00:00:00Z), as the worker reads it")
    path.write_text("sensor_id,ts,value\na,1600000000,1\na,2024-01-01T00:00:00+01:00,2\n"
                    "a,1600000600,nan\n")  # (a value the worker refuses is not a timestamp's)
    assert timestamps_refused(read_csv(path)) == ""
