"""One truncated-BPTT update over the ready windows, with global-norm gradient clipping."""

from __future__ import annotations

import math
import time

import torch

from streamer.core.batch import UpdateStats
from streamer.core.failpoints import failpoint
from streamer.core.model import Forecaster
from streamer.core.windows import WindowBatch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the cells where ``mask`` is 1."""
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp_min(1.0)


class Trainer:
    """Adam on the forecaster's parameters; reports what each update did."""

    def __init__(self, model: Forecaster, lr: float, max_grad_norm: float):
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.attempts = 0
        self.applied = 0

    def backward(self, window: WindowBatch) -> torch.Tensor:
        """Forward over the windows and backpropagate the masked MSE; returns the loss."""
        # The window-start state is a detached leaf: no gradient flows past the window start.
        pred, _ = self.model(window.inputs, (window.h0, window.c0))  # (n, k, F)
        loss = masked_mse(pred, window.targets, window.mask)
        loss.backward()
        return loss

    def clip(self) -> torch.Tensor:
        """Scale gradients to a global norm of at most max_grad_norm; the pre-clip norm."""
        # clip_grad_norm_ returns the total norm before clipping: the number worth watching.
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)

    def update(self, window: WindowBatch) -> UpdateStats:
        """forward -> masked MSE -> backward -> clip -> step, unless loss or norm is non-finite."""
        started = time.perf_counter()
        self.attempts += 1
        loss = self.backward(window)
        failpoint("in_update")
        norm = self.clip()
        loss_value, norm_value = float(loss.item()), float(norm.item())  # one sync per update
        skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
        if not skipped:
            self.optimizer.step()
            self.applied += 1
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateStats(
            update_index=self.attempts,
            loss=loss_value,
            grad_norm=norm_value,
            clipped=norm_value > self.max_grad_norm,
            skipped=skipped,
            slots=len(window.slots),
            steps=int(window.mask.amax(dim=-1).sum().item()),
            duration_seconds=time.perf_counter() - started,
        )
