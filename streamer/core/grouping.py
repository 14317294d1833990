"""Readings of a chunk grouped by slot: each reading's rank, its slot's row, and the reading
before it, for the LSTM call (one row per slot, one step per rank). One stable sort gives all."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Groups:
    """One stable sort by slot, shared by everything that needs it."""

    pos: np.ndarray  # (M,) rank of each reading among its slot's readings (arrival order)
    n_pos: int  # max rank + 1
    distinct: np.ndarray  # (S,) the slots, ascending
    member: np.ndarray  # (M,) index into ``distinct`` of each reading's slot
    counts: np.ndarray  # (S,) readings per slot
    before: np.ndarray  # (M,) the same slot's reading ranked just before; -1 at rank 0


def group_by_slot(slots: np.ndarray) -> Groups:
    """Group (M,) slots, given in arrival order."""
    if not len(slots):
        empty = np.zeros(0, dtype=np.int64)
        return Groups(empty, 0, empty, empty, empty, empty)
    order = np.argsort(slots, kind="stable")  # by slot, then arrival (= rank) order
    sorted_slots = slots[order]
    first = np.r_[True, sorted_slots[1:] != sorted_slots[:-1]]
    starts = np.flatnonzero(first)
    counts = np.diff(np.r_[starts, len(slots)])
    member = np.empty(len(slots), dtype=np.int64)
    member[order] = np.cumsum(first) - 1
    pos = np.empty(len(slots), dtype=np.int64)
    pos[order] = np.arange(len(slots)) - np.repeat(starts, counts)
    before = np.full(len(slots), -1, dtype=np.int64)
    before[order[1:]] = np.where(first[1:], -1, order[:-1])
    return Groups(pos, int(counts.max()), sorted_slots[starts], member, counts, before)
