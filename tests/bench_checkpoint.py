"""What checkpoints cost the serving loop (a print-out, not a test).

    python -m tests.bench_checkpoint [--sensors 1000,10000,100000] [--seconds 30]
                                     [--live-sensors 100000] [--live-rate 4000]

**Core** (per fleet size, no broker): the worker's learner steps micro-batches of
``max_poll_records`` readings (round robin over the sensors, default settings, one torch thread)
for ``--seconds`` in each of three modes, in turn:

* **none**: no checkpoint;
* **async** (what the worker does): every 10 s the serving thread copies the learner into the
  previous checkpoint's buffers (``CheckpointWriter.begin``) and a background thread serializes,
  hashes, writes and fsyncs it;
* **sync** (the baseline, what the worker did before): every 10 s a fresh snapshot and
  ``CheckpointStore.save`` on the serving thread.

It prints readings/s against none (wall clock: on a shared VM whose speed drifts by tens of
percent within minutes, so also the CPU time per reading of the serving thread, which steal
time does not inflate, and of all threads, the background writer included), the serving
thread's stall per checkpoint (async: the copy; sync: snapshot + save; the first one apart:
async copies into fresh memory only then), the slowest micro-batch (a stall plus any
contention with the background write), and checkpoint bytes per sensor.

**Live** (``--live-sensors``, 0 to skip): the real ``Worker`` on a local broker, its table
filled with N sensors, then live readings at ``--live-rate``/s for ``--live-seconds`` (the
same producer and reader as tests/bench_e2e.py); reading-to-forecast latency percentiles with
checkpoints every 10 s against checkpoints off, in one run, and this process's resident memory
before and after the live phase (``--live-seconds 900`` for the 15-minute memory check).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from streamer.config import load_settings
from streamer.core import Batch, Learner
from streamer.serving.checkpoint import CheckpointStore
from streamer.serving.checkpoint_writer import CheckpointWriter

INTERVAL_S = 10.0
MODES = ("none", "async", "sync")


@dataclass
class Run:
    readings: int = 0
    seconds: float = 0.0
    serving_cpu: float = 0.0  # CPU seconds of the serving thread (this one)
    process_cpu: float = 0.0  # CPU seconds of every thread (the background writer included)
    stalls_ms: list[float] = field(default_factory=list)  # serving thread, per checkpoint
    writes_ms: list[float] = field(default_factory=list)  # background (async) or inline (sync)
    slowest_batch_ms: float = 0.0
    size_bytes: int = 0

    @property
    def rate(self) -> float:
        return self.readings / self.seconds


class Stream:
    """Round-robin readings over n sensors, a minute apart per sensor."""

    def __init__(self, n_sensors: int, batch: int):
        self.ids = np.array([f"sensor-{i:06d}" for i in range(n_sensors)], dtype=object)
        self.batch, self.position = batch, 0
        self.rng = np.random.default_rng(0)

    def next(self) -> Batch:
        index = np.arange(self.position, self.position + self.batch)
        self.position += self.batch
        n = len(self.ids)
        ts = 1.7e9 + 60.0 * (index // n)
        values = 20.0 + 5.0 * np.sin(index / n / 50.0 + index % n)[:, None]
        values += self.rng.normal(0.0, 0.5, size=values.shape)
        return Batch.from_arrays(list(self.ids[index % n]), ts, values)


def serve(learner: Learner, stream: Stream, mode: str, seconds: float,
          writer: CheckpointWriter) -> Run:
    """Serve for ``seconds``; ``writer`` lives as long as a worker's (its buffers reused)."""
    store = writer.store
    run = Run()
    cpu, all_cpu = time.thread_time(), time.process_time()
    started = last = time.perf_counter()
    while (now := time.perf_counter()) - started < seconds:
        batch = stream.next()
        learner.step(batch)
        run.readings += len(batch)
        run.slowest_batch_ms = max(run.slowest_batch_ms, (time.perf_counter() - now) * 1e3)
        if writer.in_flight and (written := writer.finished()) is not None:
            run.writes_ms.append(written.saved.duration_seconds * 1e3)
            run.size_bytes = written.saved.size_bytes
        if mode == "none" or time.perf_counter() - last < INTERVAL_S or writer.in_flight:
            continue
        began = time.perf_counter()
        if mode == "async":
            writer.begin(learner, {("in", 0): run.readings}, {("in", 0): []})
        else:
            saved = store.save(learner.snapshot(), {("in", 0): run.readings}, {("in", 0): []})
            run.writes_ms.append(saved.duration_seconds * 1e3)
            run.size_bytes = saved.size_bytes
        last = time.perf_counter()
        run.stalls_ms.append((last - began) * 1e3)
        run.slowest_batch_ms = max(run.slowest_batch_ms, (last - now) * 1e3)
    run.seconds = time.perf_counter() - started
    run.serving_cpu = time.thread_time() - cpu
    if writer.in_flight:  # after the clock: a write still running is not the loop's time
        written = writer.finished(wait=True)
        run.writes_ms.append(written.saved.duration_seconds * 1e3)
        run.size_bytes = written.saved.size_bytes
    run.process_cpu = time.process_time() - all_cpu  # the last write's CPU counts too
    return run


