"""Forecasts after a level shift (a print-out, not a test): python -m tests.bench_level_shift

A counter reset, a recalibration or a replaced sensor moves a sensor's readings by a constant
in one step. On each shared fleet (../shared/datasets), four sensors spread over the fleet
(every quarter of its sensors, in order of first appearance) are read ``--offset`` (5e6) higher
than they were until the middle of their readings, then as they were: one replay per shifted
sensor, each against one replay of the fleet as it is (the baseline, same script, same config).
For the readings after the shift (the forecast made at the first of them, onwards), each
window's relMAE is the forecast's MAE over persistence's MAE on the same readings (persistence
is the same in both runs past the first reading). A learner that handles the shift gives the
shifted sensor the relMAE of the unshifted one; before the change scale stopped following the
level's spread and every expert was kept within reach (docs/benchmarks/quality.md), the
shifted ones were 40-2,000x persistence's error.

``--fleets`` picks fleets (``sample`` is the bundled one); ``--offset`` the shift.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from streamer.core import Batch, LearnerConfig
from streamer.tools.replay import replay
from tests.bench_fleets import read_fleet
from tests.bench_quality import SHARED

WINDOWS = ((0, 50), (50, 200), (200, 1000), (1000, 3000), (3000, None))


def shifted_sensors(batch: Batch, n: int = 4) -> list[str]:
    """``n`` sensors spread over the fleet, in order of first appearance."""
    ids = list(dict.fromkeys(batch.sensor_ids))
    return ids[:: max(1, len(ids) // n)][:n]


def window_rel_mae(forecasts: np.ndarray, values: np.ndarray, truth: np.ndarray,
                   rows: np.ndarray) -> list[float]:
    """relMAE per window of the forecasts made at ``rows`` (a sensor's readings from the shift
    on) against its next reading; ``truth`` is the series as it was (persistence's errors)."""
    made, met = rows[:-1], rows[1:]
    error = np.abs(forecasts[made, 0] - values[met, 0])
    naive = np.abs(truth[made, 0] - truth[met, 0])
    out = []
    for lo, hi in WINDOWS:
        part = slice(lo, hi)
        out.append(float(error[part].sum() / naive[part].sum()) if len(error[part]) else np.nan)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED.resolve(),
                        help="the folder of the shared fleets")
    parser.add_argument("--fleets", nargs="+", default=["appliances", "parking", "hourly", "daily"])
    parser.add_argument("--offset", type=float, default=5e6,
                        help="how much higher each shifted sensor reads before its shift")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = LearnerConfig(device="cpu")
    heads = " | ".join(f"{lo}-{hi or 'end'}" for lo, hi in WINDOWS)
    print(f"# Forecast relMAE after a shift of {args.offset:g}, per window of readings after it\n")
    print(f"| fleet | sensor | run | {heads} |")
    print("| --- | --- | --- |" + " ---: |" * len(WINDOWS))
    for name in args.fleets:
        batch = read_fleet(name, args.data)
        ids = np.asarray(batch.sensor_ids)
        baseline, _, _ = replay(batch, config)
        for sensor in shifted_sensors(batch):
            rows = np.flatnonzero(ids == sensor)
            middle = rows[len(rows) // 2]
            values = batch.values.copy()
            values[rows[rows < middle]] += args.offset
            forecasts, _, _ = replay(Batch.from_arrays(list(batch.sensor_ids), batch.ts, values),
                                     config)
            after = rows[rows >= middle]
            for run, f, v in (("as it is", baseline, batch.values), ("shifted", forecasts, values)):
                cells = " | ".join(f"{x:.3f}" for x in window_rel_mae(f, v, batch.values, after))
                print(f"| {name} | {sensor} | {run} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
