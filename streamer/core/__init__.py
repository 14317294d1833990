"""The learner core: torch, numpy and the standard library only (no Kafka, pydantic, Prometheus)."""

from streamer.core.batch import Batch, StepResult, UpdateStats
from streamer.core.config import LearnerConfig
from streamer.core.learner import Learner
from streamer.core.rejections import REJECTION_REASONS, Reason

__all__ = [
    "Batch", "StepResult", "UpdateStats", "LearnerConfig", "Learner", "Reason",
    "REJECTION_REASONS",
]