def bench_core(n_sensors: int, seconds: float, rounds: int, directory: Path
               ) -> tuple[dict[str, Run], dict[str, list[float]]]:
    """Every mode's runs merged, and per round each mode's readings/s over none's in that
    round (neighbours in time: this machine's speed drifts by 20 % over minutes)."""
    settings = load_settings({"device": "cpu"})
    config = dataclasses.replace(settings.learner_config(),
                                 max_sensors=max(n_sensors, settings.sensors.max_sensors))
    learner = Learner(config)
    stream = Stream(n_sensors, settings.kafka.max_poll_records)
    while stream.position < 3 * n_sensors:  # every sensor in the table, a few readings in
        learner.step(stream.next())
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    writers = {mode: CheckpointWriter(CheckpointStore(directory / f"{n_sensors}-{mode}", "bench",
                                                      config.fingerprint(), keep=2))
               for mode in MODES}
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            runs[mode].append(serve(learner, stream, mode, seconds, writers[mode]))
            print(f"[{n_sensors} sensors] round {r + 1} {mode}: "
                  f"{runs[mode][-1].rate:,.0f} readings/s", flush=True)
    for writer in writers.values():
        writer.close()
    ratios = {mode: [run.rate / base.rate for run, base in zip(runs[mode], runs["none"])]
              for mode in MODES}
    return {mode: _merged(found) for mode, found in runs.items()}, ratios


def _merged(runs: list[Run]) -> Run:
    merged = Run()
    for run in runs:
        merged.readings += run.readings
        merged.seconds += run.seconds
        merged.serving_cpu += run.serving_cpu
        merged.process_cpu += run.process_cpu
        merged.stalls_ms += run.stalls_ms
        merged.writes_ms += run.writes_ms
        merged.slowest_batch_ms = max(merged.slowest_batch_ms, run.slowest_batch_ms)
        merged.size_bytes = run.size_bytes or merged.size_bytes
    return merged


def _stat(values: list[float], how=statistics.median) -> str:
    return f"{how(values):,.0f}" if values else "-"


