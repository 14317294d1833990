"""Why a reading was not applied: one enum shared by the learner, the codec and the DLQ."""

from __future__ import annotations

import enum


class Reason(enum.IntEnum):
    """Rejection reasons. ``ACCEPTED`` (0) marks a reading that was applied.

    The integer values travel in numpy status arrays; the lowercase names travel in DLQ headers
    and metric labels, so both are part of the public contract: append, never renumber.
    """

    ACCEPTED = 0
    # Raised by the codec, before a reading reaches the learner.
    NOT_JSON = 1
    SCHEMA_VIOLATION = 2
    KEY_MISMATCH = 3
    # Raised by the learner (and possibly by the codec, which checks what it can early).
    NON_FINITE = 4
    WRONG_FEATURE_COUNT = 5
    BAD_SENSOR_ID = 6
    TIMESTAMP_NOT_AFTER_LAST = 7
    TABLE_FULL = 8
    VALUE_OUT_OF_RANGE = 9  # |value| > MAX_ABS_VALUE: finite, but beyond what the model holds

    @property
    def label(self) -> str:
        """The lowercase name used in DLQ headers and metric labels."""
        return self.name.lower()


REJECTION_REASONS: tuple[Reason, ...] = tuple(r for r in Reason if r is not Reason.ACCEPTED)
