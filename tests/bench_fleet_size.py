"""Replay throughput against fleet size (a print-out, not a test): python -m tests.bench_fleet_size

The same number of readings (``--readings``, 400k) from fleets of 10 to 10,000 sensors
(``tests/bench_core.Fleet``: a sine plus noise per sensor, own scale, period and phase; round
robin, one reading per sensor per 10 minutes), replayed by ``streamer.tools.replay.replay`` with the
default ``LearnerConfig`` on the CPU, one torch thread, micro-batches of 2048. Each fleet is
replayed ``--runs`` times (2); readings/s is the best run (the forecasts are identical each
time). The issue's target: a fleet of 10 sensors replays as fast per reading as one of 10,000.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import numpy as np
import torch

from streamer.core import Batch, LearnerConfig
from streamer.tools.replay import replay
from tests.bench_core import Fleet


def fleet_batch(n_sensors: int, n_readings: int) -> Batch:
    """``n_readings`` readings of ``n_sensors`` sensors, round robin, in time order."""
    fleet = Fleet(n_sensors)
    rounds = -(-n_readings // n_sensors)
    everyone = np.arange(n_sensors)
    ts, values = zip(*(fleet.round(r, everyone) for r in range(rounds)))
    ids = fleet.ids * rounds
    return Batch.from_arrays(ids[:n_readings], np.concatenate(ts)[:n_readings],
                             np.concatenate(values)[:n_readings])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,10000", help="fleet sizes")
    parser.add_argument("--readings", type=int, default=400_000, help="readings per fleet")
    parser.add_argument("--runs", type=int, default=2, help="replays per fleet (best counts)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    now = datetime.datetime.now().astimezone()
    print(f"# Replay throughput by fleet size, {now:%Y-%m-%d %H:%M %Z}; Python "
          f"{platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"1-min load average {os.getloadavg()[0]:.2f}\n")
    print("| sensors | readings | updates | relMAE | readings/s (best) | all runs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in [int(s) for s in args.sizes.split(",")]:
        batch = fleet_batch(size, args.readings)
        config = LearnerConfig(device="cpu", max_sensors=max(size, 1024))
        reports = [replay(batch, config)[2] for _ in range(args.runs)]
        rates = [r.readings_per_second for r in reports]
        print(f"| {size:,} | {len(batch):,} | {reports[0].updates:,} | {reports[0].rel_mae:.4f} "
              f"| {max(rates):,.0f} | {' / '.join(f'{r:,.0f}' for r in rates)} |", flush=True)
    print(f"\n1-min load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
