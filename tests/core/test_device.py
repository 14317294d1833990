"""The device the learner runs on, and how it is set up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamer.core.device import resolve_device


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={"PATH": "/usr/bin:/bin"})
    return done.stdout


def test_a_cuda_device_runs_in_full_float32_with_deterministic_kernels():
    # torch's defaults run cuDNN's LSTM in TF32 (forecasts ~1e-3 off the CPU's) and let cuDNN
    # pick kernels by speed. The settings need no GPU to set, so this runs everywhere.
    flags = ("torch.backends.cudnn.rnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision,"
             " torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,"
             " os.environ.get('CUBLAS_WORKSPACE_CONFIG')")
    code = ("import os, torch; from streamer.core.device import use_full_precision; "
            f"use_full_precision(torch.device('{{}}')); print({flags})")
    assert _run(code.format("cuda")) == "ieee ieee True False :4096:8\n"
    assert _run(code.format("cpu")) == "tf32 none False False None\n"  # torch's own, untouched


def test_a_device_name_that_is_none_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"
