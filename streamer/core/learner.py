"""The learner: per-sensor stateful forecasting over micro-batches, training as it goes."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch

from streamer.core import snapshot as snap
from streamer.core.batch import Batch, HorizonResult, StepResult, UpdateStats
from streamer.core.clock import EventClock
from streamer.core.compiled import kernel
from streamer.core.config import MAX_WINDOWS_PER_UPDATE, LearnerConfig
from streamer.core.device import (
    device_memory_bytes,
    memory_limit_bytes,
    resolve_device,
    use_full_precision,
)
from streamer.core.experts import (
    MIN_NAIVE_ERROR,
    N_EXPERTS,
    PERSISTENCE,
    expert_forecasts,
    expert_reach,
    weigh_experts,
)
from streamer.core.grouping import Groups, group_by_slot
from streamer.core.horizon import N_HORIZON_EXPERTS, HorizonState, horizon_experts
from streamer.core.intervals import Calibrated, Calibration, late_reach, level_position
from streamer.core.memory import Recalled, SensorMemory
from streamer.core.model import Forecaster
from streamer.core.normalizer import (
    MAX_ABS_TS,
    SECONDS_PER_DAY,
    Encoded,
    SensorStats,
    input_size,
    within_range,
)
from streamer.core.rejections import Reason
from streamer.core.slots import SlotTable
from streamer.core.trainer import Trainer
from streamer.core.weights import Weights, copied
from streamer.core.windows import SlotTensors, WindowBatch

# An update waits for queued windows: one at first, one more every RAMP_UPDATES updates up to
# config.min_update_windows; and in a large fleet one per 16 live sensors, at most 64 (at 1k
# sensors an update trains >= 62 windows instead of ~2: the core benchmark measured 38k
# readings/s with 2-window updates).
RAMP_UPDATES = 16
MIN_READY_PER_SENSORS, MIN_READY_MAX = 16, 64
# The horizon's experts keep running errors even with the step-1 guard off (guard_alpha 0).
MIN_HORIZON_ALPHA = 0.02
# A sensor whose last reading is dated more than this past the fleet's event clock and the
# wall clock, and that then reads within them again, restarts (``_restart_returned``): a day
# covers a device on any local time zone (at most 14 h ahead), which is rejected until it is
# back instead.
AHEAD_RESTART_S = 86400.0


class StateTooLarge(ValueError):
    """The sensor table asked for up front would not fit in memory."""


def held_bytes(parts: Iterable[object]) -> tuple[int, int]:
    """Bytes of the arrays and tensors ``parts`` hold as attributes: (in host memory, on a
    GPU)."""
    host = gpu = 0
    for value in (v for part in parts for v in vars(part).values()):
        if isinstance(value, np.ndarray):
            host += value.nbytes
        elif isinstance(value, torch.Tensor):
            size = value.element_size() * value.numel()
            host, gpu = (host + size, gpu) if value.device.type == "cpu" else (host, gpu + size)
    return host, gpu


class Learner:
    """Keeps one LSTM state per sensor (batch slot i is sensor i), forecasts, and learns.

    ``step`` is the only hot-path call. Each sensor's readings are applied in order; a sensor
    with several readings in one micro-batch is advanced through all of them in one LSTM call.
    Every ``train_every`` accepted readings one truncated-BPTT update runs, exactly after the
    reading that completes the count, however the stream is cut into micro-batches.
    """

    def __init__(self, config: LearnerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        use_full_precision(self.device)
        n_inputs = input_size(config.n_features)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = Forecaster(n_inputs, config.n_features, config.hidden_size, config.num_layers)
        self.model = model.to(self.device)
        self.trainer = Trainer(self.model, config.lr, config.max_grad_norm)
        # (checked before the slot table too: its lists of 10^8 slots took 20 s to build
        # before a refusal; operator pass)
        self._check_fits(min(config.initial_capacity, config.max_sensors))
        self.table = SlotTable(config.initial_capacity, config.max_sensors)
        self.stats, self.memory, self.calibration, self.horizon, self.state = self._slot_state(
            self.table.capacity)
        self.accepted_total = 0  # accepted readings ever: drives the training trigger
        # The fleet's event time: for idle eviction, and to tell a sensor whose clock ran ahead
        # from readings that come late (without a TTL, sensors a day apart do not agree).
        self.clock = EventClock(config.sensor_ttl_seconds or AHEAD_RESTART_S)
        self._compile()

    def _slot_state(self, capacity: int) -> tuple[SensorStats, SensorMemory, Calibration,
                                                  HorizonState, SlotTensors]:
        """The per-sensor state of ``capacity`` slots, zeroed."""
        c = self.config
        return (SensorStats(capacity, c.n_features, c.norm_alpha, c.warmup_readings, c.clip_z,
                            c.robust_stats),
                SensorMemory(capacity, c.n_features, c.seasonal_alpha, recent=c.horizon > 1),
                Calibration(capacity, c.n_features, c.coverage, c.anomaly_threshold,
                            c.anomaly_learn_after),
                HorizonState(capacity, c.n_features, c.horizon, c.coverage),
                SlotTensors(capacity, c.num_layers, c.hidden_size, c.tbptt_steps,
                            input_size(c.n_features), c.n_features, self.device,
                            limit=MAX_WINDOWS_PER_UPDATE))

    def _check_fits(self, capacity: int) -> None:
        """Refuse a table whose zeroed state alone is more than the process may hold (a typo
        in initial_capacity), before allocating it: with memory overcommitted, the allocation
        itself succeeds and the kernel kills the process once it is written. Host memory and
        the GPU's (the LSTM state, on a CUDA device) are checked each on its own."""
        host, gpu = held_bytes(self._slot_state(1))
        limits = [(host, memory_limit_bytes(), "this process may use (the machine's memory, "
                   "or its container's limit)")]
        if gpu:
            limits.append((gpu, device_memory_bytes(self.device), f"{self.device} has"))
        for per_slot, limit, where in limits:
            if per_slot * capacity > limit:
                raise StateTooLarge(
                    f"{capacity:,} sensor slots up front need about "
                    f"{per_slot * capacity / 2**30:,.1f} GiB ({per_slot:,} bytes a slot), more "
                    f"than the {limit / 2**30:,.1f} GiB {where}")

    def _compile(self) -> None:
        """Compile (or load from the cache) the per-reading loops now, at start-up, rather than
        in the first micro-batch: empty chunks, so no state changes."""
        f, none = self.config.n_features, np.zeros(0, dtype=np.int64)
        ts, values = np.zeros(0), np.zeros((0, f))
        enc = self.stats.encode(none, ts, values)
        self.memory.advance(none, ts, values, enc.spread, enc.next_gap, enc.targets,
                            enc.has_prev, enc.outlier)
        weigh_experts(self.stats.guard_err, self.stats.revert_score, none,
                      np.zeros((0, f, N_EXPERTS)), enc.target_valid, none, 0.5, 1.0, values)
        self._timestamps_increase(none, ts)
        self.calibration.calibrate(none, ts, ts, values, values, values, values, none, none,
                                   values, values, values, values, values)
        if self.config.horizon > 1:
            h, k = self.config.horizon, N_HORIZON_EXPERTS
            self.horizon.forecast(none, none, values, none, none, values,
                                  np.zeros((0, f, h, k)), values, values, values, 1.0, 0.1, 1.0,
                                  np.zeros((0, h)))

    @property
    def updates(self) -> int:
        """Weight updates applied so far."""
        return self.trainer.applied

    @property
    def n_sensors(self) -> int:
        return len(self.table)

    @property
    def capacity(self) -> int:
        return self.table.capacity

    # -- the step -------------------------------------------------------------------------
    def step(self, batch: Batch) -> StepResult:
        """Apply a micro-batch (arrival order); one forecast per accepted reading."""
        cuts = self._restarts_inside(batch)
        if not cuts:
            return self._step(batch)
        bounds = [0, *cuts, len(batch)]
        return StepResult.concat([self._step(batch.take(np.arange(a, b)))
                                  for a, b in zip(bounds[:-1], bounds[1:])])

    def _restarts_inside(self, batch: Batch) -> list[int]:
        """Where a sensor comes back, within this micro-batch, from a reading of its own in it
        dated past the restart edge (``_restart_returned``): the batch is applied in parts cut
        there, so the sensor restarts there, as it would were the stream cut into single
        readings (otherwise every later reading of it here would be rejected as late). As
        with any cut, a sensor idle for a TTL that reads only after it can be evicted by the
        part before and start again in the part after."""
        edge = self._restart_edge(time.time())
        if not (batch.ts > edge).any():  # the usual case: nothing ahead, nothing to look for
            return []
        cuts, newest = [], {}
        usable = np.isfinite(batch.ts) & (np.abs(batch.ts) <= MAX_ABS_TS)
        for i in np.flatnonzero(usable).tolist():
            sensor_id, ts = batch.sensor_ids[i], float(batch.ts[i])
            if ts <= edge < newest.get(sensor_id, -np.inf):
                cuts.append(i)
                newest[sensor_id] = ts
            else:
                newest[sensor_id] = max(newest.get(sensor_id, -np.inf), ts)
        return cuts

    def _step(self, batch: Batch) -> StepResult:
        n = len(batch)
        result = StepResult.empty(n, self.config.n_features)
        if self.config.horizon > 1:
            result.horizon = HorizonResult.empty(n, self.config.n_features, self.config.horizon,
                                                 self.horizon.steps)
        if n == 0:
            return result
        slots = self._admit(batch, result)
        accepted = np.flatnonzero(result.status == 0)
        # Cut the accepted readings after each one that completes a train_every count.
        every = self.config.train_every
        done = self.accepted_total
        first_due = every - done % every  # 1-based index within `accepted` of the first trigger
        cuts = np.arange(first_due, len(accepted) + 1, every)
        # The accepted readings that complete a window.
        part, step = self.state.place(slots[accepted], group_by_slot(slots[accepted]).pos)
        fills = np.flatnonzero((part > 0) & (step == 0))
        start = 0
        while (end := self._next_useful_cut(fills, cuts, start)) is not None:
            self._apply(batch, accepted[start:end], slots, result)
            update = self._train()
            if update is not None:
                result.updates.append(update)
            start = end
        if start < len(accepted):
            self._apply(batch, accepted[start:], slots, result)
        self.accepted_total += len(accepted)
        return result

    def _next_useful_cut(self, fills: np.ndarray, cuts: np.ndarray, start: int) -> int | None:
        """The first trigger in ``cuts`` after ``start`` by which enough windows will be queued.

        A trigger that finds too few queued windows is a no-op, so the readings up to it need
        no chunk of their own: fewer, larger chunks, exactly the same updates (a small
        train_every is then nearly free). ``fills`` are the indices of the accepted readings
        that complete a window.
        """
        need = self._min_ready() - len(self.state.queue)
        if need <= 0:
            first = start + 1
        else:
            ahead = fills[np.searchsorted(fills, start):]
            if len(ahead) < need:
                return None
            first = int(ahead[need - 1]) + 1
        i = int(np.searchsorted(cuts, first))
        return int(cuts[i]) if i < len(cuts) else None

    def _min_ready(self) -> int:
        """Windows an update waits for: few while the model is new (each window teaches a lot),
        more later and in large fleets (tiny updates cost more than they teach).

        Growing the batch rather than decaying the step size (Smith et al., "Don't decay the
        learning rate, increase the batch size", 2018) keeps small fleets learning fast early
        and bounds the updates per reading later. Counted from updates attempted and sensors
        with applied readings, which depend only on the stream so far, so updates fall at the
        same readings however the stream is cut into micro-batches.
        """
        warm = min(self.config.min_update_windows, 1 + self.trainer.attempts // RAMP_UPDATES)
        live = int(np.count_nonzero(self.stats.count > 0))
        return max(warm, min(MIN_READY_MAX, live // MIN_READY_PER_SENSORS))

    def _admit(self, batch: Batch, result: StepResult) -> np.ndarray:
        """Validate every reading, evict idle sensors, give new sensors slots; (N,) slots."""
        cfg, status = self.config, result.status
        slots = self.table.lookup(batch.sensor_ids)
        unknown = np.flatnonzero(slots < 0)
        for i in unknown.tolist():
            sensor_id = batch.sensor_ids[i]
            if not isinstance(sensor_id, str) or not 0 < len(sensor_id) <= cfg.max_sensor_id_length:
                status[i] = Reason.BAD_SENSOR_ID
        ok = status == 0
        status[ok & (batch.n_values != cfg.n_features)] = Reason.WRONG_FEATURE_COUNT
        ok = status == 0
        finite = np.isfinite(batch.ts) & np.isfinite(batch.values).all(axis=1)
        status[ok & ~finite] = Reason.NON_FINITE
        ok = status == 0
        status[ok & ~within_range(batch.ts, batch.values)] = Reason.VALUE_OUT_OF_RANGE
        ok = status == 0
        wall = time.time()
        if ok.any():
            rows = np.flatnonzero(ok)
            self.clock.advance(batch.sensor_ids, rows, batch.ts[rows], limit=wall)
            if cfg.sensor_ttl_seconds is not None:
                result.evicted_sensors = self._evict_idle(slots[rows])
        new = np.flatnonzero(ok & (slots < 0))
        if len(new):
            new_ids = list(dict.fromkeys(batch.sensor_ids[i] for i in new.tolist()))
            given, grew_to = self.table.allocate(new_ids)
            if grew_to is not None:
                self.grow(grew_to)
            result.new_sensors = int((given >= 0).sum())
            slot_of_new = dict(zip(new_ids, given.tolist()))
            slots[new] = [slot_of_new[batch.sensor_ids[i]] for i in new.tolist()]
            status[new[slots[new] < 0]] = Reason.TABLE_FULL
        ok = np.flatnonzero(status == 0)
        result.restarted_sensors = self._restart_returned(slots[ok], batch.ts[ok], wall)
        late = ~self._timestamps_increase(slots[ok], batch.ts[ok])
        status[ok[late]] = Reason.TIMESTAMP_NOT_AFTER_LAST
        return slots

    def _timestamps_increase(self, slots: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Whether each ts is after its sensor's last applied ts and every earlier one here."""
        ok = np.empty(len(slots), dtype=bool)
        _after_newest(slots.astype(np.int64), ts, group_by_slot(slots).before,
                      self.stats.last_ts, ok)
        return ok

    def _restart_edge(self, wall: float) -> float:
        """Past this, a sensor's last reading was dated ahead of both the fleet and the wall
        clock (``_restart_returned``)."""
        return max(self.clock.time, wall) + AHEAD_RESTART_S

    def _restart_returned(self, slots: np.ndarray, ts: np.ndarray, wall: float) -> int:
        """Restart sensors whose last reading is dated more than AHEAD_RESTART_S past both the
        fleet's event clock and the wall clock, and that now read within both again: their
        clock was wrong, not this reading (a glitched timestamp years ahead, a device whose
        clock was set days ahead and then fixed). Without this, every later reading would be
        rejected until real time passed the wrong one, or forever. A late reading of a sensor
        not that far ahead (a duplicate, a re-sent buffer, a backlog read before the rest of
        the fleet's, a device on local time) is rejected as before. Returns how many."""
        if not len(slots):
            return 0
        edge = self._restart_edge(wall)
        back = np.unique(slots[(self.stats.last_ts[slots] > edge) & (ts <= edge)])
        self._reset_slots(back)
        return len(back)

    def _evict_idle(self, active_slots: np.ndarray) -> int:
        """Free slots idle longer than the TTL (event time), except those being fed now."""
        occupied = self.table.occupied
        if not len(occupied):
            return 0
        cutoff = self.clock.time - self.config.sensor_ttl_seconds
        idle = occupied[self.stats.last_ts[occupied] < cutoff]
        idle = idle[~np.isin(idle, active_slots)]
        self.release(idle)
        return len(idle)

    def grow(self, capacity: int) -> None:
        """Enlarge every per-slot array to the slot table's new ``capacity``."""
        self.stats.grow(capacity)
        self.memory.grow(capacity)
        self.calibration.grow(capacity)
        self.horizon.grow(capacity)
        self.state.grow(capacity)

    def release(self, slots: np.ndarray) -> None:
        """Free ``slots`` and reset their state, statistics, memory, calibration and window."""
        if len(slots):
            self.table.release(slots)
            self._reset_slots(slots)

    def _reset_slots(self, slots: np.ndarray) -> None:
        """Every per-sensor part of ``slots`` as for a sensor never seen (the table aside)."""
        if len(slots):
            self.stats.reset(slots)
            self.memory.reset(slots)
            self.calibration.reset(slots)
            self.horizon.reset(slots)
            self.state.reset(slots)

    # -- its state, whole or per sensor (checkpoints, partitions moving) --------------------
    def snapshot(self, reuse: dict | None = None) -> dict:
        """Everything needed to continue exactly from here, copied to the CPU (into ``reuse``,
        an earlier snapshot of this learner nobody reads any more, where shapes match)."""
        def views(arrays: dict) -> dict:
            return {k: torch.from_numpy(v) for k, v in arrays.items()}

        live = {
            "format": snap.FORMAT,
            "fingerprint": self.config.fingerprint(),
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.trainer.optimizer.state_dict(),
            "table": self.table.to_plain(),
            "stats": views(self.stats.arrays()),
            "memory": views(self.memory.arrays()),
            "calibration": views(self.calibration.arrays()),
            "horizon": views(self.horizon.arrays()),
            "horizon_steps": torch.from_numpy(self.horizon.steps),
            "slot_tensors": self.state.tensors(),
            "seen": torch.from_numpy(self.state.seen),
            "short": torch.from_numpy(self.state.short),
            "queue": self.state.queue.tensors(),
            "counters": {
                "accepted_total": self.accepted_total,
                **self.clock.to_plain(),
                "attempts": self.trainer.attempts,
                "applied": self.trainer.applied,
            },
        }
        return snap.copied(live, reuse)

    @classmethod
    def restore(cls, state: dict, config: LearnerConfig) -> Learner:
        """A learner that continues exactly as the one ``state`` was taken from."""
        snap.check_compatible(state, config)
        learner = cls(config)
        learner.load(state)
        return learner

    def load(self, state: dict) -> None:
        """Replace all of this learner's state with ``state`` (of a compatible config)."""
        snap.check_compatible(state, self.config)
        counters = state["counters"]
        self.model.load_state_dict(state["model"])
        self.trainer.load(state["optimizer"], int(counters["attempts"]),
                          int(counters["applied"]))
        self.table = SlotTable.from_plain(state["table"], self.config.max_sensors)
        self.stats.load_arrays({k: v.numpy() for k, v in state["stats"].items()})
        self.memory.load_arrays({k: v.numpy() for k, v in state["memory"].items()})
        self.calibration.load_arrays({k: v.numpy() for k, v in state["calibration"].items()})
        self.horizon.load_arrays({k: v.numpy() for k, v in state["horizon"].items()},
                                 state["horizon_steps"].numpy())
        self.state.load_tensors(state["slot_tensors"], state["seen"].numpy(),
                                state["short"].numpy(), state["queue"])
        self.accepted_total = int(counters["accepted_total"])
        self.clock.load_plain(counters, lambda: {sensor: float(self.stats.last_ts[slot])
                                                 for sensor, slot in self.table.items()})

    def weights(self) -> Weights:
        """A copy of the forecaster's weights (what workers share; no optimizer state)."""
        return copied(self.model.state_dict())

    @torch.no_grad()
    def set_weights(self, weights: Weights) -> None:
        """Replace the forecaster's weights in place (the optimizer keeps its moments)."""
        for name, t in self.model.state_dict().items():
            t.copy_(weights[name])

    def import_sensors(self, exported: dict) -> int:
        """Give each sensor of ``exported`` (``snapshot.sensors_of``) a slot, replacing any
        state it had here; returns the count."""
        ids = list(exported["ids"])
        if not ids:
            return 0
        self._check_importable(exported)
        self.drop_sensors(ids)
        slots, grew_to = self.table.allocate(ids)
        if grew_to is not None:
            self.grow(grew_to)
        placed = slots >= 0
        if not placed.all():
            self.table.release(slots[placed])
            raise ValueError(f"sensor table full: cannot import {int((~placed).sum())} sensors")
        for part in snap.PER_SENSOR_PARTS:
            if part == "horizon":  # step by step: the sender's horizon may differ
                self.horizon.adopt(slots, {k: v.numpy() for k, v in exported[part].items()},
                                   exported["horizon_steps"].numpy())
                continue
            for name, rows in exported[part].items():
                target = getattr(getattr(self, part), name)
                # SensorMemory.HORIZON_ONLY, the only shapes _check_importable lets differ,
                # stay fresh when the sender had no horizon, or this learner has none.
                if target.shape[1:] == rows.shape[1:]:
                    target[slots] = rows.numpy()
        self.state.place_rows(slots, exported["slot_tensors"], exported["seen"].numpy(),
                              exported["short"].numpy())
        return len(ids)

    def _check_importable(self, exported: dict) -> None:
        """ValueError, before any state changes, for an export whose per-sensor arrays have
        other shapes than this learner's (another snapshot format that skipped
        snapshot.upgrade): it would be half-imported. The memory's last readings per bucket
        and timing may differ (they exist only with a horizon), and so may the horizon."""
        for part in snap.PER_SENSOR_PARTS:
            if part == "horizon":
                continue
            for name, rows in exported[part].items():
                target = getattr(getattr(self, part), name)
                if (target.shape[1:] != rows.shape[1:]
                        and not (part == "memory" and name in SensorMemory.HORIZON_ONLY)):
                    raise ValueError(
                        f"cannot import {part}.{name} of shape {tuple(rows.shape)} into "
                        f"{tuple(target.shape)}: an export of another snapshot format")

    def drop_sensors(self, sensor_ids: list[str]) -> int:
        """Forget those sensors (a partition moved away); their slots become free."""
        slots = self.table.lookup(sensor_ids)
        slots = slots[slots >= 0]
        self.release(slots)
        return len(slots)

    @torch.no_grad()
    def _apply(self, batch: Batch, rows: np.ndarray, slots_all: np.ndarray,
               result: StepResult) -> None:
        """Advance the slots of accepted readings ``rows`` (arrival order) and forecast."""
        slots = slots_all[rows]
        g = group_by_slot(slots)
        pos = g.pos
        values, ts = batch.values[rows], batch.ts[rows]
        enc = self.stats.encode(slots, ts, values)
        cap = self.config.clip_z
        with np.errstate(over="ignore"):  # near the range limit: at the input limit
            deviation = np.clip((values - enc.level) / enc.scale, -cap, cap)
        after_spike = _previous(slots, g, enc.outlier, self.stats.last_outlier) > 0  # (M, F)
        mem = self.memory.advance(slots, ts, values, enc.spread, enc.next_gap, enc.targets,
                                  enc.has_prev, enc.outlier, self.config.horizon, enc.since,
                                  _read_for_a_day(self._n_before(slots, g), enc.next_gap),
                                  deviation, after_spike)
        features = np.concatenate([enc.features, self._seasonal_inputs(values, mem, enc)], 1)

        change = self._forward(slots, g, features, enc).clip(-cap, cap)  # (M, F)

        raw = np.where(enc.warm[:, None], enc.scale * change, 0.0)  # (M, F) predicted change
        reach = expert_reach(values, enc.prev_level, enc.prev_spread, enc.spread, enc.has_prev,
                             cap)  # (M, F)
        experts = expert_forecasts(values, raw, mem, enc.scale, reach, cap)  # (M, F, K)
        experts = np.where(enc.warm[:, None, None], experts, values[..., None])  # warm-up
        n_scored = self._n_scored(slots, g)
        # The value before each reading's previous one (before a spike, if that was one).
        before_prev = _previous(slots, g, enc.prev_value, self.stats.before_last_value)
        forecast, spread, naive_mae, base = self._aggregate(slots, g, values, experts, enc,
                                                            n_scored, before_prev, after_spike)
        # A spike not reverted: the next reading may well be back at the value before it, and
        # the interval spans that too (intervals.py), so that a one-off's return is not
        # flagged as a second anomaly. Kept as the spike's code (2; 1: reverted).
        reverted = base != values
        spike = np.where(enc.outlier, np.where(reverted, 1.0, 2.0), 0.0)  # (M, F)
        alt = np.where(spike == 2.0, enc.prev_value, np.nan)
        prev_alt = np.where(_previous(slots, g, spike, self.stats.last_outlier) == 2.0,
                            before_prev, np.nan)
        # Finite by construction (bounded inputs and statistics); should the weights ever go
        # non-finite, every valid reading still gets a number: persistence.
        forecast = np.where(np.isfinite(forecast), forecast, values)
        prev_forecast = _previous(slots, g, forecast, self.stats.last_forecast)
        scored = enc.target_valid  # the previous reading was past warm-up: a model forecast
        # Errors in units of the sensor's typical change, capped like the inputs so a jump out of
        # a flat stretch (a tiny scale) cannot swamp every other sensor's contribution.
        with np.errstate(over="ignore"):  # a reading near the range limit: capped, as meant
            model_err = np.minimum(np.abs(values - prev_forecast) / enc.prev_scale, cap)
            naive_err = np.minimum(np.abs(values - enc.prev_value) / enc.prev_scale, cap)
        result.forecasts[rows] = forecast
        result.update_count[rows] = self.updates
        result.model_error[rows] = np.where(scored, model_err.mean(axis=1), np.nan)
        result.persistence_error[rows] = np.where(scored, naive_err.mean(axis=1), np.nan)
        # Where each forecast lies in its sensor's range, now and (the same floats) then.
        level_z = level_position(forecast, enc.level, enc.spread)
        prev_level_z = level_position(prev_forecast, enc.prev_level, enc.prev_spread)
        cal = self.calibration.calibrate(slots, ts, enc.next_gap, values, enc.prev_value,
                                         prev_forecast, enc.prev_scale, scored, n_scored,
                                         forecast, enc.scale, spread, level_z, prev_level_z,
                                         enc.late,
                                         late_reach(prev_forecast, enc.prev_level, enc.prev_sd),
                                         _next_lateness(mem.next_ts, ts, enc.next_gap),
                                         late_reach(forecast, enc.level, enc.sd), prev_alt, alt)
        result.lower[rows], result.upper[rows] = cal.lower, cal.upper
        result.anomaly_score[rows], result.anomaly[rows] = cal.score, cal.anomaly
        result.inside[rows] = cal.inside
        # Width in units of the sensor's running persistence MAE: 2 is twice the typical error
        # of "no change" (floored: a sensor that never changed has none).
        unit = enc.scale * np.maximum(naive_mae, MIN_NAIVE_ERROR)
        result.interval_width[rows] = ((cal.upper - cal.lower) / unit).mean(axis=1)
        result.expected[rows] = np.where(scored[:, None], prev_forecast, np.nan)
        result.expected_lower[rows] = cal.expected_lower
        result.expected_upper[rows] = cal.expected_upper
        if result.horizon is not None:
            self._look_ahead(slots, g, values, ts, base, enc, mem, forecast, cal,
                             result.horizon, rows, reach)
        last = np.flatnonzero(pos == g.counts[g.member] - 1)
        self.stats.last_forecast[slots[last]] = forecast[last]
        self.stats.last_experts[slots[last]] = experts[last]
        self.stats.last_outlier[slots[last]] = spike[last]
        self.stats.before_last_value[slots[last]] = enc.prev_value[last]

    def _look_ahead(self, slots: np.ndarray, g: Groups, values: np.ndarray, ts: np.ndarray,
                    base: np.ndarray, enc: Encoded, mem: Recalled, forecast: np.ndarray,
                    cal: Calibrated, out: HorizonResult, rows: np.ndarray,
                    reach: np.ndarray) -> None:
        """Forecast the next H readings at each reading (horizon.py): reads the live state,
        changes none of it. ``base`` is the reading the steps start from: the value before a
        spike that step 1 expects to revert (experts.py), else the reading itself."""
        cfg = self.config
        experts = horizon_experts(base, forecast, enc.scale, reach, mem, cfg.clip_z)
        experts = np.where(enc.warm[:, None, None, None], experts, values[..., None, None])
        number = self._n_before(slots, g) + 1  # each reading's number in its slot
        ahead = self.horizon.forecast(slots, number, values, enc.warm, enc.outlier.any(axis=1),
                                      enc.scale, experts, forecast, cal.lower, cal.upper,
                                      cfg.expert_eta, max(cfg.guard_alpha, MIN_HORIZON_ALPHA),
                                      cfg.clip_z, _ahead_lateness(mem.ahead_ts, ts, enc.next_gap))
        out.forecast[rows], out.lower[rows], out.upper[rows] = (
            ahead.forecast, ahead.lower, ahead.upper)
        out.target_ts[rows] = mem.ahead_ts
        out.step_error[rows] = ahead.step_error

    def _forward(self, slots: np.ndarray, g: Groups, features: np.ndarray,
                 enc: Encoded) -> np.ndarray:
        """Advance each slot's LSTM state through its readings, recording them in its TBPTT
        windows; (M, F) the predicted changes, in change-scale units.

        The readings are cut where a slot's window ends (one LSTM call per part; usually one):
        the live state there is where the slot's next window starts.
        """
        dev = self.device
        part, step = self.state.place(slots, g.pos)  # (M,) window (0: the current), step in it
        x = torch.from_numpy(features)  # (M, D)
        targets, valid = torch.from_numpy(enc.targets), torch.from_numpy(enc.target_valid)
        change = torch.empty(len(slots), enc.targets.shape[1], device=dev)  # (M, F)
        by_part = np.argsort(part, kind="stable")  # arrival order within each part
        bounds = np.searchsorted(part[by_part], np.arange(int(part.max()) + 2))
        full, closed_by = [], []  # the windows this chunk fills, and the readings closing them
        for p in range(int(part.max()) + 1):
            rows = by_part[bounds[p] : bounds[p + 1]]
            if not len(rows):
                continue
            if p:  # each slot's first reading here completes its previous window
                first = rows[step[rows] == 0]
                full.append(self.state.close(slots[first], targets[first], valid[first]))
                closed_by.append(first)
            self.state.record(slots[rows], step[rows], x[rows], targets[rows], valid[rows])
            whole = len(rows) == len(slots)  # one part: the chunk's grouping holds
            change[torch.as_tensor(rows, device=dev)] = self._run_lstm(
                x[rows], g if whole else group_by_slot(slots[rows]))
        if full:  # queued in the order of the readings that closed them, however cut
            order = np.argsort(np.concatenate(closed_by), kind="stable")
            self.state.enqueue(WindowBatch.cat(full).take(order))
        return change.double().cpu().numpy()  # the one device->host copy of the chunk

    def _run_lstm(self, x: torch.Tensor, g: Groups) -> torch.Tensor:
        """One LSTM call over readings (M, D) in arrival order (grouped by ``g``), from and to
        the slots' live state; (M, F) the model's output at each."""
        dev = self.device
        seq = torch.zeros(len(g.distinct), g.n_pos, x.shape[1])  # (S, T, D)
        seq[g.member, g.pos] = x
        seq = seq.to(dev)
        index = torch.as_tensor(g.distinct, device=dev)
        state = (self.state.h[:, index], self.state.c[:, index])  # (L, S, H)
        if g.n_pos == 1:
            pred, (h, c) = self.model(seq, state)
        else:
            pred, (h, c) = self.model.forward_ragged(seq, g.counts, state)
        self.state.h[:, index], self.state.c[:, index] = h, c
        return pred[torch.as_tensor(g.member, device=dev), torch.as_tensor(g.pos, device=dev)]

    def _seasonal_inputs(self, values: np.ndarray, mem: Recalled, enc: Encoded) -> np.ndarray:
        """(M, 2F) the day and week seasonal forecasts relative to the last value, in units of
        the sensor's typical change (0 where the profile has nothing yet)."""
        cap = self.config.clip_z
        relative = (mem.seasonal - values[:, None]) / enc.scale[:, None]  # (M, 2, F)
        relative = np.nan_to_num(np.clip(relative, -cap, cap), nan=0.0)
        return relative.reshape(len(values), -1).astype(np.float32)

    def _n_before(self, slots: np.ndarray, g: Groups) -> np.ndarray:
        """(M,) readings each slot had before each reading here (stats.count is already past
        the chunk)."""
        return self.stats.count[slots] - g.counts[g.member] + g.pos

    def _n_scored(self, slots: np.ndarray, g: Groups) -> np.ndarray:
        """(M,) scored readings each slot has had up to and including each reading here."""
        return self._n_before(slots, g) - self.config.warmup_readings + 1

    def _aggregate(self, slots: np.ndarray, g: Groups, values: np.ndarray,
                   experts: np.ndarray, enc: Encoded,
                   n_scored: np.ndarray, before_prev: np.ndarray, after_spike: np.ndarray,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(M, F) forecasts: the experts weighed by how each did on this sensor, or a spike
        reverted to ``before_prev`` (M, F), the value before each reading's previous one
        (experts.py; ``after_spike`` (M, F): whether that previous one was a spike); (M, F)
        the experts' weighted spread around the weighted forecast, and (M, F) persistence's
        running mean absolute error, both in change scales (with the guard off, which keeps no
        running errors: 0 and 1, the change scale's RMS); (M, F) each reading, or the value
        before it where a spike is expected to revert."""
        if self.config.guard_alpha == 0.0:  # the LSTM's own forecast
            return experts[..., 0], np.zeros(values.shape), np.ones(values.shape), values
        stats = self.stats
        prev_experts = _previous(slots, g, experts, stats.last_experts)  # (M, F, K)
        # Capped like the quality metrics: one wild miss counts, but cannot decide alone.
        cap = self.config.clip_z
        with np.errstate(over="ignore"):  # (overflows only to be capped)
            errors = np.minimum(np.abs(values[..., None] - prev_experts)
                                / enc.prev_scale[..., None], cap)
        # After a spike: did "it was a one-off, back to the value before" beat persistence?
        gain = np.sign(np.abs(values - enc.prev_value) - np.abs(values - before_prev))
        weights, revert, running = weigh_experts(
            stats.guard_err, stats.revert_score, slots, errors, enc.target_valid, n_scored,
            self.config.guard_alpha, self.config.expert_eta, np.where(after_spike, gain, np.nan),
        )
        combined = (weights * experts).sum(axis=-1)
        # How much the experts disagree about the next reading (change scales): the intervals
        # widen with it (intervals.py).
        apart = np.clip((experts - combined[..., None]) / enc.scale[..., None], -cap, cap)
        spread = np.nan_to_num(np.sqrt((weights * apart**2).sum(axis=-1)), nan=0.0, posinf=cap)
        reverted = enc.outlier & revert
        forecast = np.where(reverted, enc.prev_value, combined)
        return forecast, spread, running[..., PERSISTENCE], np.where(reverted, enc.prev_value,
                                                                     values)

    # -- training -------------------------------------------------------------------------
    def _train(self, min_ready: int | None = None) -> UpdateStats | None:
        """One update over the queued windows (the oldest, at most MAX_WINDOWS_PER_UPDATE);
        None when fewer than ``min_ready`` are queued."""
        n = len(self.state.queue)
        if not n or n < (self._min_ready() if min_ready is None else min_ready):
            return None
        with torch.enable_grad():
            return self.trainer.update(self.state.take_queued(MAX_WINDOWS_PER_UPDATE))

    def train_now(self) -> UpdateStats | None:
        """Run an update immediately (tests and offline tools; the stream never needs it)."""
        return self._train(min_ready=1)


def _read_for_a_day(n_before: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """(M,) whether a sensor with ``n_before`` readings before this one, ``gap`` seconds apart
    typically, has been read for about a day: from then on the hours it never reports in are
    known."""
    return n_before * gap >= SECONDS_PER_DAY


def _next_lateness(expected_ts: np.ndarray, ts: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """(M,) how many typical gaps ``gap`` after each reading at ``ts`` the next one is expected
    (``expected_ts``, memory.py: past the hours the sensor never reports in); 1 where unknown."""
    with np.errstate(invalid="ignore", divide="ignore"):
        late = (expected_ts - ts) / gap
    # Exactly 1 where no hour was skipped ((ts + gap) - ts is gap rounded to ts's precision).
    return np.where(np.isfinite(late) & (expected_ts != ts + gap), late, 1.0)


def _ahead_lateness(ahead_ts: np.ndarray, ts: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """(M, H) how many typical gaps ``gap`` later than k gaps after each reading at ``ts`` its
    k-th next reading is expected (``ahead_ts``, memory.py: past the hours the sensor never
    reports in); 0 where unknown."""
    k = np.arange(1, ahead_ts.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        late = (ahead_ts - ts[:, None]) / gap[:, None] - k
    return np.where(np.isfinite(late), np.maximum(late, 0.0), 0.0)


@kernel
def _after_newest(slots, ts, before, last_ts, ok):  # pragma: no cover - compiled
    """ok[i]: ts[i] is after the newest of its slot's ``last_ts`` and its earlier readings
    here (``before[i]``: the same slot's reading just before, -1 if none)."""
    newest = np.empty(len(slots))
    for i in range(len(slots)):
        prior = last_ts[slots[i]] if before[i] < 0 else newest[before[i]]
        ok[i] = ts[i] > prior
        newest[i] = max(prior, ts[i])


def _previous(slots: np.ndarray, g: Groups, current: np.ndarray,
              stored: np.ndarray) -> np.ndarray:
    """For each reading, its slot's value at the reading before: ``current`` at the same slot's
    previous reading in this chunk, else ``stored`` (left by an earlier chunk)."""
    prev = stored[slots].copy()
    later = np.flatnonzero(g.before >= 0)
    prev[later] = current[g.before[later]]
    return prev
