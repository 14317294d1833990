"""Codec throughput in messages per second (a print-out, not a test): python tests/bench_codec.py"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from streamer.core.rejections import Reason
from streamer.serving.codec import decode_batch, dlq_headers, forecast_key
from tests.serving.forecast_reference import encode_forecast

N = 200_000
BATCH = 500  # the default kafka.max_poll_records


def _records(make_value: Callable[[int], bytes]) -> list[tuple[bytes | None, bytes | None]]:
    return [(f"sensor-{i % 1000:04d}".encode(), make_value(i)) for i in range(N)]


def _simple(i: int) -> bytes:
    body = {"sensor_id": f"sensor-{i % 1000:04d}", "ts": 1.7e9 + i * 0.5, "value": 20.0 + i % 7}
    return json.dumps(body).encode()


def _rfc3339_three_features(i: int) -> bytes:
    ts = f"2024-05-01T12:{i // 60 % 60:02d}:{i % 60:02d}.250+02:00"
    return json.dumps({"ts": ts, "values": [1.5, 2.5, float(i % 9)]}).encode()


def _one_in_ten_bad(i: int) -> bytes:
    if i % 10 == 0:
        return b'{"ts": 1, "value": NaN}' if i % 20 == 0 else b"{not json"
    return _simple(i)


def _rate(label: str, records: list[tuple[bytes | None, bytes | None]], n_features: int) -> None:
    start = time.perf_counter()
    for begin in range(0, len(records), BATCH):
        decode_batch(records[begin : begin + BATCH], n_features)
    elapsed = time.perf_counter() - start
    print(f"decode_batch  {label:<36} {len(records) / elapsed:>12,.0f} msgs/s")


def _encode_rate() -> None:
    start = time.perf_counter()
    for i in range(N):
        forecast_key("sensor-0001")
        encode_forecast("sensor-0001", 1.7e9 + i, [21.5], 3, i, 17, 1, lower=[20.25],
                        upper=[22.75], anomaly_score=0.5, anomaly=False)
    elapsed = time.perf_counter() - start
    print(f"encode_forecast + forecast_key {'':<21} {N / elapsed:>12,.0f} msgs/s")
    start = time.perf_counter()
    for i in range(N):
        dlq_headers(Reason.NOT_JSON, "Invalid JSON", "sensor-readings", 3, i)
    elapsed = time.perf_counter() - start
    print(f"dlq_headers {'':<41} {N / elapsed:>12,.0f} msgs/s")


def main() -> None:
    """Print decode and encode throughput for a few message shapes."""
    _rate("simple (F=1, epoch ts, key)", _records(_simple), 1)
    _rate("RFC 3339 ts, F=3, key only", _records(_rfc3339_three_features), 3)
    _rate("simple, 10% rejected", _records(_one_in_ten_bad), 1)
    _encode_rate()


if __name__ == "__main__":
    main()
