"""A synthetic sensor fleet for robustness checks and benchmarks of the online forecaster.

The fleet mixes what real deployments throw at a learner: 15-minute and daily rates, daily and
weekly cycles, scales from 1e-3 to 1e6, random gaps (half the readings missing for some
sensors), a flat (stuck) stretch, a few sentinel spikes (-9999), an on/off spiky load, random
walks (where persistence is hard to beat) and piecewise-linear interpolated series. Sensors join
at different times, like a fleet that grows. Deterministic for a given seed.

    ids, ts, values = make_fleet(seed=0)  # rows sorted by (ts, sensor_id), like the CSV files
"""

from __future__ import annotations

import numpy as np

DAY = 86_400.0
WEEK = 7 * DAY
START = 1_600_000_000.0  # 2020-09-13 12:26:40 UTC; the fleet ends days_daily days later
SENTINEL = -9999.0


def _cycles(ts: np.ndarray, rng: np.random.Generator, daily: float, weekly: float) -> np.ndarray:
    """Daily and weekly shapes with a random phase plus a weekday/weekend step."""
    day = 2 * np.pi * (ts % DAY) / DAY
    dow = ((ts / DAY + 3.0) % 7.0).astype(int)  # Monday = 0
    phase = rng.uniform(0, 2 * np.pi)
    d = daily * (np.sin(day + phase) + 0.3 * np.sin(2 * day + 2 * phase))
    w = weekly * (np.where(dow >= 5, -1.0, 0.4) + 0.2 * np.sin(2 * np.pi * dow / 7))
    return d + w


def _ar1(n: int, rng: np.random.Generator, phi: float, sigma: float) -> np.ndarray:
    """AR(1) noise, vectorized through a linear filter (no Python loop over readings)."""
    e = rng.normal(0, sigma, n)
    # x_t = phi x_{t-1} + e_t; for |phi| < 1 an exponential kernel of 400 taps is exact enough.
    k = phi ** np.arange(min(n, 400))
    return np.convolve(e, k)[:n]


