"""The learner's snapshot format: versions, compatibility, bytes, and per-sensor extracts.

A snapshot is a tree of CPU tensors and plain data (``Learner.snapshot``); loading bytes never
runs code. The learner itself takes and loads snapshots and moves sensors in and out
(``Learner.snapshot/load/restore/import_sensors/drop_sensors``): this module knows the format,
not the learner's attributes."""

from __future__ import annotations

import io
import threading

import torch

from streamer.core.config import LearnerConfig
from streamer.core.experts import N_EXPERTS, PERSISTENCE
from streamer.core.horizon import HORIZON_EXPERTS, N_HORIZON_EXPERTS, HorizonState
from streamer.core.intervals import (
    BUCKET_SHIFT,
    LEVEL_WEIGHT,
    MAX_FAST_RUN,
    MAX_PROFILE_WEIGHT,
    MAX_SPREAD,
    MAX_SPREAD_WEIGHT,
    SPREAD_STEPS,
    WEIGHT_STEPS,
    Calibration,
    level_weight_codes,
    tail_codes,
    weight_codes,
)
from streamer.core.memory import AR_INPUTS, CYCLE_KEPT, CYCLE_LAGS
from streamer.core.windows import slot_axis, stagger

# 2: guard and spike state in the stats; 3: spreads as deviations (sd, change_rms), and the
# per-sensor memory (seasonal profiles, AR) and experts; 4: windows that follow each other
# without a gap, and the queue of full windows waiting for an update; 5: interval and anomaly
# calibration; 6: the horizon's state (weights, pending forecasts, intervals of steps 2..H) and
# the memory's last readings per bucket (both empty with a horizon of 1); 7: how much shorter
# than the others each slot's first window is (windows.SlotTensors.stagger); 8: how many outliers
# in a row each sensor's changes have been (normalizer.ESCALATE_AFTER), and the calibration's
# last_bucket holds a run count above its 3 bucket bits (intervals.RECOVERY_RUN); 9: the
# calibration's experts' spread in uint16 steps and a per-feature count of equal readings in a
# row (intervals.FLAT_RUN) beside the per-sensor one; 10: only the per-feature counts, int16
# (the sensor's is their least), as ``repeat_run``; 11: the width's weights of the experts'
# spread and of the error profile learned per sensor and feature (``spread_weight``,
# ``profile_weight``), and the tail's moments as int16 log2 codes; 12: the memory's cycles
# (``cycle``, ``cycle_err``, ``cycle_n``) and a twelfth expert, "cycle", in the stats' experts;
# 13: a tenth horizon expert, "cycle" (the horizon's ``err`` and ``pending``); 14: the width's
# weight of the forecast's place in the sensor's range (``level_weight``); 15: the calibration's
# last_bucket keeps its run count in 2 bits (saturating at intervals.RECOVERY_RUN) and above it
# the code of how late the next reading is expected (intervals.LATE_SHIFT); 16: a tail per side
# (``tail``, ``tail_sq``: (C, F, 2), below and above) and the two repeat shares as uint16 codes
# in one (C, 2) ``repeat``. Within 16, the stats' ``last_outlier`` holds 2 (no longer only 1)
# for a spike whose forecast followed it (intervals._spanning); a 1 from before reads as a
# spike reverted, whose interval did not span, as published: either code reads either way.
# 17: the memory's pull to the level (a fourth column of ``ar_x`` and ``ar_w``: the deviation and
# its weight) and its expert, "level pull", the stats' thirteenth and the horizon's eleventh.
FORMAT = "streamer.learner/17"
PREVIOUS_FORMATS = ("streamer.learner/4", "streamer.learner/5", "streamer.learner/6",
                    "streamer.learner/7", "streamer.learner/8", "streamer.learner/9",
                    "streamer.learner/10", "streamer.learner/11",
                    "streamer.learner/12", "streamer.learner/13",
                    "streamer.learner/14", "streamer.learner/15",
                    "streamer.learner/16")  # read through upgrade()
