"""The learner core: torch, numpy and the standard library only (no Kafka, pydantic, Prometheus)."""

from streamer.core.batch import Batch, StepResult, UpdateStats
from streamer.core.config import LearnerConfig
from streamer.core.rejections import REJECTION_REASONS, Reason

__all__ = [
    "Batch", "StepResult", "UpdateStats", "LearnerConfig", "Learner", "Reason",
    "REJECTION_REASONS",
]


def __getattr__(name: str):
    """``Learner`` is imported when first asked for (PEP 562): importing torch takes seconds,
    and the CLI's help, config errors and ``streamer produce`` need none of it."""
    if name == "Learner":
        from streamer.core.learner import Learner

        return Learner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