def _sensor(kind: str, ts: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """(N,) values of one sensor of ``kind`` at ``ts``, in units of ``scale``."""
    n = len(ts)
    if kind == "cyclic":  # daily + weekly cycle, smooth AR noise: the LSTM should win
        x = _cycles(ts, rng, 1.0, 0.5) + _ar1(n, rng, 0.95, 0.05) + rng.normal(0, 0.02, n)
    elif kind == "weekly":  # strong weekly seasonality, weak daily (daily-rate sensors)
        x = _cycles(ts, rng, 0.1, 1.5) + _ar1(n, rng, 0.9, 0.15)
    elif kind == "random_walk":  # persistence is optimal: the model must not lose to it
        x = np.cumsum(rng.normal(0, 0.05, n))
    elif kind == "onoff":  # mostly 0, bursts of a few levels (like `lights`)
        on = (_ar1(n, rng, 0.97, 0.25) > 1.0) & (rng.random(n) < 0.9)
        x = np.where(on, np.round(rng.uniform(1, 4, n)), 0.0)
    elif kind == "hourly_interp":  # hourly data linearly interpolated (like the outdoor ones)
        hours = np.arange(np.floor(ts[0] / 3600), np.ceil(ts[-1] / 3600) + 2) * 3600
        hourly = _cycles(hours, rng, 1.0, 0.2) + np.cumsum(rng.normal(0, 0.08, len(hours)))
        x = np.interp(ts, hours, hourly)
    elif kind == "trend_noise":  # slow trend + white noise: heavy shrinkage toward the mean
        x = np.linspace(0, 2, n) + rng.normal(0, 0.3, n) + 0.5 * _cycles(ts, rng, 1.0, 0.0)
    else:
        raise ValueError(kind)
    offset = rng.uniform(-2, 5)
    return (x + offset) * scale


def _in_file_order(ids: list[str], tss: list[np.ndarray],
                   vals: list[np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Concatenate per-sensor series and sort rows by (ts, sensor_id), like the CSV files."""
    ts_all, v_all = np.concatenate(tss), np.concatenate(vals)
    ids_arr = np.array(ids)
    order = np.lexsort((ids_arr, ts_all))
    return ids_arr[order].tolist(), ts_all[order], v_all[order]


def make_fleet(
    seed: int = 0, days_fast: int = 90, days_daily: int = 3 * 365
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, ts, values): rows sorted by (ts, sensor_id); a missing reading is simply absent."""
    rng = np.random.default_rng(seed)
    end = np.floor(START / DAY) * DAY + days_daily * DAY
    fast_start = end - days_fast * DAY
    scales = [1e-3, 1e-1, 1.0, 10.0, 1e3, 1e6]
    # (name, kind, period seconds, share of readings kept, extras)
    plan = []
    fast_kinds = ["cyclic", "cyclic", "random_walk", "onoff", "hourly_interp", "trend_noise"]
    for i, kind in enumerate(fast_kinds * 3):
        keep = 0.5 if i % 3 == 1 else 1.0  # a third of the fast sensors miss half their readings
        plan.append((f"q{i:02d}_{kind}", kind, 900.0, keep, i))
    daily_kinds = ["weekly", "weekly", "weekly", "random_walk", "trend_noise", "cyclic"]
    for i, kind in enumerate(daily_kinds):
        keep = 0.5 if i == 1 else 1.0
        plan.append((f"d{i:02d}_{kind}", kind, DAY, keep, i))

    ids, tss, vals = [], [], []
    for name, kind, period, keep, i in plan:
        start = fast_start if period < DAY else end - days_daily * DAY
        start += period * rng.integers(0, 50)  # sensors join at different times
        ts = np.arange(start, end, period)
        if keep < 1.0:
            ts = ts[rng.random(len(ts)) < keep]
        v = _sensor(kind, ts, rng, scales[i % len(scales)])
        if name.startswith("q01") or name.startswith("d00"):  # a stuck stretch: 10% flat
            a = len(v) // 3
            v[a : a + len(v) // 10] = v[a]
        if name.startswith("q00") or name.startswith("q08") or name.startswith("d02"):
            hits = rng.choice(len(v) - 1, size=3, replace=False)  # a few sentinel values
            v[hits] = SENTINEL
        ids += [name] * len(ts)
        tss.append(ts)
        vals.append(v)
    return _in_file_order(ids, tss, vals)


def seasonal_fleet(seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Daily and weekly cycles only (plus gaps and flat stretches): where a learner must win.

    12 sensors every 15 minutes for 60 days and 4 daily sensors for 3 years, scales 1e-3 to
    1e6; every third sensor misses half its readings; two have a stuck stretch of 10%.
    """
    rng = np.random.default_rng(seed)
    scales = [1e-3, 1e-1, 1.0, 10.0, 1e3, 1e6]
    ids: list[str] = []
    tss, vals = [], []
    for i in range(16):
        daily = i >= 12
        period, n = (DAY, 3 * 365) if daily else (900.0, 60 * 96)
        ts = START + period * (np.arange(n) + rng.integers(0, 50))
        if i % 3 == 1:
            ts = ts[rng.random(n) < 0.5]
        v = _sensor("weekly" if daily else "cyclic", ts, rng, scales[i % len(scales)])
        if i in (2, 13):
            a = len(v) // 3
            v[a : a + len(v) // 10] = v[a]
        ids += [f"x{i:02d}"] * len(ts)
        tss.append(ts)
        vals.append(v)
    return _in_file_order(ids, tss, vals)


def weekday_fleet(seed: int = 0, n_sensors: int = 20,
                  days: int = 2 * 365) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Daily counts dominated by a weekday/weekend cycle (ridership-like), no gaps.

    Each sensor has its own weekday profile (busy weekdays, quiet weekends, its own shape), a
    slow random-walk level, multiplicative noise, and its reading at its own time of day.
    """
    rng = np.random.default_rng(seed)
    ids: list[str] = []
    tss, vals = [], []
    start = np.floor(START / DAY) * DAY
    for i in range(n_sensors):
        ts = start + DAY * np.arange(days) + rng.uniform(0, DAY)
        dow = ((ts / DAY + 3.0) % 7.0).astype(int)  # Monday = 0
        profile = np.r_[rng.uniform(0.9, 1.1, 5), rng.uniform(0.2, 0.5, 2)]
        level = 1000.0 * 10 ** rng.uniform(-1, 1) * np.exp(np.cumsum(rng.normal(0, 0.01, days)))
        v = level * profile[dow] * (1 + rng.normal(0, 0.04, days))
        ids += [f"w{i:02d}"] * days
        tss.append(ts)
        vals.append(v)
    return _in_file_order(ids, tss, vals)


if __name__ == "__main__":
    ids, ts, values = make_fleet()
    print(f"{len(ids):,} readings, {len(set(ids))} sensors")
