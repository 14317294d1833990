"""What the fleet benchmarks share: where the shared fleets are, and their command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from streamer.core import Batch
from streamer.tools.cli import sample_dataset
from streamer.tools.readings_csv import read_csv

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
FLEETS = ("appliances", "parking", "hourly", "daily")


def fleet_arguments(doc: str) -> argparse.Namespace:
    """``--data``, ``--fleets``, ``--runs`` (cost runs per variant) and ``--quick`` (the bundled
    sample fleet, one cost run each)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED.resolve())
    parser.add_argument("--fleets", default=",".join(FLEETS))
    parser.add_argument("--runs", type=int, default=3, help="cost runs per variant")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the bundled sample fleet, one cost run each")
    args = parser.parse_args()
    if args.quick:
        args.fleets, args.runs = "sample", 1
    return args


def read_fleet(name: str, data: Path) -> Batch:
    """A shared fleet by name, or the bundled sample for ``sample``."""
    return read_csv(sample_dataset() if name == "sample" else data / f"{name}.csv.gz")
