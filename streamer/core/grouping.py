"""Readings of a chunk grouped by slot: ranks, members and the walk over ranks.

A sensor's statistics are sequential, so per-slot recurrences run as a loop over ranks (the
k-th reading of every slot at once), each step vectorized over slots. One stable sort gives
everything those loops and the LSTM call need.
"""

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


def rank_rows(pos: np.ndarray, n_pos: int) -> list[np.ndarray]:
    """For each rank p, the readings of rank p (at most one per slot), in arrival order."""
    by_pos = np.argsort(pos, kind="stable")
    bounds = np.searchsorted(pos[by_pos], np.arange(n_pos + 1))
    return [by_pos[bounds[p] : bounds[p + 1]] for p in range(n_pos)]
