"""Snapshots of the whole learner as tensors plus plain data; loading never runs code."""

from __future__ import annotations

import io

import torch

from streamer.core.config import LearnerConfig
from streamer.core.horizon import HorizonState
from streamer.core.intervals import Calibration
from streamer.core.learner import Learner
from streamer.core.slots import SlotTable
from streamer.core.windows import slot_axis

# 2: guard and spike state in the stats; 3: spreads as deviations (sd, change_rms), and the
# per-sensor memory (seasonal profiles, AR) and experts; 4: windows that follow each other
# without a gap, and the queue of full windows waiting for an update; 5: interval and anomaly
# calibration; 6: the horizon's state (weights, pending forecasts, intervals of steps 2..H) and
# the memory's last readings per bucket (both empty with a horizon of 1).
FORMAT = "streamer.learner/6"
PREVIOUS_FORMATS = ("streamer.learner/4", "streamer.learner/5")  # read through upgrade()


# The learner's per-slot host arrays (row i: slot i) that move with a sensor.
PER_SENSOR_PARTS = ("stats", "memory", "calibration", "horizon")


class IncompatibleSnapshot(ValueError):
    """The snapshot was made by a learner whose tensors mean something else."""


def snapshot(learner: Learner) -> dict:
    """Everything needed to continue exactly where ``learner`` is, on the CPU."""
    cpu = {name: t.detach().cpu().clone() for name, t in learner.state.tensors().items()}
    return {
        "format": FORMAT,
        "fingerprint": learner.config.fingerprint(),
        "config": learner.config.to_dict(),
        "model": {k: v.detach().cpu().clone() for k, v in learner.model.state_dict().items()},
        "optimizer": _to_cpu(learner.trainer.optimizer.state_dict()),
        "table": learner.table.to_plain(),
        "stats": {k: torch.from_numpy(v.copy()) for k, v in learner.stats.arrays().items()},
        "memory": {k: torch.from_numpy(v.copy()) for k, v in learner.memory.arrays().items()},
        "calibration": {k: torch.from_numpy(v.copy())
                        for k, v in learner.calibration.arrays().items()},
        "horizon": {k: torch.from_numpy(v.copy()) for k, v in learner.horizon.arrays().items()},
        "horizon_steps": torch.from_numpy(learner.horizon.steps.copy()),
        "slot_tensors": cpu,
        "seen": torch.from_numpy(learner.state.seen.copy()),
        "queue": {k: v.detach().cpu().clone() for k, v in learner.state.queue.tensors().items()},
        "counters": {
            "accepted_total": learner.accepted_total,
            "event_time": float(learner.event_time),
            "attempts": learner.trainer.attempts,
            "applied": learner.trainer.applied,
        },
    }


def restore(state: dict, config: LearnerConfig) -> Learner:
    """A learner that continues exactly as the one ``state`` was taken from."""
    check_compatible(state, config)
    learner = Learner(config)
    learner.model.load_state_dict(state["model"])
    learner.trainer.optimizer.load_state_dict(state["optimizer"])
    learner.table = SlotTable.from_plain(state["table"], config.max_sensors)
    learner.stats.load_arrays({k: v.numpy() for k, v in state["stats"].items()})
    learner.memory.load_arrays({k: v.numpy() for k, v in state["memory"].items()})
    learner.calibration.load_arrays({k: v.numpy() for k, v in state["calibration"].items()})
    learner.horizon.load_arrays({k: v.numpy() for k, v in state["horizon"].items()},
                                state["horizon_steps"].numpy())
    learner.state.load_tensors(state["slot_tensors"], state["seen"].numpy(), state["queue"])
    counters = state["counters"]
    learner.accepted_total = int(counters["accepted_total"])
    learner.event_time = float(counters["event_time"])
    learner.trainer.attempts = int(counters["attempts"])
    learner.trainer.applied = int(counters["applied"])
    return learner


def upgrade(state: dict) -> dict:
    """A snapshot of an earlier format (4: before interval calibration; 5: before horizons) in
    this one: what it lacks starts from the prior, as for new sensors (calibration; a horizon of
    one step); weights, statistics and memory carry over. Any other format is returned as it
    is (``check_compatible`` names it)."""
    if not isinstance(state, dict) or state.get("format") not in PREVIOUS_FORMATS:
        return state
    config = {**LearnerConfig().to_dict(), **state["config"], "horizon": 1}
    capacity, n_features = len(state["stats"]["count"]), int(config["n_features"])
    upgraded = {**state, "format": FORMAT, "config": config}
    if "calibration" not in state:
        fresh = Calibration(capacity, n_features, float(config["coverage"]),
                            float(config["anomaly_threshold"]),
                            int(config["anomaly_learn_after"]))
        upgraded["calibration"] = _tensors(fresh.arrays())
    horizon = HorizonState(capacity, n_features, 1, float(config["coverage"]))
    upgraded["horizon"] = _tensors(horizon.arrays())
    upgraded["horizon_steps"] = torch.from_numpy(horizon.steps.copy())
    return upgraded


