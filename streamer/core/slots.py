"""The slot table: sensor id -> batch slot, with growth up to a limit and slot reuse."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from itertools import repeat

import numpy as np


class SlotTable:
    """Maps sensor ids to slots ``0..capacity-1``; sensor i's state lives at index slot(i).

    Freed slots are reused lowest first, so a replay assigns the same slots every time.
    Capacity doubles (up to ``max_sensors``) only when no freed slot is left.
    """

    def __init__(self, initial_capacity: int, max_sensors: int):
        self.max_sensors = max_sensors
        self.capacity = min(initial_capacity, max_sensors)
        self._slot_of: dict[str, int] = {}
        self._id_of: list[str | None] = [None] * self.capacity
        self._free: list[int] = list(range(self.capacity))  # a heap

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, sensor_id: str) -> bool:
        return sensor_id in self._slot_of

    def items(self) -> list[tuple[str, int]]:
        """(sensor id, slot) of every sensor held."""
        return list(self._slot_of.items())

    def slot_for(self, sensor_id: str) -> int | None:
        """The sensor's slot, or None if it has none."""
        return self._slot_of.get(sensor_id)

    def lookup(self, sensor_ids: Sequence[str]) -> np.ndarray:
        """(N,) slots, -1 for unknown ids."""
        found = map(self._slot_of.get, sensor_ids, repeat(-1))
        return np.fromiter(found, dtype=np.int64, count=len(sensor_ids))

    @property
    def occupied(self) -> np.ndarray:
        """Slots that hold a sensor, ascending."""
        return np.array(sorted(self._slot_of.values()), dtype=np.int64)

    def can_allocate(self) -> int:
        """How many more sensors fit."""
        return self.max_sensors - len(self._slot_of)

    def allocate(self, sensor_ids: Sequence[str]) -> tuple[np.ndarray, int | None]:
        """Give each new id a slot, in order; returns (slots, new capacity if it grew).

        Ids beyond ``max_sensors`` get -1 (the caller rejects their readings).
        """
        slots = np.full(len(sensor_ids), -1, dtype=np.int64)
        grew_to = None
        for i, sensor_id in enumerate(sensor_ids):
            if not self._free:
                if self.capacity >= self.max_sensors:
                    break
                new_capacity = min(self.capacity * 2, self.max_sensors)
                self._id_of.extend([None] * (new_capacity - self.capacity))
                self._free = list(range(self.capacity, new_capacity))
                self.capacity = grew_to = new_capacity
            slot = heapq.heappop(self._free)
            self._slot_of[sensor_id] = slot
            self._id_of[slot] = sensor_id
            slots[i] = slot
        return slots, grew_to

    def release(self, slots: np.ndarray) -> list[str]:
        """Free ``slots``; returns the ids they held."""
        released = []
        for slot in slots.tolist():
            sensor_id = self._id_of[slot]
            if sensor_id is None:
                continue
            del self._slot_of[sensor_id]
            self._id_of[slot] = None
            heapq.heappush(self._free, slot)
            released.append(sensor_id)
        return released

    def to_plain(self) -> dict:
        return {"capacity": self.capacity, "ids": list(self._id_of)}

    @classmethod
    def from_plain(cls, plain: dict, max_sensors: int) -> SlotTable:
        ids = list(plain["ids"])
        table = cls(len(ids), max(max_sensors, len(ids)))
        table.max_sensors = max_sensors
        table._id_of = ids
        table._slot_of = {s: i for i, s in enumerate(ids) if s is not None}
        table._free = [i for i, s in enumerate(ids) if s is None]
        heapq.heapify(table._free)
        return table
