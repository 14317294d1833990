"""Choosing the torch device once, from the configured name."""

from __future__ import annotations

import torch

from streamer.core.config import DEVICE_NAMES, is_device_name


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cpu``, ``cuda`` or ``cuda:N`` as given."""
    if not is_device_name(name):
        raise ValueError(f"device must be {DEVICE_NAMES}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist"
            )
    return device
