"""Core learner throughput and update cost (a print-out, not a test): python tests/bench_core.py

For each device and fleet size N it prints, as one Markdown table:

* ``Learner.step`` readings/s on a round-robin stream (every sensor one reading per round), cut
  into micro-batches of N readings (one reading per sensor per call) and of 500 readings (the
  worker's default poll size); with training off (``train_every`` huge) and at the default
  ``train_every``, measured in steady state (windows ready, updates running);
* a naive loop -- one ``torch.nn.LSTM`` call per reading at batch size 1 (gather the sensor's
  h/c, one step, write back, linear head, forecast to the host) -- timed on a sample and
  extrapolated; it gets its inputs precomputed, so the speed-up is a lower bound;
* ``learner.train_now()`` on the learner's real queued windows (n_ready = min(N, 8192)) against
  the compute limit: raw ``nn.LSTM`` + head forward, backward, ``clip_grad_norm_`` and Adam on
  tensors of the same shapes, with no gather and no masking.

``--device auto`` runs the CPU and, when available, CUDA; every figure is a median of repeats
after warm-up. A full run on 2 CPU cores takes a few minutes; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from streamer.core import Batch, Learner, LearnerConfig
from streamer.core.learner import MAX_WINDOWS_PER_UPDATE
from streamer.core.normalizer import input_size
from streamer.core.windows import WindowBatch

NEVER = 10**15  # train_every that no benchmark reaches: training off
WORKER_BATCH = 500  # the worker's typical micro-batch (kafka.max_poll_records)
READING_INTERVAL = 60.0  # seconds between a sensor's readings


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    readings_per_repeat: int  # step timings feed at least this many readings per repeat
    repeats: int
    naive_readings: int
    update_repeats: int


FULL = Plan(readings_per_repeat=20_000, repeats=5, naive_readings=2_000, update_repeats=5)
QUICK = Plan(readings_per_repeat=2_000, repeats=2, naive_readings=200, update_repeats=2)


@dataclass
class Row:
    """One table row: a device, a fleet size and a micro-batch size."""

    device: str
    sensors: int
    micro_batch: int
    step_no_training: float  # readings/s
    step_training: float  # readings/s
    naive: float  # readings/s
    n_ready: int
    train_now_ms: float
    trainer_update_ms: float
    raw_ms: float
    peak_mib: float

    @property
    def speed_up(self) -> float:
        return self.step_no_training / self.naive

    @property
    def ratio(self) -> float:
        return self.train_now_ms / self.raw_ms


class Fleet:
    """N sensors with their own level, scale, period, phase and noise: a sine plus noise each."""

    def __init__(self, n_sensors: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ids = [f"sensor-{i:06d}" for i in range(n_sensors)]
        self.scale = 10.0 ** rng.uniform(-2, 3, n_sensors)
        self.offset = self.scale * rng.uniform(-5, 5, n_sensors)
        self.period = rng.uniform(12, 96, n_sensors)  # in readings
        self.phase = rng.uniform(0, 2 * np.pi, n_sensors)
        self.noise = rng.uniform(0.01, 0.1, n_sensors)
        self.jitter = np.linspace(0.0, 0.5 * READING_INTERVAL, n_sensors, endpoint=False)
        self.rng = rng

    def __len__(self) -> int:
        return len(self.ids)

    def round(self, r: int, sensors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Round ``r`` of the sensors at ``sensors`` (indices): (n,) timestamps, (n,) values."""
        ts = 1.7e9 + READING_INTERVAL * r + self.jitter[sensors]
        wave = np.sin(2 * np.pi * r / self.period[sensors] + self.phase[sensors])
        noise = self.noise[sensors] * self.rng.standard_normal(len(sensors))
        return ts, self.offset[sensors] + self.scale[sensors] * (wave + noise)


