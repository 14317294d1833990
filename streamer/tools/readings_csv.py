"""Reading sensor CSV files (`sensor_id,ts,value[,value...]`) into batches; ``ts`` is read by
the input topic's rule (streamer.serving.codec), so a row means what the same record would."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from streamer.core.batch import Batch
from streamer.core.normalizer import MAX_ABS_TS, within_range
from streamer.serving.codec import timestamp_from_text


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a CSV, transparently gunzipping ``.gz`` files; a UTF-8 byte-order mark (what
    spreadsheets write for "CSV UTF-8") is skipped."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _parse_value(text: str) -> float:
    """A value cell as a number; nan (a rejected reading) where it is none. Python's float()
    also reads digit groups (``1_000``), which no JSON reading on the input topic can carry:
    they are refused too, not read as 1000."""
    if not text or "_" in text:
        return float("nan")
    try:
        return float(text)
    except ValueError:
        return float("nan")


def read_csv(path: str | Path, limit: int | None = None) -> Batch:
    """The whole file as one batch, in file order. Extra value columns are extra features; a
    row with more or fewer value cells than the header is kept with its count, and the learner
    rejects it (WRONG_FEATURE_COUNT) as it does a Kafka message of the wrong length."""
    with open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or len(header) < 3 or [h.strip() for h in header[:2]] != ["sensor_id",
                                                                                    "ts"]:
            raise ValueError(f"{path}: expected a header 'sensor_id,ts,value', got {header!r}")
        width = len(header) - 2
        ids: list[str] = []
        ts: list[float] = []
        values: list[list[float]] = []
        counts: list[int] = []
        for row in reader:
            if limit is not None and len(ids) >= limit:
                break
            if not row:
                continue
            ids.append(row[0])
            # As the worker reads the same reading's ts; nan (rejected) where it would refuse it.
            ts.append(timestamp_from_text(row[1]) if len(row) > 1 else float("nan"))
            cells = row[2 : 2 + width] + [""] * (width - len(row[2:]))
            values.append([_parse_value(c) for c in cells])
            while len(row) > width + 2 and not row[-1].strip():
                row = row[:-1]  # a trailing separator (``a,1,2,``) is not another value
            counts.append(max(len(row) - 2, 0))
    return Batch(ids, np.array(ts, dtype=np.float64),
                 np.array(values, dtype=np.float64).reshape(len(ids), width),
                 np.array(counts, dtype=np.int64))


def well_formed(batch: Batch) -> tuple[Batch, int]:
    """The readings whose rows had as many values as the header, each a number, and a
    timestamp that could be read, all within what the worker holds (MAX_ABS_TS,
    MAX_ABS_VALUE), and how many did not: what a producer skips rather than send a row cut or
    padded to a width the file did not give, a NaN that is not JSON, or a reading the worker
    would refuse. One epoch-milliseconds typo (ts 1e12) was sent, refused, and moved every other
    row of a looped file (``produce --loop``, the demo's ``--file``) a first round's shift of
    -1e12 s back, so that every reading of every round was refused too."""
    good = (batch.n_values == batch.values.shape[1]) & within_range(batch.ts, batch.values)
    return batch.take(np.flatnonzero(good)), int(len(batch) - good.sum())


def timestamps_refused(batch: Batch) -> str:
    """What is wrong with the timestamps the worker would refuse, in one sentence, or "" where
    none is: how many could not be read (a local time without a zone, a date that is not RFC
    3339) and how many are beyond MAX_ABS_TS (epoch milliseconds or microseconds), and the
    rule. Every row of such a file was refused, the replay's report saying only nan."""
    unreadable = int(np.isnan(batch.ts).sum())
    beyond = int((np.abs(batch.ts) > MAX_ABS_TS).sum())  # (inf too; nan is neither)
    said = []
    if unreadable:
        said.append(f"{unreadable:,} could not be read (a local time without a zone?)")
    if beyond:
        said.append(f"{beyond:,} {'is' if beyond == 1 else 'are'} beyond +-{MAX_ABS_TS:g} s "
                    "(epoch milliseconds?)")
    if not said:
        return ""
    return (f"of {len(batch):,} timestamps, {' and '.join(said)}: a timestamp is epoch seconds "
            "or RFC 3339 with a time zone (2024-01-01T00:00:00Z), as the worker reads it")


def iter_chunks(batch: Batch, size: int) -> Iterator[Batch]:
    """Consecutive micro-batches of at most ``size`` readings."""
    for start in range(0, len(batch), size):
        yield batch.take(np.arange(start, min(start + size, len(batch))))
