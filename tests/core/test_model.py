"""The forecaster's ragged forward: per-length plain LSTM calls equal one packed sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from streamer.core.model import Forecaster


@pytest.mark.parametrize("num_layers", [1, 2])
def test_ragged_forward_equals_a_packed_sequence_with_each_sequences_own_final_state(num_layers):
    torch.manual_seed(0)
    model = Forecaster(5, 2, 8, num_layers)
    torch.nn.init.normal_(model.head.weight)
    lengths = np.array([6, 2, 4, 4, 1, 6, 3])
    x = torch.randn(len(lengths), 6, 5)
    state = (torch.randn(num_layers, len(lengths), 8), torch.randn(num_layers, len(lengths), 8))
    with torch.no_grad():
        pred, (h, c) = model.forward_ragged(x, lengths, state)
        packed = pack_padded_sequence(x, torch.from_numpy(lengths), batch_first=True,
                                      enforce_sorted=False)
        out, (h_ref, c_ref) = model.lstm(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=6)
        pred_ref = model.head(torch.cat([out, x], dim=-1))
    real = torch.arange(6)[None, :] < torch.from_numpy(lengths)[:, None]  # (B, T) unpadded
    torch.testing.assert_close(pred[real], pred_ref[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-6)
