"""The forecaster: an LSTM over normalized inputs and a linear head predicting the next change."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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
        self, x: torch.Tensor, lengths: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        """Like ``forward`` for sequences of different lengths (right-padded).

        The final state of each sequence is the state after its own last step; outputs at
        padded steps are zero-filled and must be ignored.
        """
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, final = self.lstm(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(torch.cat([out, x], dim=-1)), final