# Until format 11 every sensor's width weighed the experts' spread by 2 and the profile by 1:
# upgraded sensors keep those, which their quantiles were learned with, and go on from there.
FIXED_SPREAD_WEIGHT, FIXED_PROFILE_WEIGHT = 2.0, 1.0


# The learner's per-slot host arrays (row i: slot i) that move with a sensor.
PER_SENSOR_PARTS = ("stats", "memory", "calibration", "horizon")


try:  # the save-time switches of torch's serialization (recent torch versions)
    from torch.utils.serialization import config as _serialization_config

    _SAVE_CONFIG = _serialization_config.save
except ImportError:  # pragma: no cover - older torch: always with CRC-32
    _SAVE_CONFIG = None
_SAVE_LOCK = threading.Lock()


class IncompatibleSnapshot(ValueError):
    """The snapshot was made by a learner whose tensors mean something else."""


def upgrade(state: dict) -> dict:
    """A snapshot of an earlier format (4: before interval calibration; 5: before horizons;
    6: before staggered first windows; 7: before outlier runs; 8: spread as float32, one
    repeat run per sensor; 9: repeat runs per sensor and per feature; 10: fixed weights of the
    width, tail moments as float32; 11: before cycles; 12: before the horizon's cycle; 13:
    before the level's weight of the width; 14: before the late code; 15: one tail for both
    sides, repeat shares as float32; 16: before the pull to the level) in this one: what it
    lacks starts from the prior, as for new sensors (calibration; a horizon of one step; no
    outlier run; each feature's repeat run the sensor's; no cycle seen and no pull learned,
    the new experts' records persistence's; the level's weight 0, the width of before), or
    from what the older version used (the width's other weights); the windows being filled
    keep their full length, free slots stagger as in a new learner; weights, statistics and
    memory carry over. Any other format is returned as it is
    (``check_compatible`` names it)."""
    if not isinstance(state, dict) or state.get("format") not in PREVIOUS_FORMATS:
        return state
    stats = state["stats"]
    if "outlier_run" not in stats:  # before 8
        runs = torch.zeros(stats["mean"].shape, dtype=torch.uint8)
        state = {**state, "stats": {**stats, "outlier_run": runs}}
    calibration = state.get("calibration")
    if calibration is not None and calibration["repeat_run"].dim() == 1:  # 5 to 9
        calibration = dict(calibration)
        if "flat_run" in calibration:  # 9: the per-feature counts were kept apart
            runs = calibration.pop("flat_run").to(torch.int16)
        else:  # 5 to 8: every feature's run is the sensor's
            spread = calibration["spread"].double().clamp(0.0, MAX_SPREAD)
            calibration["spread"] = torch.round(spread * (SPREAD_STEPS / MAX_SPREAD)).to(
                torch.int32)
            runs = calibration["repeat_run"][:, None].expand(spread.shape).clone()
        state = {**state, "calibration": {**calibration, "repeat_run": runs}}
    if stats["guard_err"].shape[-1] < N_EXPERTS:  # before 17: no level pull (12: no cycle)
        state = {**state, "stats": _with_new_experts(state["stats"])}
    if "cycle" not in state["memory"]:  # before 12
        state = {**state, "memory": _with_cycles(state["memory"])}
    if state["memory"]["ar_w"].shape[-1] < AR_INPUTS:  # before 17
        state = {**state, "memory": _with_level_pull(state["memory"])}
    horizon = state.get("horizon")
    if horizon is not None and horizon["err"].shape[-1] < N_HORIZON_EXPERTS:  # 6 to 16
        state = {**state, "horizon": _with_new_horizon_experts(horizon)}
    calibration = state.get("calibration")
    if calibration is not None and "spread_weight" not in calibration:  # 5 to 10
        state = {**state, "calibration": _with_fixed_weights(calibration)}
    calibration = state.get("calibration")
    if calibration is not None and "level_weight" not in calibration:  # 5 to 13
        shape = tuple(calibration["q_hi"].shape)
        state = {**state, "calibration": {**calibration, "level_weight": torch.from_numpy(
            level_weight_codes(LEVEL_WEIGHT, shape))}}
    calibration = state.get("calibration")
    if calibration is not None and _version(state) <= 14:  # 5 to 14: a run count of up to 31
        # above the bucket, no code
        last = calibration["last_bucket"].to(torch.int32)
        runs = torch.clamp(last >> BUCKET_SHIFT, max=MAX_FAST_RUN)
        state = {**state, "calibration": {**calibration, "last_bucket": (
            (last & ((1 << BUCKET_SHIFT) - 1)) | (runs << BUCKET_SHIFT)).to(torch.uint8)}}
    calibration = state.get("calibration")
    if calibration is not None and calibration["tail"].dim() == 2:  # 5 to 15
        state = {**state, "calibration": _with_two_tails(calibration)}
    if _version(state) >= 7:
        return {**state, "format": FORMAT}  # 7 and later lack nothing more
    ids = state["table"]["ids"]
    k = int(state["config"].get("tbptt_steps", LearnerConfig.tbptt_steps))
    free = torch.tensor([i is None for i in ids], dtype=torch.bool)
    short = torch.where(free, torch.from_numpy(stagger(range(len(ids)), k)), 0)
    if _version(state) == 6:
        return {**state, "format": FORMAT, "short": short}
    config = {**LearnerConfig().to_dict(), **state["config"], "horizon": 1}
    capacity, n_features = len(state["stats"]["count"]), int(config["n_features"])
    upgraded = {**state, "format": FORMAT, "config": config, "short": short}
    if "calibration" not in state:
        fresh = Calibration(capacity, n_features, float(config["coverage"]),
                            float(config["anomaly_threshold"]),
                            int(config["anomaly_learn_after"]))
        upgraded["calibration"] = _tensors(fresh.arrays())
    horizon = HorizonState(capacity, n_features, 1, float(config["coverage"]))
    upgraded["horizon"] = _tensors(horizon.arrays())
    upgraded["horizon_steps"] = torch.from_numpy(horizon.steps.copy())
    return upgraded


