"""The event clock that idle eviction runs on: the newest reading time two sensors agree on."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# How many distinct sensors, within a TTL of each other, must have reached a time before the
# clock moves to it; and how many of the newest sensors are kept, ahead of the time they last
# agreed on and at or behind it, to find them.
QUORUM, LEADERS = 2, 4


class EventClock:
    """The fleet's event time for evicting sensors idle longer than ``ttl`` seconds.

    It is the newest time that QUORUM distinct sensors within a TTL of each other have reached,
    and never goes back. One device whose clock runs ahead (dated a year ahead, set to local
    time instead of UTC, or drifting fast by a little at each reading) is never corroborated by
    another sensor, so it cannot make every other sensor look idle and have the fleet evicted at
    every micro-batch, nor can several that run ahead by different amounts (devices on the
    local times of different zones); nor can one glitched timestamp a year ahead corroborate a
    device that runs ahead by less (they are more than a TTL apart), and it is forgotten once
    the clock has gone on a TTL without hearing from that sensor again. A fleet resuming after
    an outage moves the clock as soon as two sensors are back. When the newest reading is more
    than a TTL ahead and nothing moves the clock (a fleet of one, or the last live sensor of a
    fleet whose others all fell silent), the clock moves to that reading once it has gone on a
    further TTL, and from then on goes along with it (in steps of less than a TTL) until
    sensors agree again: the silent ones are evicted one TTL late.

    Live, the clock never runs ahead of the worker's own (``limit``): a gateway stamping many
    sensor ids with its clock, glitched a year ahead for one reading, is corroborated by its own
    ids, and without the limit would have moved the clock a year and had every other sensor
    evicted as idle at every micro-batch. Readings dated ahead of the worker (producers on local
    time) only make eviction late by as much, never early. A replay of the past is unaffected.

    Not covered: two devices (or one gateway's ids) that run ahead at the same time, by about as
    much, to a time still before the worker's own: in a replay of the past, or live while the
    worker reads a backlog more than a TTL behind real time (after an outage), where the limit
    is too far ahead to hold the clock near the fleet's.
    """

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.time = -np.inf
        # Where a lone jump was first held back; -inf: none; +inf: the clock follows it.
        self.held = -np.inf
        # The LEADERS newest sensors, newest first: (their newest time, id, the clock's time
        # when they last read).
        self.leaders: list[tuple[float, str, float]] = []

    def advance(self, sensor_ids: Sequence[str], rows: np.ndarray, ts: np.ndarray,
                limit: float = np.inf) -> float:
        """Move the clock with readings at ``ts`` of ``sensor_ids[rows]``, to at most
        ``limit`` (the worker's wall clock); the new time."""
        newest = float(ts.max())
        now, ttl = self.time, self.ttl
        kept = [lead for lead in self.leaders if not (lead[0] - now > ttl and now - lead[2] >= ttl)]
        # Readings more than a TTL past the clock (or, before it has a time, past this batch's
        # median) are ahead of the fleet: its newest within that are looked for as well.
        plausible = (now if np.isfinite(now) else float(np.median(ts))) + ttl
        merged = sorted([*((t, sensor, now)
                           for t, sensor in _newest_sensors(sensor_ids, rows, ts, plausible)),
                         *kept], key=lambda lead: -lead[0])
        found: dict[str, tuple[float, str, float]] = {}
        for lead in merged:
            found.setdefault(lead[1], lead)
        ordered = list(found.values())
        agreed = _agreed([lead[0] for lead in ordered], ttl)
        # The newest sensors on each side of the agreed time: those ahead of it wait to be
        # corroborated, those at or behind it find the next agreement. Kept apart, sensors
        # ahead by different amounts (devices on different local times) cannot crowd the
        # fleet out of the list and leave the clock to follow one of them.
        self.leaders = ([lead for lead in ordered if lead[0] > agreed][:LEADERS]
                        + [lead for lead in ordered if lead[0] <= agreed][:LEADERS])
        clock = max(now, agreed)
        if clock > now:  # sensors agree on a newer time
            self.held = -np.inf
        elif self.held == np.inf and newest - clock <= ttl:  # along with a lone sensor
            clock = max(clock, newest)
        elif newest - clock > ttl:  # a lone jump: held back until it goes on a TTL
            if not np.isfinite(self.held):
                self.held = newest
            elif newest - self.held >= ttl:
                clock, self.held = newest, np.inf  # and followed from now on
        # Never past the limit, even when it was already (a snapshot taken after such a jump,
        # before the limit existed): a wall clock stepped back by seconds moves it back as much.
        self.time = clock = min(max(now, clock), limit)
        return clock

    def to_plain(self) -> dict:
        return {"event_time": float(self.time), "clock_held": float(self.held),
                "clock_leaders": [list(lead) for lead in self.leaders]}

    def load_plain(self, plain: dict, last_seen: Callable[[], dict[str, float]]) -> None:
        """Restore from ``to_plain``; snapshots from before the leaders were kept take them
        from ``last_seen()`` (each known sensor's newest reading time)."""
        self.time = float(plain["event_time"])
        self.held = float(plain.get("clock_held", -np.inf))
        if "clock_leaders" in plain:
            self.leaders = [(float(t), str(sensor), float(seen))
                            for t, sensor, seen in plain["clock_leaders"]]
        else:
            newest = sorted(last_seen().items(), key=lambda item: -item[1])[:LEADERS]
            self.leaders = [(float(t), sensor, self.time) for sensor, t in newest]


def _agreed(times: list[float], ttl: float) -> float:
    """The newest of ``times`` (newest first) that QUORUM of them within a TTL have reached."""
    for k in range(len(times) - QUORUM + 1):
        if times[k] - times[k + QUORUM - 1] <= ttl:
            return times[k + QUORUM - 1]
    return -np.inf


def _newest_sensors(sensor_ids: Sequence[str], rows: np.ndarray, ts: np.ndarray,
                    plausible: float) -> list[tuple[float, str]]:
    """This micro-batch's LEADERS newest distinct sensors (their newest time, id), newest
    first, and with them its LEADERS newest at or before ``plausible``: read off its few
    newest readings, or, when those are all of fewer sensors (a few sensors far ahead of the
    others here, several readings each), off all of them, newest first."""
    few = min(len(ts), 4 * LEADERS)
    top = np.argpartition(-ts, few - 1)[:few]
    found = _distinct(sensor_ids, rows, ts, top[np.argsort(-ts[top], kind="stable")], plausible)
    if found is None:  # the usual case ends above: the newest readings are of enough sensors
        found = _distinct(sensor_ids, rows, ts, np.argsort(-ts, kind="stable"), plausible,
                          complete=True)
    return sorted(((t, sensor) for sensor, t in found.items()), key=lambda pair: -pair[0])


def _distinct(sensor_ids: Sequence[str], rows: np.ndarray, ts: np.ndarray, order: np.ndarray,
              plausible: float, complete: bool = False) -> dict[str, float] | None:
    """The first LEADERS distinct sensors of readings ``order`` (newest first) and the first
    LEADERS at or before ``plausible``, with their newest times; None where ``order`` ends
    before both are found, unless it is ``complete`` (every reading)."""
    found: dict[str, float] = {}
    newest = behind = 0
    for i in order.tolist():
        sensor = sensor_ids[rows[i]]
        if sensor in found:
            continue
        t = float(ts[i])
        if newest < LEADERS or (t <= plausible and behind < LEADERS):
            found[sensor] = t
            newest += 1
            behind += t <= plausible
        if newest >= LEADERS and behind >= LEADERS:
            return found
    return found if complete else None
