"""Small synthetic streams for the core tests."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.core import Batch, LearnerConfig


def sine_fleet(n_sensors: int, n_steps: int, seed: int = 0, dt: float = 600.0,
               n_features: int = 1, noise: tuple[float, float] = (0.01, 0.1),
               log10_scale: tuple[float, float] = (-3, 6)) -> Batch:
    """Round-robin readings of sensors with different periods, phases, noise and scales.

    Tests of forecast equality use unit scales: the model computes in float32, so at 1e6 an
    equal forecast is equal to ~0.1 in sensor units.
    """
    rng = np.random.default_rng(seed)
    period = rng.uniform(12, 96, n_sensors)
    phase = rng.uniform(0, 2 * np.pi, n_sensors)
    scale = 10.0 ** rng.uniform(*log10_scale, n_sensors)
    offset = scale * rng.uniform(-5, 5, n_sensors)
    noise = rng.uniform(*noise, n_sensors)
    t = np.arange(n_steps)[:, None]  # (T, 1)
    base = np.sin(2 * np.pi * t / period + phase)  # (T, N)
    values = offset + scale * (base + noise * rng.standard_normal((n_steps, n_sensors)))
    if n_features > 1:
        values = np.stack([values * (j + 1) for j in range(n_features)], axis=-1)
    else:
        values = values[..., None]
    ids = [f"s{i}" for i in range(n_sensors)] * n_steps
    ts = 1.7e9 + dt * np.repeat(np.arange(n_steps), n_sensors)
    return Batch.from_arrays(ids, ts, values.reshape(n_steps * n_sensors, n_features))


def chunks(batch: Batch, size: int) -> list[Batch]:
    return [batch.take(np.arange(i, min(i + size, len(batch)))) for i in range(0, len(batch), size)]


@pytest.fixture
def small_config() -> LearnerConfig:
    return LearnerConfig(hidden_size=8, tbptt_steps=4, train_every=10, min_update_windows=1,
                         initial_capacity=4, max_sensors=64, warmup_readings=2, device="cpu")


def daytime_fleet(n_sensors: int = 6, days: int = 40, seed: int = 3) -> Batch:
    """Sensors read every 30 minutes from 08:00 to 16:30 UTC only (a car park, a shop): an
    AR(1) at 0.98 a half hour that goes on unseen at night."""
    rng = np.random.default_rng(seed)
    steps = days * 48
    t = 1.7e9 - (1.7e9 % 86400) + 1800.0 * np.arange(steps)
    hour = (t % 86400) / 3600
    seen = (hour >= 8) & (hour <= 16.5)
    ids, ts, values = [], [], []
    for s in range(n_sensors):
        e = rng.normal(size=steps)
        x = np.zeros(steps)
        for i in range(1, steps):
            x[i] = 0.98 * x[i - 1] + e[i]
        ids += [f"p{s}"] * int(seen.sum())
        ts.append(t[seen])
        values.append(100 + 5 * x[seen])
    ts_all = np.concatenate(ts)
    order = np.argsort(ts_all, kind="stable")
    return Batch.from_arrays(list(np.asarray(ids)[order]), ts_all[order],
                             np.concatenate(values)[order])