def _with_new_experts(stats: dict) -> dict:
    """Stats of format 16 or before: the experts added since (the cycle in 12, the level pull in
    17) start with persistence's running error and last forecast (their forecast until a sensor
    has a cycle, or a pull learned)."""
    missing = N_EXPERTS - stats["guard_err"].shape[-1]
    return {**stats, **{
        name: torch.cat([stats[name], stats[name][..., [PERSISTENCE] * missing]], -1)
        for name in ("guard_err", "last_experts")}}


def _with_new_horizon_experts(horizon: dict) -> dict:
    """A horizon of format 16 or before: the experts added since (the cycle in 13, the level
    pull in 17) start with persistence's running errors and pending forecasts."""
    persistence = HORIZON_EXPERTS.index("persistence")
    err, pending = horizon["err"], horizon["pending"]
    k = err.shape[-1]
    missing = N_HORIZON_EXPERTS - k
    return {**horizon,
            "err": torch.cat([err, err[..., [persistence] * missing]], -1),
            "pending": torch.cat([pending[..., :k], pending[..., [persistence] * missing],
                                  pending[..., k:]], -1)}


def _with_cycles(memory: dict) -> dict:
    """Memory of format 11 or before: no cycle seen yet."""
    capacity, n_features = memory["profile"].shape[:2]
    return {**memory,
            "cycle": torch.zeros((capacity, n_features, CYCLE_KEPT), dtype=torch.float32),
            "cycle_err": torch.zeros((capacity, n_features, CYCLE_LAGS - 1), dtype=torch.float32),
            "cycle_n": torch.zeros(capacity, dtype=torch.int32)}


def _with_level_pull(memory: dict) -> dict:
    """Memory of format 16 or before: no pull to the level learned yet (weight 0: its forecast
    is persistence's, as its expert's record starts)."""
    return {**memory, **{
        name: torch.cat([memory[name], torch.zeros(
            (*memory[name].shape[:-1], AR_INPUTS - memory[name].shape[-1]),
            dtype=memory[name].dtype)], -1)
        for name in ("ar_x", "ar_w")}}