class Stream:
    """One learner's view of a fleet: consecutive rounds, cut into micro-batches."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.next_round = 0

    def take(self, n_rounds: int, batch_size: int, n_sensors: int | None = None,
             stagger: int | None = None) -> list[Batch]:
        """The next ``n_rounds`` rounds of the first ``n_sensors`` in batches of batch_size.

        With ``stagger``, sensor i joins only at round ``i % stagger`` of this stream, so the
        sensors' windows fill (and later become ready) at evenly spread phases, as in a fleet
        whose sensors came online at different times.
        """
        n = len(self.fleet) if n_sensors is None else n_sensors
        ids, ts, values = [], [], []
        for r in range(self.next_round, self.next_round + n_rounds):
            if stagger is None or r >= stagger - 1:
                sensors = np.arange(n)
                ids.extend(self.fleet.ids[:n])
            else:
                sensors = np.flatnonzero(np.arange(n) % stagger <= r)
                ids.extend(self.fleet.ids[i] for i in sensors.tolist())
            round_ts, round_values = self.fleet.round(r, sensors)
            ts.append(round_ts)
            values.append(round_values)
        self.next_round += n_rounds
        all_ts, all_values = np.concatenate(ts), np.concatenate(values)  # (readings,)
        return [Batch.from_arrays(ids[a : a + batch_size], all_ts[a : a + batch_size],
                                  all_values[a : a + batch_size])
                for a in range(0, len(ids), batch_size)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device,
               warmup: int = 1,
               after: dict[str, Callable[[], object]] | None = None) -> dict[str, float]:
    """Median wall time in ms of each run, after ``warmup`` untimed calls of each.

    The runs take turns within every repeat, so a noisy neighbour slows them alike and their
    ratio stays meaningful on a shared machine. ``after[name]`` runs untimed after each call.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + repeats):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            if after and name in after:
                after[name]()
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


@dataclass
class StepFigures:
    """Step throughput (median over repeats), and what training did while it was timed."""

    rates: list[float] = dataclasses.field(default_factory=list)  # readings/s per repeat
    updates: int = 0
    windows: int = 0  # ready windows trained by those updates

    @property
    def readings_per_s(self) -> float:
        return statistics.median(self.rates)


def _step_rates(learner: Learner, stream: Stream, batch_sizes: list[int], plan: Plan,
                naive: Callable[[], float] | None = None) -> tuple[dict[int, StepFigures], float]:
    """Readings/s of ``learner.step`` over fresh rounds cut into each batch size.

    Repeats take turns between the batch sizes and the naive loop (readings/s per call of
    ``naive``), so the speed-up compares figures taken under the same load.
    """
    n = len(stream.fleet)
    n_rounds = max(1, math.ceil(plan.readings_per_repeat / n))
    figures = {size: StepFigures() for size in batch_sizes}
    naive_rates = []
    for i in range(1 + plan.repeats):  # the first repeat warms up
        for size in batch_sizes:
            batches = stream.take(n_rounds, size)
            _sync(learner.device)
            start = time.perf_counter()
            results = [learner.step(batch) for batch in batches]
            _sync(learner.device)
            elapsed = time.perf_counter() - start
            if i:
                updates = [u for result in results for u in result.updates]
                figures[size].rates.append(n_rounds * n / elapsed)
                figures[size].updates += len(updates)
                figures[size].windows += sum(u.slots for u in updates)
        if naive is not None:
            rate = naive()
            if i:
                naive_rates.append(rate)
    return figures, statistics.median(naive_rates) if naive_rates else math.nan


def _config(n_sensors: int, device: torch.device, train_every: int | None) -> LearnerConfig:
    base = LearnerConfig(max_sensors=n_sensors, initial_capacity=min(1024, n_sensors),
                         device=str(device))
    return base if train_every is None else dataclasses.replace(base, train_every=train_every)


def _fill_windows(learner: Learner, stream: Stream, n_ready: int) -> WindowBatch:
    """Feed the first ``n_ready`` sensors until ``n_ready`` full windows are queued (training
    is off); the queued windows, oldest first."""
    learner.state.take_queued(len(learner.state.queue))  # from the throughput runs
    for _ in range(learner.config.tbptt_steps + 2):
        if len(learner.state.queue) >= n_ready:
            break
        for batch in stream.take(1, n_ready, n_sensors=n_ready):
            learner.step(batch)
    queued = learner.state.queue.take(np.arange(len(learner.state.queue)))  # a copy
    if len(queued) != n_ready:
        raise RuntimeError(f"expected {n_ready} queued windows, found {len(queued)}")
    return queued


def _update_runs(learner: Learner, queued: WindowBatch
                 ) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """``train_now()`` and ``Trainer.update`` alone over the same real queued windows; and the
    untimed call that queues those windows again after ``train_now`` took them."""
    def train_now() -> None:
        stats = learner.train_now()
        if stats is None or stats.slots != len(queued) or stats.steps == 0:
            raise RuntimeError(f"train_now did not train the {len(queued)} windows: {stats}")

    def make_ready_again() -> None:
        learner.state.take_queued(len(learner.state.queue))
        learner.state.enqueue(queued)

    make_ready_again()
    runs = {"train_now": train_now, "trainer_update": lambda: learner.trainer.update(queued)}
    return runs, make_ready_again


