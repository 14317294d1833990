"""The event clock that idle eviction runs on: the newest reading time two sensors agree on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# How many distinct sensors must have reached a time before the clock moves to it.
QUORUM = 2


class EventClock:
    """The fleet's event time for evicting sensors idle longer than ``ttl`` seconds.

    It is the newest time that QUORUM distinct sensors have reached, and never goes back. One
    device whose clock runs ahead (dated a year ahead, set to local time instead of UTC, or
    drifting fast by a little at each reading) is never corroborated by another sensor, so it
    cannot make every other sensor look idle and have the fleet evicted at every micro-batch.
    A fleet resuming after an outage moves it as soon as two sensors are back. When the newest
    reading is more than a TTL ahead and nothing moves the clock (a fleet of one, or the last
    live sensor of a fleet whose others all fell silent), the clock moves to that reading once
    it has gone on a further TTL, and from then on goes along with it (in steps of less than
    a TTL) until sensors agree again: the silent ones are evicted one TTL late.

    Not covered: a second device dated ahead as far as the first (they corroborate each other).
    """

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.time = -np.inf
        # Where a lone jump was first held back; -inf: none; +inf: the clock follows it.
        self.held = -np.inf
        self.leaders: list[tuple[float, str]] = []  # the QUORUM newest sensors, newest first

    def advance(self, sensor_ids: Sequence[str], rows: np.ndarray, ts: np.ndarray) -> float:
        """Move the clock with readings at ``ts`` of ``sensor_ids[rows]``; the new time."""
        newest = float(ts.max())
        self.leaders = _newest_sensors(self.leaders, sensor_ids, rows, ts)
        reached = self.leaders[-1][0] if len(self.leaders) == QUORUM else -np.inf
        clock = max(self.time, reached)
        if clock > self.time:  # sensors agree on a newer time
            self.held = -np.inf
        elif self.held == np.inf and newest - clock <= self.ttl:  # along with a lone sensor
            clock = max(clock, newest)
        elif newest - clock > self.ttl:  # a lone jump: held back until it goes on a TTL
            if not np.isfinite(self.held):
                self.held = newest
            elif newest - self.held >= self.ttl:
                clock, self.held = newest, np.inf  # and followed from now on
        self.time = clock
        return clock

    def to_plain(self) -> dict:
        return {"event_time": float(self.time), "clock_held": float(self.held),
                "clock_leaders": [[t, sensor] for t, sensor in self.leaders]}

    def load_plain(self, plain: dict, last_seen: dict[str, float]) -> None:
        """Restore from ``to_plain``; snapshots from before the leaders were kept take them
        from ``last_seen`` (each known sensor's newest reading time)."""
        self.time = float(plain["event_time"])
        self.held = float(plain.get("clock_held", -np.inf))
        if "clock_leaders" in plain:
            self.leaders = [(float(t), str(sensor)) for t, sensor in plain["clock_leaders"]]
        else:
            newest = sorted(last_seen.items(), key=lambda item: -item[1])[:QUORUM]
            self.leaders = [(float(t), sensor) for sensor, t in newest]


def _newest_sensors(leaders: list[tuple[float, str]], sensor_ids: Sequence[str],
                    rows: np.ndarray, ts: np.ndarray) -> list[tuple[float, str]]:
    """The QUORUM newest distinct sensors among ``leaders`` and these readings, newest first:
    from the batch's few newest readings, or all of them when those few are of fewer sensors
    (one sensor far ahead of the others in this micro-batch)."""
    few = min(len(ts), 4 * QUORUM)
    found = _distinct(leaders, sensor_ids, rows, ts, np.argpartition(-ts, few - 1)[:few])
    if len(found) < QUORUM and few < len(ts):
        found = _distinct(leaders, sensor_ids, rows, ts, np.arange(len(ts)))
    return found


def _distinct(leaders: list[tuple[float, str]], sensor_ids: Sequence[str], rows: np.ndarray,
              ts: np.ndarray, looked_at: np.ndarray) -> list[tuple[float, str]]:
    merged = sorted([*leaders, *((float(ts[i]), sensor_ids[rows[i]]) for i in looked_at)],
                    key=lambda pair: -pair[0])
    found: dict[str, float] = {}
    for t, sensor in merged:
        found.setdefault(sensor, t)
        if len(found) == QUORUM:
            break
    return [(t, sensor) for sensor, t in found.items()]
