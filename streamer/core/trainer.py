"""One truncated-BPTT update over the ready windows, with global-norm gradient clipping."""

from __future__ import annotations

import copy
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
        params = list(model.parameters())
        # One fused kernel for all parameters instead of a loop of small ops per parameter:
        # with a tiny model and small updates the per-op overhead dominates (cpu and cuda).
        fused = params[0].device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(params, lr=lr, fused=fused)
        self.attempts = 0
        self.applied = 0

    def load(self, optimizer_state: dict, attempts: int, applied: int) -> None:
        """Continue from a snapshot: the optimizer's moments and the update counters. The
        learning rate stays this trainer's own (an operational setting: a restart with a new
        ``lr`` uses it), and the moments are copied (``load_state_dict`` keeps the snapshot's
        own tensors where device and dtype match, which training would then change)."""
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.attempts, self.applied = attempts, applied

    def backward(self, window: WindowBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward over the windows and backpropagate the masked MSE of the finite ones.

        A window holding a non-finite input, target or start state is zeroed and masked out,
        so it adds nothing to the loss or the gradient while the others still train. Returns
        the loss, the windows left out and the steps trained (on the device: no sync here).
        """
        finite = _finite_windows(window)  # (n,) bool
        keep = finite[:, None, None]
        inputs = torch.where(keep, window.inputs, 0.0)  # (n, k, D)
        targets = torch.where(keep, window.targets, 0.0)  # (n, k, F)
        mask = window.mask * keep  # (n, k, F)
        state = tuple(torch.where(finite[None, :, None], s, 0.0) for s in (window.h0, window.c0))
        # The window-start state is a detached leaf: no gradient flows past the window start.
        pred, _ = self.model(inputs, state)  # (n, k, F)
        loss = masked_mse(pred, targets, mask)
        loss.backward()
        return loss, (~finite).sum(), mask.amax(dim=-1).sum()

    def clip(self) -> torch.Tensor:
        """Scale gradients to a global norm of at most max_grad_norm; the pre-clip norm."""
        # clip_grad_norm_ returns the total norm before clipping: the number worth watching.
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)

    def update(self, window: WindowBatch) -> UpdateStats:
        """forward -> masked MSE -> backward -> clip -> step, unless loss or norm is non-finite
        or every window was left out (nothing to learn from)."""
        started = time.perf_counter()
        self.attempts += 1
        loss, left_out, steps = self.backward(window)
        failpoint("in_update")
        norm = self.clip()
        loss_value, norm_value, n_left_out, n_steps = torch.stack(  # one sync per update
            [loss.detach(), norm, left_out.to(loss.dtype), steps.to(loss.dtype)]).tolist()
        # Nothing to learn from when every window was left out or every target masked (all
        # in warm-up): Adam would still step on its momentum alone.
        skipped = (not (math.isfinite(loss_value) and math.isfinite(norm_value))
                   or n_left_out == len(window.slots) or n_steps == 0)
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
            steps=int(n_steps),
            windows_left_out=int(n_left_out),
            duration_seconds=time.perf_counter() - started,
        )


def _finite_windows(window: WindowBatch) -> torch.Tensor:
    """(n,) whether each window's inputs, targets and start state are all finite."""
    n = window.inputs.shape[0]
    per_window = [window.inputs.reshape(n, -1), window.targets.reshape(n, -1),
                  window.h0.transpose(0, 1).reshape(n, -1),
                  window.c0.transpose(0, 1).reshape(n, -1)]
    return torch.isfinite(torch.cat(per_window, dim=1)).all(dim=1)
