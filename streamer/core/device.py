"""Choosing the torch device once, from the configured name; the memory the process may use."""

from __future__ import annotations

import os
from pathlib import Path

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


# The container's limit: cgroup v2, else v1 (whose "no limit" is a number near 2**63).
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"),
                  Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def memory_limit_bytes() -> int:
    """The memory this process may use: the machine's, or its container's limit if lower."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


def device_memory_bytes(device: torch.device) -> int:
    """The memory of a CUDA device, all of it (other processes' share included)."""
    return torch.cuda.mem_get_info(device)[1]


def use_full_precision(device: torch.device) -> None:
    """On CUDA, full float32 and deterministic kernels, as on the CPU. torch runs cuDNN's LSTM
    in TF32 by default (a 10-bit mantissa: forecasts ~1e-3 off the CPU's, a GPU and a CPU
    worker of one group, or a checkpoint moved between them, disagreeing) and lets cuDNN and
    cuBLAS pick kernels whose sums differ from run to run. Process-wide settings, set through
    torch's newer precision API only (reading the legacy ``allow_tf32`` afterwards raises)."""
    if device.type != "cuda":
        return
    # cuBLAS reads this when it makes its first handle: before any CUDA work of the process.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