def core_table(results: dict[int, tuple[dict[str, Run], dict[str, list[float]]]]) -> str:
    lines = ["| sensors | mode | readings/s | vs none (median of rounds; each) | serving-thread "
             "CPU us/reading (vs none) | all threads' CPU us/reading | checkpoints | stall ms "
             "first / median / max after | write ms median | slowest batch ms | bytes/sensor |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, (runs, ratios) in results.items():
        base_cpu = runs["none"].serving_cpu / runs["none"].readings
        for mode in MODES:
            run = runs[mode]
            each = ", ".join(f"{r - 1:+.0%}" for r in ratios[mode])
            versus = f"{statistics.median(ratios[mode]) - 1:+.1%} ({each})"
            first, later = run.stalls_ms[:1], run.stalls_ms[1:]
            stalls = f"{_stat(first)} / {_stat(later)} / {_stat(later, max)}"
            per_sensor = f"{run.size_bytes / n:,.0f}" if run.size_bytes else "-"
            serving = run.serving_cpu / run.readings
            cpu = (f"{serving * 1e6:.2f} ({serving / base_cpu - 1:+.1%}) | "
                   f"{run.process_cpu / run.readings * 1e6:.2f}")
            lines.append(f"| {n:,} | {mode} | {run.rate:,.0f} | {versus} | {cpu} | "
                         f"{len(run.stalls_ms)} | {stalls} | {_stat(run.writes_ms)} | "
                         f"{run.slowest_batch_ms:,.0f} | {per_sensor} |")
    return "\n".join(lines)


# -- live: the real worker on a local broker -------------------------------------------------
def bench_live(n_sensors: int, rate: float, seconds: float, directory: Path,
               baseline: bool = True) -> str:
    """The worker with checkpoints every 10 s, then (``baseline``) without, then the IO ceiling
    (bench_e2e's pass-through: the worker's Kafka client and settings, no model) under the same
    live load: latency the worker adds is what exceeds the ceiling's."""
    from streamer.kafka.admin import ensure_topics
    from streamer.kafka.broker import LocalBroker
    from tests import bench_e2e as e2e  # the broker, producer and reader of the e2e benchmark

    lines = ["| serving | sent/s | p50 ms | p90 ms | p99 ms | max ms | checkpoints taken | "
             "stall ms max | RSS MB before / after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    trend: list[str] = []
    with LocalBroker() as broker:
        modes = (("checkpoints every 10 s", "streamer", INTERVAL_S),
                 ("checkpoints off", "streamer", None), ("IO ceiling (no model)", "ceiling", None))
        for label, kind, interval in modes if baseline else modes[:1]:
            run = f"live-{kind}-{time.time_ns()}"
            topics = {"in": f"{run}-in", "out": f"{run}-out", "dlq": f"{run}-dlq",
                      "ceiling": f"{run}-ceiling"}
            ensure_topics(broker.bootstrap, {topics["in"]: e2e.PARTITIONS,
                                             topics["out"]: e2e.PARTITIONS,
                                             topics["ceiling"]: e2e.PARTITIONS, topics["dlq"]: 1})
            e2e.pre_produce(broker.bootstrap, topics["in"], n_sensors, 2)
            settings = e2e.streamer_settings(broker.bootstrap, topics, f"{run}-group",
                                             directory / run)
            settings = settings.model_copy(update={"checkpoint": settings.checkpoint.model_copy(
                update={"interval_seconds": interval})})
            cpu = e2e.CpuMeter(e2e.broker_pid(broker))
            with e2e.running(kind, settings, topics["ceiling"]) as serving:
                e2e.wait_for_count(serving.count, 0, 2 * n_sensors, 600.0, serving.alive)
                registry = serving.worker.registry if serving.worker else None
                if interval is not None:  # memory from the first full checkpoint on: its
                    _first_checkpoint(registry, interval)  # copy buffers are reused after
                before = _copies(registry)
                rss_before = _rss_mb()
                with _sampling(_rss_mb, 60.0) as rss_by_minute:
                    latency = e2e.live_phase(broker.bootstrap, topics["in"],
                                             topics["ceiling" if kind == "ceiling" else "out"],
                                             n_sensors, rate, seconds, 5.0, cpu)
                taken = _copies(registry) - before
                stall = _largest_bucket(registry) if registry else "-"
                rss = f"{rss_before:,.0f} / {_rss_mb():,.0f}"
            w = latency.worker_ms
            lines.append(f"| {label} | {latency.rate:,.0f} | {w['p50']:,.0f} | {w['p90']:,.0f} |"
                         f" {w['p99']:,.0f} | {w['max']:,.0f} | {taken:.0f} | {stall} | {rss} |")
            print(lines[-1], flush=True)
            if len(latency.by_minute) > 1:
                trend.append(_trend(label, latency, rss_by_minute))
    return "\n".join(lines + trend)


def _copies(registry) -> float:
    if registry is None:
        return 0.0
    return registry.get_sample_value("streamer_checkpoint_copy_seconds_count") or 0.0


def _first_checkpoint(registry, interval: float) -> None:
    """Wait until a checkpoint copied after this call is durable: one copied while the table
    was still growing holds smaller buffers, which the next copy replaces."""
    copies = _copies(registry)
    deadline = time.monotonic() + 10 * interval + 120.0
    while _copies(registry) == copies:
        if time.monotonic() > deadline:
            raise TimeoutError("no checkpoint was taken")
        time.sleep(0.2)
    copied_by = time.time()
    while (registry.get_sample_value("streamer_checkpoint_last_success_timestamp_seconds")
           or 0.0) < copied_by:
        if time.monotonic() > deadline:
            raise TimeoutError("no checkpoint was written")
        time.sleep(0.2)


@contextlib.contextmanager
def _sampling(measure: Callable[[], float], every_s: float) -> Iterator[list[float]]:
    """``measure()`` every ``every_s`` seconds in a thread while the block runs."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            samples.append(measure())

    thread = threading.Thread(target=sample, name="bench-sampler", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def _trend(label: str, latency, rss_by_minute: list[float]) -> str:
    """Latency per minute of sending and this process's resident memory at each minute's end:
    a queue building up or memory growing shows here, not in the whole run's percentiles."""
    rows = [f"\nPer minute, {label} (cores used over the run: "
            + ", ".join(f"{k} {v:.2f}" for k, v in latency.cpu.items()) + "):\n",
            "| minute | p50 ms | p99 ms | max ms | RSS MB |",
            "| ---: | ---: | ---: | ---: | ---: |"]
    for minute, ms in enumerate(latency.by_minute):
        rss = f"{rss_by_minute[minute]:,.0f}" if minute < len(rss_by_minute) else "-"
        rows.append(f"| {minute + 1} | {ms.get('p50', float('nan')):,.0f} | "
                    f"{ms.get('p99', float('nan')):,.0f} | {ms.get('max', float('nan')):,.0f} | "
                    f"{rss} |")
    return "\n".join(rows)


def _rss_mb() -> float:
    """This process's resident memory (the worker runs in a thread of it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _largest_bucket(registry) -> str:
    """The copy histogram's smallest bucket holding every observation: an upper bound (ms)."""
    total = registry.get_sample_value("streamer_checkpoint_copy_seconds_count") or 0
    if not total:
        return "-"
    for bound in (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5):
        if registry.get_sample_value("streamer_checkpoint_copy_seconds_bucket",
                                     {"le": str(bound)}) == total:
            return f"<= {bound * 1e3:,.0f}"
    return "> 2,500"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", default="1000,10000,100000")
    parser.add_argument("--seconds", type=float, default=21.0, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--live-sensors", type=int, default=100_000, help="0: skip")
    parser.add_argument("--live-rate", type=float, default=4000.0)
    parser.add_argument("--live-seconds", type=float, default=60.0)
    parser.add_argument("--live-baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also the live runs with checkpoints off and of the IO ceiling")
    args = parser.parse_args(argv)
    torch.set_num_threads(load_settings().torch_threads or 1)
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        results = {n: bench_core(n, args.seconds, args.rounds, Path(tmp))
                   for n in (int(x) for x in args.sensors.split(",") if x)}
        print(f"\nCheckpoint every {INTERVAL_S:.0f} s, {args.rounds} x {args.seconds:.0f} s per "
              "mode (order alternating), one torch thread, cpu:\n")
        print(core_table(results))
        if args.live_sensors:
            print(f"\nLive: {args.live_sensors:,} sensors, {args.live_rate:,.0f} readings/s "
                  f"for {args.live_seconds:.0f} s (first 5 s not counted); latency = output "
                  "record's timestamp - input record's:\n")
            print(bench_live(args.live_sensors, args.live_rate, args.live_seconds, Path(tmp),
                             args.live_baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
