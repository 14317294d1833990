"""The forecaster: an LSTM over normalized inputs and a linear head predicting the next change."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]  # h, c: (L, B, H) each


class Forecaster(nn.Module):
    """LSTM plus a head that sees the top hidden state and the current input.

    The head starts at zero, so an untrained model predicts "no change" (persistence); the
    direct path from the input lets it learn "continue the last change" before the LSTM has
    learned anything.
    """

    def __init__(self, n_inputs: int, n_features: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.lstm = nn.LSTM(n_inputs, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size + n_inputs, n_features)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """x (B, T, D), state (L, B, H) -> predictions (B, T, F), final state."""
        out, final = self.lstm(x, state)  # out (B, T, H)
        return self.head(torch.cat([out, x], dim=-1)), final

    def forward_ragged(
        self, x: torch.Tensor, lengths: np.ndarray, state: State
    ) -> tuple[torch.Tensor, State]:
        """Like ``forward`` for sequences of different ``lengths`` (B,) (right-padded).

        The final state of each sequence is the state after its own last step; outputs at
        padded steps are zero-filled and must be ignored. Runs one plain LSTM call per distinct
        length, each over the steps up to it of the sequences that long or longer: on the CPU a
        plain call costs 3-7 us per step where a packed sequence costs 20-40.
        """
        if (lengths == x.shape[1]).all():  # no padding: one call
            return self.forward(x, state)
        order_np = np.argsort(-lengths, kind="stable")  # longest first: "at least" is a prefix
        lengths, order = lengths[order_np], torch.from_numpy(order_np).to(x.device)
        x = x[order]
        h, c = state[0][:, order], state[1][:, order]  # (L, B, H) copies
        out = x.new_zeros(x.shape[0], x.shape[1], self.lstm.hidden_size)  # (B, T, H)
        ends = np.unique(lengths)  # ascending
        n_at_least = len(lengths) - np.searchsorted(lengths[::-1], ends)  # sequences >= end
        start = 0
        for end, n in zip(ends.tolist(), n_at_least.tolist()):
            out[:n, start:end], (h[:, :n], c[:, :n]) = self.lstm(
                x[:n, start:end], (h[:, :n].clone(), c[:, :n].clone()))  # not views: h changes
            start = end
        pred = self.head(torch.cat([out, x], dim=-1))
        back = torch.from_numpy(np.argsort(order_np)).to(x.device)
        return pred[back], (h[:, back], c[:, back])