def _with_fixed_weights(calibration: dict) -> dict:
    """A calibration of format 10 or before in format 11 (see FIXED_SPREAD_WEIGHT)."""
    shape = tuple(calibration["q_hi"].shape)
    return {
        **calibration,
        "tail": torch.from_numpy(tail_codes(calibration["tail"].numpy())),
        "tail_sq": torch.from_numpy(tail_codes(calibration["tail_sq"].numpy())),
        "spread_weight": torch.from_numpy(
            weight_codes(FIXED_SPREAD_WEIGHT, MAX_SPREAD_WEIGHT, shape)),
        "profile_weight": torch.from_numpy(
            weight_codes(FIXED_PROFILE_WEIGHT, MAX_PROFILE_WEIGHT, shape)),
    }


def _version(state: dict) -> int:
    """The N of a snapshot's format "streamer.learner/N"."""
    return int(state["format"].rsplit("/", 1)[1])


def _with_two_tails(calibration: dict) -> dict:
    """A calibration of format 15 or before in format 16: both sides start from the one tail
    both shared; the two repeat shares, side by side, rounded to their codes."""
    def share_codes(shares: torch.Tensor) -> torch.Tensor:
        codes = torch.round(shares.double().clamp(0.0, 1.0) * WEIGHT_STEPS)
        return codes.to(torch.int32).to(torch.uint16)

    rest = {k: v for k, v in calibration.items() if k != "repeat_again"}
    return {
        **rest,
        "tail": calibration["tail"][..., None].expand(-1, -1, 2).clone(),
        "tail_sq": calibration["tail_sq"][..., None].expand(-1, -1, 2).clone(),
        "repeat": share_codes(torch.stack([calibration["repeat"], calibration["repeat_again"]],
                                          dim=1)),
    }


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


def save(state: dict, handle) -> None:
    """Write ``state`` to ``handle``, a writable binary file object (what ``dumps`` returns,
    without the bytes).

    Through a Python file, whose writes release the interpreter lock during each system call
    (torch's own file writer keeps it for the whole file), and without the zip format's CRC-32
    (the checkpoint's manifest holds a SHA-256 of the file): while a thread writes a 340 MB
    snapshot, a serving thread beside it measured 48-58k readings/s that way against
    90-95k/s this way (184k/s undisturbed, tests/bench_checkpoint.py's machine)."""
    with _SAVE_LOCK:  # the switch is process-wide: one save flips it at a time
        crc = _SAVE_CONFIG.compute_crc32 if _SAVE_CONFIG is not None else None
        try:
            if _SAVE_CONFIG is not None:
                _SAVE_CONFIG.compute_crc32 = False
            torch.save(state, handle)
        finally:
            if _SAVE_CONFIG is not None:
                _SAVE_CONFIG.compute_crc32 = crc


def loads(data: bytes) -> dict:
    """Parse snapshot bytes; ``weights_only=True`` refuses anything but tensors and plain data."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def copied(tree, reuse=None):
    """A CPU copy of a tree of tensors and plain data (dicts, lists, tuples, scalars).

    A tensor is copied into ``reuse``'s tensor at the same place when that has its shape and
    dtype: a checkpoint every few seconds then writes into memory it already touched instead of
    page-faulting hundreds of fresh megabytes at 100k sensors (measured: 350 ms -> 80 ms). The
    caller owns ``reuse``: nothing else may read it while it is overwritten.
    """
    if isinstance(tree, torch.Tensor):
        if (isinstance(reuse, torch.Tensor) and reuse.shape == tree.shape
                and reuse.dtype == tree.dtype and reuse.device.type == "cpu"):
            return reuse.copy_(tree.detach())
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        old = reuse if isinstance(reuse, dict) else {}
        return {k: copied(v, old.get(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        if not any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in tree):
            return type(tree)(tree)  # plain values (a slot table's ids): a shallow copy
        old = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(tree) else ()
        return type(tree)(copied(v, old[i] if old else None) for i, v in enumerate(tree))
    return tree


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
        "short": state["short"].index_select(0, slots),
        "horizon_steps": state["horizon_steps"],
    }