def _raw_run(config: LearnerConfig, n_ready: int, device: torch.device) -> Callable[[], None]:
    """A bare LSTM + head training step on (n_ready, k, D) tensors: the compute limit."""
    d, h, layers = input_size(config.n_features), config.hidden_size, config.num_layers
    k, f = config.tbptt_steps, config.n_features
    lstm = nn.LSTM(d, h, layers, batch_first=True).to(device)
    head = nn.Linear(h + d, f).to(device)
    params = [*lstm.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    x = torch.randn(n_ready, k, d, device=device)  # (n, k, D)
    y = torch.randn(n_ready, k, f, device=device)  # (n, k, F)
    h0 = torch.zeros(layers, n_ready, h, device=device)  # (L, n, H)
    c0 = torch.zeros_like(h0)

    def step() -> None:
        out, _ = lstm(x, (h0, c0))  # (n, k, H)
        loss = ((head(torch.cat([out, x], dim=-1)) - y) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _naive_loop(config: LearnerConfig, fleet: Fleet, device: torch.device,
                n_readings: int) -> Callable[[], float]:
    """A call that runs one batch-1 ``nn.LSTM`` step per reading on a sample; readings/s."""
    d, h, layers, f = (input_size(config.n_features), config.hidden_size, config.num_layers,
                       config.n_features)
    lstm = nn.LSTM(d, h, layers, batch_first=True).to(device)
    head = nn.Linear(h + d, f).to(device)
    hs = torch.zeros(layers, len(fleet), h, device=device)  # (L, N, H) one state per sensor
    cs = torch.zeros_like(hs)
    slot_of = {sensor_id: i for i, sensor_id in enumerate(fleet.ids)}
    ids = [fleet.ids[i % len(fleet)] for i in range(n_readings)]  # round-robin, like the stream
    x = torch.randn(n_readings, 1, 1, d, device=device)  # inputs precomputed: favours naive

    @torch.no_grad()
    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        for i, sensor_id in enumerate(ids):
            s = slot_of[sensor_id]
            xi = x[i]  # (1, 1, D)
            out, (h1, c1) = lstm(xi, (hs[:, s : s + 1], cs[:, s : s + 1]))  # out (1, 1, H)
            hs[:, s : s + 1], cs[:, s : s + 1] = h1, c1
            head(torch.cat([out, xi], dim=-1)).tolist()  # the forecast, on the host
        _sync(device)
        return n_readings / (time.perf_counter() - start)

    return run


def _peak_mib(device: torch.device) -> float:
    """Peak memory so far: GPU memory allocated on CUDA, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench(device: torch.device, n_sensors: int, plan: Plan) -> list[Row]:
    """Every figure for one device and fleet size; one row per micro-batch size."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fleet = Fleet(n_sensors)
    batch_sizes = [n_sensors] + ([WORKER_BATCH] if WORKER_BATCH < n_sensors else [])
    n_ready = min(n_sensors, MAX_WINDOWS_PER_UPDATE)

    # Training off: step throughput, then the real ready windows for the update timing.
    learner = Learner(_config(n_sensors, device, NEVER))
    stream = Stream(fleet)
    for batch in stream.take(2, n_sensors):  # slot allocation and growth, untimed
        learner.step(batch)
    naive_loop = _naive_loop(learner.config, fleet, device, plan.naive_readings)
    no_training, naive = _step_rates(learner, stream, batch_sizes, plan, naive_loop)
    for size, figures in no_training.items():
        _log(f"  {device} N={n_sensors} batch {size}: no training "
             f"{figures.readings_per_s:,.0f} readings/s")
    _log(f"  {device} N={n_sensors}: naive {naive:,.0f} readings/s")
    ready = _fill_windows(learner, stream, n_ready)
    runs, make_ready_again = _update_runs(learner, ready)
    runs["raw"] = _raw_run(learner.config, n_ready, device)
    ms = _median_ms(runs, plan.update_repeats, device, after={"train_now": make_ready_again})
    train_now_ms, update_ms, raw_ms = ms["train_now"], ms["trainer_update"], ms["raw"]
    _log(f"  {device} N={n_sensors}: train_now {train_now_ms:.1f} ms, Trainer.update "
         f"{update_ms:.1f} ms, raw {raw_ms:.1f} ms")
    del learner, stream
    gc.collect()

    # Training on at the default train_every. Sensors join at k + 1 staggered rounds, so every
    # round ~1/(k+1) of the windows become ready, spread over the round, as in a fleet that came
    # online over time: each update then trains ~train_every/(k+1) windows. Timed once every
    # window has been ready at least once.
    learner = Learner(_config(n_sensors, device, None))
    stream = Stream(fleet)
    k = learner.config.tbptt_steps
    for _ in range(k + 2):
        for batch in stream.take(1, n_sensors, stagger=k + 1):
            learner.step(batch)
    training, _ = _step_rates(learner, stream, batch_sizes, plan)
    for size, figures in training.items():
        _log(f"  {device} N={n_sensors} batch {size}: training {figures.readings_per_s:,.0f} "
             f"readings/s, {figures.updates} updates of {figures.windows} windows while timed")
    del learner, stream
    gc.collect()

    peak = _peak_mib(device)
    _log(f"  {device} N={n_sensors}: peak {peak:,.0f} MiB")
    return [Row(str(device), n_sensors, size, no_training[size].readings_per_s,
                training[size].readings_per_s, naive, n_ready,
                train_now_ms, update_ms, raw_ms, peak) for size in batch_sizes]


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    header = ("| device | sensors | micro-batch | step readings/s (no training) "
              "| step readings/s (training) | naive readings/s | speed-up | n_ready "
              "| update ms (train_now) | Trainer.update ms | raw LSTM ms | ratio | peak MiB |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r.device} | {r.sensors:,} | {r.micro_batch:,} | {r.step_no_training:,.0f} "
            f"| {r.step_training:,.0f} | {r.naive:,.0f} | {r.speed_up:,.0f}x | {r.n_ready:,} "
            f"| {r.train_now_ms:,.1f} | {r.trainer_update_ms:,.1f} | {r.raw_ms:,.1f} "
            f"| {r.ratio:.2f}x | {r.peak_mib:,.0f} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    """One line per target: speed-up >= 50x at 10k sensors, update <= 1.5x the raw LSTM."""
    lines = []
    for r in rows:
        if r.sensors == 10_000:
            met = "met" if r.speed_up >= 50 else "NOT met"
            lines.append(f"- {r.device}, 10k sensors, micro-batch {r.micro_batch:,}: speed-up "
                         f"{r.speed_up:,.0f}x (target >= 50x: {met})")
    seen = set()
    for r in rows:
        if (r.device, r.sensors) not in seen:
            seen.add((r.device, r.sensors))
            met = "met" if r.ratio <= 1.5 else "NOT met"
            lines.append(f"- {r.device}, {r.sensors:,} sensors: update / raw LSTM = "
                         f"{r.ratio:.2f}x (target <= 1.5x: {met})")
    return lines


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _devices(name: str) -> list[torch.device]:
    if name == "cpu":
        return [torch.device("cpu")]
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        return [torch.device("cuda")]
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run every (device, fleet size) and print the report."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the CPU, then CUDA when available")
    parser.add_argument("--sensors", default=None,
                        help="comma-separated fleet sizes (default 1000,10000,100000; "
                             "--quick: 1000)")
    parser.add_argument("--threads", type=int, default=cores,
                        help=f"torch.set_num_threads (default: all {cores} cores)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    sensors = args.sensors or ("1000" if args.quick else "1000,10000,100000")
    fleet_sizes = [int(s) for s in sensors.split(",") if s.strip()]
    if not fleet_sizes or min(fleet_sizes) < 1:
        raise SystemExit(f"--sensors needs positive integers, got {sensors!r}")
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)

    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for device in _devices(args.device):
        for n in fleet_sizes:
            rows.extend(bench(device, n, plan))

    print(f"# streamer core benchmark, {datetime.date.today().isoformat()}")
    print(f"- torch {torch.__version__}, numpy {np.__version__}, Python "
          f"{platform.python_version()}")
    print(f"- CPU: {_cpu_model()}, {cores} cores available, torch threads "
          f"{torch.get_num_threads()}; 1-min load average {load_at_start:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end (a shared machine: other jobs inflate timings)")
    if torch.cuda.is_available():
        print(f"- GPU: {torch.cuda.get_device_name()}")
    defaults = LearnerConfig()
    print(f"- learner defaults: hidden {defaults.hidden_size}, layers {defaults.num_layers}, "
          f"tbptt_steps {defaults.tbptt_steps}, train_every {defaults.train_every}, "
          f"input size {input_size(defaults.n_features)}; medians of {plan.repeats} step / "
          f"{plan.update_repeats} update repeats; naive loop sampled on "
          f"{plan.naive_readings:,} readings")
    print()
    print(table(rows))
    print()
    print("\n".join(verdicts(rows)))
    print(f"\n(run took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