def _tensors(arrays: dict) -> dict:
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


def check_compatible(state: dict, config: LearnerConfig) -> None:
    """Raise IncompatibleSnapshot with a message naming what differs."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise IncompatibleSnapshot(f"not a learner snapshot of format {FORMAT}: found {found!r}")
    if state["fingerprint"] != config.fingerprint():
        theirs = state["config"]
        diffs = [
            f"{name}: snapshot {theirs.get(name)!r} vs config {getattr(config, name)!r}"
            for name in LearnerConfig.SHAPE_FIELDS
            if theirs.get(name) != getattr(config, name)
        ]
        detail = "; ".join(diffs) or "input layout version differs"
        raise IncompatibleSnapshot(f"snapshot was made with an incompatible config ({detail})")
    if len(state["table"]["ids"]) > config.max_sensors:
        raise IncompatibleSnapshot(
            f"snapshot holds {len(state['table']['ids'])} slots but max_sensors is "
            f"{config.max_sensors}"
        )


def dumps(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def loads(data: bytes) -> dict:
    """Parse snapshot bytes; ``weights_only=True`` refuses anything but tensors and plain data."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj





def import_sensors(learner: Learner, exported: dict) -> int:
    """Give each exported sensor a slot (replacing any state it had here); returns the count."""
    ids = list(exported["ids"])
    if not ids:
        return 0
    drop_sensors(learner, ids)
    slots, grew_to = learner.table.allocate(ids)
    if grew_to is not None:
        learner.grow(grew_to)
    placed = slots >= 0
    if not placed.all():
        missing = [s for s, ok in zip(ids, placed.tolist()) if not ok]
        learner.table.release(slots[placed])
        raise ValueError(f"sensor table full: cannot import {len(missing)} sensors")
    for part in PER_SENSOR_PARTS:
        if part == "horizon":  # step by step: the sender's horizon may differ
            learner.horizon.adopt(slots, {k: v.numpy() for k, v in exported[part].items()},
                                  exported["horizon_steps"].numpy())
            continue
        for name, rows in exported[part].items():
            target = getattr(getattr(learner, part), name)
            # The memory's last readings per bucket exist only with a horizon: they stay
            # fresh when the sender had none, or this learner has none.
            if target.shape[1:] == rows.shape[1:]:
                target[slots] = rows.numpy()
    index = torch.as_tensor(slots, device=learner.device)
    for name, rows in exported["slot_tensors"].items():
        target = getattr(learner.state, name)
        if slot_axis(name) == 1:
            target[:, index] = rows.to(learner.device)
        else:
            target[index] = rows.to(learner.device)
    learner.state.seen[slots] = exported["seen"].numpy()
    return len(ids)


def drop_sensors(learner: Learner, sensor_ids: list[str]) -> int:
    """Forget those sensors (a partition moved away); their slots become free."""
    slots = learner.table.lookup(sensor_ids)
    slots = slots[slots >= 0]
    learner.release(slots)
    return len(slots)


def sensors_of(state: dict, sensor_ids: list[str]) -> dict:
    """The per-sensor state (statistics, memory, calibration, LSTM state, window being filled)
    of those ids in a saved snapshot, in the form ``import_sensors`` takes. Their full windows
    still queued for an update stay behind: training data for the old owner's model, not
    sensor state."""
    position = {s: i for i, s in enumerate(state["table"]["ids"]) if s is not None}
    wanted = [s for s in sensor_ids if s in position]
    slots = torch.as_tensor([position[s] for s in wanted], dtype=torch.long)
    tensors = {}
    for name, tensor in state["slot_tensors"].items():
        axis = slot_axis(name)
        tensors[name] = tensor.index_select(axis, slots)
    return {
        "ids": wanted,
        **{part: {k: v.index_select(0, slots) for k, v in state[part].items()}
           for part in PER_SENSOR_PARTS},
        "slot_tensors": tensors,
        "seen": state["seen"].index_select(0, slots),
        "horizon_steps": state["horizon_steps"],
    }
