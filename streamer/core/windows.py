"""Per-slot device tensors: the live LSTM state and each slot's truncated-BPTT window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WindowBatch:
    """The ready windows of one update, stacked: n slots, k steps."""

    slots: np.ndarray  # (n,) slot indices
    inputs: torch.Tensor  # (n, k, D)
    targets: torch.Tensor  # (n, k, F)
    mask: torch.Tensor  # (n, k, F) 1.0 where the target counts
    h0: torch.Tensor  # (L, n, H) detached state at window start
    c0: torch.Tensor  # (L, n, H)


# Tensors laid out (L, capacity, H): their slot axis is 1; every other per-slot tensor's is 0.
STATE_TENSORS = ("h", "c", "h0", "c0")


def slot_axis(name: str) -> int:
    """The axis that indexes slots in the per-slot tensor ``name``."""
    return 1 if name in STATE_TENSORS else 0


class SlotTensors:
    """Live state ``h``, ``c`` (L, capacity, H) and windows, all on the learner's device.

    A slot's window starts from a detached copy of its live state. The reading with index
    ``seen`` since the window start stores its input at step ``seen`` and supplies the target of
    step ``seen - 1``; the window is ready once all ``k`` steps have targets (``seen > k``).
    Readings past a full window are served but not recorded, until the next update restarts it.
    """

    _TENSORS = ("h", "c", "h0", "c0", "inputs", "targets", "mask")

    def __init__(self, capacity: int, num_layers: int, hidden: int, k: int, n_inputs: int,
                 n_features: int, device: torch.device):
        self.shape = (num_layers, hidden, k, n_inputs, n_features)
        self.device = device
        self.seen = np.zeros(0, dtype=np.int64)
        self.grow(capacity)

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

    def reset(self, slots: np.ndarray) -> None:
        """Zero the state and window of ``slots``."""
        index = torch.as_tensor(slots, device=self.device)
        for name in STATE_TENSORS:
            getattr(self, name)[:, index] = 0.0
        for name in ("inputs", "targets", "mask"):
            getattr(self, name)[index] = 0.0
        self.seen[slots] = 0

    def record(self, slots: np.ndarray, pos: np.ndarray, inputs: torch.Tensor,
               targets: torch.Tensor, target_valid: torch.Tensor) -> None:
        """Store a chunk's inputs (M, D) and the targets (M, F) they supply to earlier steps."""
        k = self.shape[2]
        index = self.seen[slots] + pos  # (M,) step index of each reading in its window
        has_input = index < k
        has_target = (index >= 1) & (index <= k)
        dev = self.device
        if has_input.any():
            sel = torch.as_tensor(np.flatnonzero(has_input), device=dev)
            self.inputs[torch.as_tensor(slots[has_input], device=dev),
                        torch.as_tensor(index[has_input], device=dev)] = inputs[sel]
        if has_target.any():
            sel = torch.as_tensor(np.flatnonzero(has_target), device=dev)
            s = torch.as_tensor(slots[has_target], device=dev)
            t = torch.as_tensor(index[has_target] - 1, device=dev)
            self.targets[s, t] = targets[sel]
            valid = target_valid[sel].to(torch.float32)[:, None]  # (m, 1)
            self.mask[s, t] = valid.expand(-1, targets.shape[1])
        np.add.at(self.seen, slots, 1)

    def ready(self, limit: int) -> np.ndarray:
        """Up to ``limit`` ready slots, those waiting longest first (ties by slot)."""
        ready = np.flatnonzero(self.seen > self.shape[2])
        if len(ready) > limit:
            ready = ready[np.argsort(-self.seen[ready], kind="stable")[:limit]]
            ready.sort()
        return ready

    def windows(self, slots: np.ndarray) -> WindowBatch:
        index = torch.as_tensor(slots, device=self.device)
        return WindowBatch(
            slots, self.inputs[index], self.targets[index], self.mask[index],
            self.h0[:, index], self.c0[:, index],
        )

    def restart(self, slots: np.ndarray) -> None:
        """Start new windows for ``slots`` from their current live state."""
        index = torch.as_tensor(slots, device=self.device)
        self.h0[:, index] = self.h[:, index]
        self.c0[:, index] = self.c[:, index]
        self.mask[index] = 0.0
        self.seen[slots] = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._TENSORS}

    def load_tensors(self, tensors: dict[str, torch.Tensor], seen: np.ndarray) -> None:
        for name in self._TENSORS:
            setattr(self, name, tensors[name].to(self.device, torch.float32).clone())
        self.seen = np.array(seen, dtype=np.int64)
