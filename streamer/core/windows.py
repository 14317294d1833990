"""Per-slot device tensors: the live LSTM state, each slot's truncated-BPTT window being filled,
and the queue of full windows waiting for an update."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WindowBatch:
    """n full windows of k steps, stacked (the queue, or the part of it one update trains)."""

    slots: np.ndarray  # (n,) the slot each window came from
    inputs: torch.Tensor  # (n, k, D)
    targets: torch.Tensor  # (n, k, F)
    mask: torch.Tensor  # (n, k, F) 1.0 where the target counts
    h0: torch.Tensor  # (L, n, H) detached state at window start
    c0: torch.Tensor  # (L, n, H)

    def __len__(self) -> int:
        return len(self.slots)

    def take(self, index: np.ndarray) -> WindowBatch:
        """The windows at ``index``, in that order."""
        i = torch.as_tensor(index, dtype=torch.long, device=self.inputs.device)
        return WindowBatch(self.slots[index], self.inputs[i], self.targets[i], self.mask[i],
                           self.h0[:, i], self.c0[:, i])

    @staticmethod
    def cat(parts: list[WindowBatch]) -> WindowBatch:
        """The windows of ``parts``, one after the other."""
        def joined(name: str, axis: int = 0) -> torch.Tensor:
            return torch.cat([getattr(w, name) for w in parts], axis)

        return WindowBatch(np.concatenate([w.slots for w in parts]), joined("inputs"),
                           joined("targets"), joined("mask"), joined("h0", 1), joined("c0", 1))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"slots": torch.from_numpy(self.slots.copy()), "inputs": self.inputs,
                "targets": self.targets, "mask": self.mask, "h0": self.h0, "c0": self.c0}


class WindowQueue:
    """Full windows waiting for an update, oldest first, in buffers grown on demand.

    Holds at most ``limit`` windows: should updates stop (training switched off), the oldest
    are dropped rather than memory growing without bound.
    """

    def __init__(self, num_layers: int, hidden: int, k: int, n_inputs: int, n_features: int,
                 device: torch.device, limit: int):
        self.dims = (num_layers, hidden, k, n_inputs, n_features)
        self.device, self.limit, self.n = device, limit, 0
        self._allocate(0)

    def _allocate(self, capacity: int) -> None:
        layers, hidden, k, d, f = self.dims
        z = {"device": self.device, "dtype": torch.float32}
        old = self.view() if self.n else None
        self.slots = np.zeros(capacity, dtype=np.int64)
        self.inputs = torch.zeros(capacity, k, d, **z)
        self.targets = torch.zeros(capacity, k, f, **z)
        self.mask = torch.zeros(capacity, k, f, **z)
        self.h0 = torch.zeros(layers, capacity, hidden, **z)
        self.c0 = torch.zeros(layers, capacity, hidden, **z)
        if old is not None:
            self._write(0, old)

    def __len__(self) -> int:
        return self.n

    def view(self) -> WindowBatch:
        """The queued windows (views: writing to them writes to the queue)."""
        n = self.n
        return WindowBatch(self.slots[:n], self.inputs[:n], self.targets[:n], self.mask[:n],
                           self.h0[:, :n], self.c0[:, :n])

    def _write(self, at: int, w: WindowBatch) -> None:
        end = at + len(w)
        self.slots[at:end] = w.slots
        self.inputs[at:end], self.targets[at:end], self.mask[at:end] = w.inputs, w.targets, w.mask
        self.h0[:, at:end], self.c0[:, at:end] = w.h0, w.c0

    def push(self, w: WindowBatch) -> None:
        """Append ``w``; beyond ``limit`` the oldest windows are dropped."""
        if len(w) >= self.limit:
            self.n = 0
            w = w.take(np.arange(len(w) - self.limit, len(w)))
        elif self.n + len(w) > self.limit:
            self.keep(np.arange(self.n + len(w) - self.limit, self.n))
        if self.n + len(w) > len(self.slots):
            self._allocate(min(self.limit, max(2 * len(self.slots), self.n + len(w), 64)))
        self._write(self.n, w)
        self.n += len(w)

    def keep(self, index: np.ndarray) -> None:
        """Keep only the queued windows at ``index``, in that order."""
        kept = self.view().take(index)
        self.n = 0
        self._write(0, kept)
        self.n = len(kept)

    def take(self, limit: int) -> WindowBatch:
        """Remove and return the oldest ``limit`` windows."""
        n = min(limit, self.n)
        taken = self.view().take(np.arange(n))
        if n == self.n:
            self.n = 0
        else:
            self.keep(np.arange(n, self.n))
        return taken

    def load(self, w: WindowBatch) -> None:
        self.n = 0
        self._allocate(len(w))
        self.push(w)


# Slots whose first windows end together (windows.SlotTensors.stagger): a fleet smaller than
# this is not staggered at all. Within a micro-batch a window ending cuts the slots' readings
# into LSTM calls of different lengths, one call per distinct length (model.forward_ragged):
# staggering every slot made a 26-sensor fleet replay 2x slower (appliances 103k -> 50k
# readings/s) and a 20-sensor one 4x, while a small fleet's windows filling together cost
# nothing worth spreading. 64 is also the most windows an update waits for (MIN_READY_MAX).
STAGGER_GROUP = 64


def stagger(slots: np.ndarray, k: int) -> np.ndarray:
    """How many steps shorter than ``k`` the first window of a sensor new in ``slots`` is:
    each run of STAGGER_GROUP consecutive slots (sensors that arrived together) one value, the
    runs taking every value in turn."""
    return np.asarray(slots, dtype=np.int64) // STAGGER_GROUP % k

# Tensors laid out (L, capacity, H): their slot axis is 1; every other per-slot tensor's is 0.
STATE_TENSORS = ("h", "c", "h0", "c0")


def slot_axis(name: str) -> int:
    """The axis that indexes slots in the per-slot tensor ``name``."""
    return 1 if name in STATE_TENSORS else 0


class SlotTensors:
    """Live state ``h``, ``c`` (L, capacity, H), windows being filled, and full windows queued.

    A slot's readings are cut into consecutive windows of ``k`` steps, none dropped: the
    reading at step ``j`` since the window start stores its input at step ``j`` and supplies the
    target of step ``j - 1``. The reading after the k-th supplies the window's last target and
    is the first step of the next window; the window then joins the queue with the state it
    started from, and the next one starts from the live state at that point. ``seen`` (C,)
    counts the inputs of each slot's current window (its length: full, waiting for its last
    target).

    A slot's first window is ``short`` (C,) steps shorter than ``k`` (``stagger``: 0 to k-1,
    the same for each run of STAGGER_GROUP slots), its unused last steps masked out; every
    later window has k steps. A large fleet whose sensors start together at one rate would
    otherwise fill all its windows at the same moment, every k readings per sensor: at 100k
    sensors one sweep of the fleet then carried every update (11 s of CPU against 0.6 s for the
    other sweeps, measured), and the forecasts queued behind it. Steps after a window's real
    ones change nothing before them (the LSTM is causal, their loss is masked), so a short
    window trains exactly as a window of its own length would.
    """

    _TENSORS = ("h", "c", "h0", "c0", "inputs", "targets", "mask")

    def __init__(self, capacity: int, num_layers: int, hidden: int, k: int, n_inputs: int,
                 n_features: int, device: torch.device, limit: int):
        self.shape = (num_layers, hidden, k, n_inputs, n_features)
        self.device = device
        self.seen = np.zeros(0, dtype=np.int64)
        self.short = np.zeros(0, dtype=np.int64)
        self.grow(capacity)
        self._queue = WindowQueue(num_layers, hidden, k, n_inputs, n_features, device, limit)

    def _empty(self, capacity: int) -> dict[str, torch.Tensor]:
        layers, hidden, k, d, f = self.shape
        z = {"device": self.device, "dtype": torch.float32}
        return {
            "h": torch.zeros(layers, capacity, hidden, **z),
            "c": torch.zeros(layers, capacity, hidden, **z),
            "h0": torch.zeros(layers, capacity, hidden, **z),
            "c0": torch.zeros(layers, capacity, hidden, **z),
            "inputs": torch.zeros(capacity, k, d, **z),
            "targets": torch.zeros(capacity, k, f, **z),
            "mask": torch.zeros(capacity, k, f, **z),
        }

    @property
    def queue(self) -> WindowBatch:
        """The full windows waiting for an update, oldest first (views into the queue)."""
        return self._queue.view()

    def grow(self, capacity: int) -> None:
        """Enlarge to ``capacity`` slots; existing values are copied bitwise."""
        old = len(self.seen)
        fresh = self._empty(capacity)
        for name, tensor in fresh.items():
            if old:
                current = getattr(self, name)
                if slot_axis(name) == 1:
                    tensor[:, :old] = current
                else:
                    tensor[:old] = current
            setattr(self, name, tensor)
        seen = np.zeros(capacity, dtype=np.int64)
        seen[:old] = self.seen
        self.seen = seen
        self.short = np.concatenate([self.short, self.stagger(np.arange(old, capacity))])

    def stagger(self, slots: np.ndarray) -> np.ndarray:
        return stagger(slots, self.shape[2])

    def reset(self, slots: np.ndarray) -> None:
        """Zero the state and window of ``slots``, and drop their queued windows."""
        index = torch.as_tensor(slots, device=self.device)
        for name in STATE_TENSORS:
            getattr(self, name)[:, index] = 0.0
        for name in ("inputs", "targets", "mask"):
            getattr(self, name)[index] = 0.0
        self.seen[slots] = 0
        self.short[slots] = self.stagger(slots)
        kept = np.flatnonzero(~np.isin(self.queue.slots, slots))
        if len(kept) < len(self._queue):
            self._queue.keep(kept)

    def place(self, slots: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the readings at rank ``pos`` among a chunk's readings of ``slots`` (M,) go:
        (M,) their window (0: the slot's current one, 1: the next, ...) and (M,) their step in
        it. A reading at step 0 of window 1 or later completes the window before it."""
        k = self.shape[2]
        n = self.seen[slots] + pos  # steps into the current window
        beyond = n - (k - self.short[slots])  # >= 0: past the current window's end
        later = np.divmod(np.maximum(beyond, 0), k)
        return (np.where(beyond < 0, 0, 1 + later[0]), np.where(beyond < 0, n, later[1]))

    def record(self, slots: np.ndarray, steps: np.ndarray, inputs: torch.Tensor,
               targets: torch.Tensor, target_valid: torch.Tensor) -> None:
        """Store readings of the slots' current windows: inputs (M, D) at ``steps`` (M,), and
        the targets (M, F) they supply to the step before (none at step 0: see ``close``)."""
        dev = self.device
        s, t = torch.as_tensor(slots, device=dev), torch.as_tensor(steps, device=dev)
        self.inputs[s, t] = inputs.to(dev)
        has_target = np.flatnonzero(steps >= 1)
        if len(has_target):
            sel = torch.as_tensor(has_target, device=dev)
            self._set_targets(s[sel], t[sel] - 1, targets[has_target], target_valid[has_target])
        np.maximum.at(self.seen, slots, steps + 1)

    def close(self, slots: np.ndarray, targets: torch.Tensor,
              target_valid: torch.Tensor) -> WindowBatch:
        """Give the full windows of ``slots`` their last target (from the reading that starts
        their next window), start new windows from the live state, and return the full ones
        (the caller queues them, in the order of the readings that closed them)."""
        k, dev = self.shape[2], self.device
        s = torch.as_tensor(slots, device=dev)
        last = torch.as_tensor(k - 1 - self.short[slots], device=dev)
        self._set_targets(s, last, targets, target_valid)
        full = WindowBatch(slots.copy(), self.inputs[s], self.targets[s], self.mask[s],
                           self.h0[:, s], self.c0[:, s])
        self.h0[:, s] = self.h[:, s]
        self.c0[:, s] = self.c[:, s]
        self.seen[slots] = 0
        self.short[slots] = 0
        return full

    def _set_targets(self, s: torch.Tensor, t: torch.Tensor, targets: torch.Tensor,
                     valid: torch.Tensor) -> None:
        dev = self.device
        self.targets[s, t] = targets.to(dev)
        self.mask[s, t] = valid.to(dev, torch.float32)[:, None].expand(-1, targets.shape[1])

    def enqueue(self, windows: WindowBatch) -> None:
        """Queue full windows for the next update, oldest first."""
        self._queue.push(windows)

    def take_queued(self, limit: int) -> WindowBatch:
        """Remove and return the oldest ``limit`` queued windows."""
        return self._queue.take(limit)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._TENSORS}

    def place_rows(self, slots: np.ndarray, rows: dict[str, torch.Tensor],
                   seen: np.ndarray, short: np.ndarray) -> None:
        """Write other sensors' rows (``tensors()`` taken at some slots) into ``slots``."""
        index = torch.as_tensor(slots, device=self.device)
        for name, values in rows.items():
            target = getattr(self, name)
            if slot_axis(name) == 1:
                target[:, index] = values.to(self.device)
            else:
                target[index] = values.to(self.device)
        self.seen[slots] = seen
        self.short[slots] = short

    def load_tensors(self, tensors: dict[str, torch.Tensor], seen: np.ndarray,
                     short: np.ndarray, queue: dict[str, torch.Tensor]) -> None:
        for name in self._TENSORS:
            setattr(self, name, tensors[name].to(self.device, torch.float32).clone())
        self.seen = np.array(seen, dtype=np.int64)
        self.short = np.array(short, dtype=np.int64)
        q = {k: v.to(self.device, torch.float32) for k, v in queue.items() if k != "slots"}
        self._queue.load(WindowBatch(queue["slots"].numpy().astype(np.int64), q["inputs"],
                                     q["targets"], q["mask"], q["h0"], q["c0"]))
