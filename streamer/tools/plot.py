"""`streamer replay --plot`: forecast, interval and flagged readings against actual for a few
sensors, and rolling skill."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streamer.core import Batch
from streamer.tools.replay import ReplayOutputs, ReplayReport

FIGURE_SIZE = (12.0, 9.0)  # inches
DPI = 100  # -> 1200 x 900 pixels


def plot_replay(path: str | Path, readings: Batch, outputs: ReplayOutputs, report: ReplayReport,
                sensors: Sequence[str] = (), n_worst: int = 3, window: int = 2000) -> None:
    """Write a PNG: one panel per chosen (or worst) sensor, then skill over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # matplotlib is the optional `plot` extra
        raise RuntimeError("--plot needs matplotlib: pip install 'streamer[plot]'") from exc
    chosen = list(sensors) or [s.sensor_id for s in report.worst(n_worst)]
    scores = {s.sensor_id: s for s in report.sensors}
    ids = np.asarray(readings.sensor_ids, dtype=object)
    fig, axes = plt.subplots(len(chosen) + 1, 1, figsize=FIGURE_SIZE, dpi=DPI, squeeze=False)
    for ax, name in zip(axes[:-1, 0], chosen):
        rows = np.flatnonzero((ids == name) & (outputs.status == 0))[-500:]  # the last 500
        when = readings.ts[rows].astype("datetime64[s]")
        actual = readings.values[rows, 0]
        # The forecast made at reading i, and its interval, are for reading i+1: draw them there.
        ax.fill_between(when[1:], outputs.lower[rows[:-1], 0], outputs.upper[rows[:-1], 0],
                        color="tab:orange", alpha=0.25, lw=0, label="interval")
        ax.plot(when, actual, label="actual", lw=1.0)
        ax.plot(when[1:], outputs.forecasts[rows[:-1], 0], label="forecast", lw=1.0, alpha=0.8)
        flagged = outputs.anomaly[rows]
        ax.scatter(when[flagged], actual[flagged], color="red", s=20, zorder=3,
                   label="anomaly")
        s = scores.get(name)
        ax.set_title(f"{name} (relMAE {s.rel_mae:.3f}, coverage {s.coverage:.3f}, "
                     f"{s.anomalies} flagged)" if s else name, fontsize=9)
        ax.legend(loc="upper right", fontsize=7)
    ax = axes[-1, 0]
    skill_t, skill, used = rolling_skill(readings, outputs.forecasts, outputs.status, report,
                                         window)
    if used:
        ax.plot(skill_t.astype("datetime64[s]"), skill, lw=1.0,
                marker="." if len(skill) == 1 else None)  # one point draws no line
        ax.set_title(f"skill = 1 - MAE/persistence MAE, rolling over {used} forecasts",
                     fontsize=9)
    else:
        ax.set_title("skill: no forecast has met its sensor's next reading", fontsize=9)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def rolling_skill(readings: Batch, forecasts: np.ndarray, status: np.ndarray,
                  report: ReplayReport, window: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Skill over time from scale-free errors (each divided by its sensor's persistence MAE):
    times, skills and the window used, at most half the scored pairs so that the line covers at
    least the second half of the replay (0, and no points, when there are none)."""
    ids = np.asarray(readings.sensor_ids, dtype=object)
    ok = np.flatnonzero(status == 0)
    order = ok[np.argsort(ids[ok], kind="stable")]
    same = ids[order][1:] == ids[order][:-1]
    cur, nxt = order[:-1][same], order[1:][same]
    model = np.abs(readings.values[nxt] - forecasts[cur]).mean(axis=1)
    naive = np.abs(readings.values[nxt] - readings.values[cur]).mean(axis=1)
    unit = {s.sensor_id: s.persistence_mae for s in report.sensors}
    per = np.array([unit.get(name, np.nan) for name in ids[cur]], dtype=np.float64)
    per = np.where(per > 0, per, np.nan)
    model, naive = np.nan_to_num(model / per), np.nan_to_num(naive / per)
    by_time = np.argsort(nxt, kind="stable")
    model, naive, t = model[by_time], naive[by_time], readings.ts[nxt[by_time]]
    if not len(model):
        return t, model, 0
    kernel = np.ones(min(window, max(len(model) // 2, 1)))
    m = np.convolve(model, kernel, mode="valid")
    n = np.convolve(naive, kernel, mode="valid")
    skill = 1.0 - m / np.where(n > 0, n, np.nan)
    return t[len(kernel) - 1 :], skill, len(kernel)
