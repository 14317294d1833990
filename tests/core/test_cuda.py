"""The learner on a CUDA device, against the same learner on the CPU. Skipped without a GPU
(none was lent to this project yet): run `python -m pytest tests/core/test_cuda.py` on one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.core import Learner, LearnerConfig
from tests.core.conftest import chunks, sine_fleet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Trains every 64 readings, so the fleet below makes dozens of updates on each device.
CONFIG = dict(hidden_size=16, tbptt_steps=8, train_every=64, min_update_windows=1,
              initial_capacity=8, max_sensors=64, warmup_readings=2)


def _run(device: str, batches) -> tuple[Learner, np.ndarray]:
    learner = Learner(LearnerConfig(**CONFIG, device=device))
    forecasts = np.concatenate([learner.step(b).forecasts for b in batches])
    return learner, forecasts


def _fleet():
    return list(chunks(sine_fleet(12, 300, seed=3, log10_scale=(0, 0)), 97))


def test_a_cuda_learner_forecasts_and_learns_as_the_cpu_one_does():
    cpu, on_cpu = _run("cpu", _fleet())
    gpu, on_gpu = _run("cuda", _fleet())
    assert gpu.device.type == "cuda" and gpu.updates == cpu.updates > 10
    # Full float32 on both (TF32 off): the two drift apart only by rounding, through training.
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-3, atol=1e-4)
    for (name, a), (_, b) in zip(cpu.model.named_parameters(), gpu.model.named_parameters(),
                                 strict=True):
        np.testing.assert_allclose(b.detach().cpu().numpy(), a.detach().numpy(), rtol=1e-3,
                                   atol=1e-4, err_msg=name)
    assert torch.backends.cudnn.rnn.fp32_precision == "ieee"


@pytest.mark.parametrize(("saved_on", "restored_on"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_moves_between_a_gpu_and_a_cpu_worker(saved_on, restored_on):
    fleet = _fleet()
    learner, _ = _run(saved_on, fleet[:2])
    state = learner.snapshot()
    restored = Learner.restore(state, LearnerConfig(**CONFIG, device=restored_on))
    assert restored.device.type == restored_on
    for a, b in zip(learner.model.parameters(), restored.model.parameters(), strict=True):
        assert torch.equal(a.detach().cpu(), b.detach().cpu())
    for moment in restored.trainer.optimizer.state.values():
        for value in moment.values():
            if torch.is_tensor(value) and value.dim() > 0:
                assert value.device.type == restored_on
    # And it goes on serving and learning there.
    result = restored.step(fleet[2])
    assert np.isfinite(result.forecasts[result.status == 0]).all()


def test_a_cuda_learner_forecasts_alike_however_the_stream_is_cut_and_repeats_itself():
    fleet = sine_fleet(12, 300, seed=3, log10_scale=(0, 0))
    _, whole = _run("cuda", list(chunks(fleet, 97)))
    _, again = _run("cuda", list(chunks(fleet, 97)))
    _, cut = _run("cuda", list(chunks(fleet, 41)))
    np.testing.assert_array_equal(again, whole)  # deterministic kernels: run to run, bitwise
    np.testing.assert_allclose(cut, whole, atol=1e-4, rtol=1e-5)  # as the CPU test asks
