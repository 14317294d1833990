import numpy as np

from streamer.core.slots import SlotTable


def test_new_ids_take_the_lowest_free_slots_in_order():
    table = SlotTable(initial_capacity=4, max_sensors=8)
    slots, grew = table.allocate(["a", "b", "c"])
    assert slots.tolist() == [0, 1, 2] and grew is None
    table.release(np.array([1]))
    slots, _ = table.allocate(["d", "e"])
    assert slots.tolist() == [1, 3]
    assert table.slot_for("d") == 1 and table.slot_for("b") is None


def test_capacity_doubles_up_to_max_sensors_then_refuses():
    table = SlotTable(initial_capacity=2, max_sensors=5)
    slots, grew = table.allocate([f"s{i}" for i in range(6)])
    assert slots.tolist() == [0, 1, 2, 3, 4, -1]
    assert grew == 5 and table.capacity == 5
    assert table.can_allocate() == 0


def test_plain_round_trip_keeps_ids_and_free_slots():
    table = SlotTable(initial_capacity=4, max_sensors=8)
    table.allocate(["a", "b", "c"])
    table.release(np.array([0]))
    copy = SlotTable.from_plain(table.to_plain(), max_sensors=8)
    assert copy.lookup(["a", "b", "c"]).tolist() == [-1, 1, 2]
    assert copy.allocate(["z"])[0].tolist() == [0]
