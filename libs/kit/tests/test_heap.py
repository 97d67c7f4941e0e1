"""The collector settings a started app runs with, and their undoing."""

from __future__ import annotations

import gc
import weakref

from kit.heap import YOUNG_THRESHOLD, settled_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_start_up_heap_is_frozen_and_young_collections_are_rarer() -> None:
    before = gc.get_threshold()
    survivor = Node()  # alive at start-up, like the app's own objects
    with settled_heap():
        assert gc.get_freeze_count() > 0
        assert survivor not in gc.get_objects()  # out of the collector's sight
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_cycles_made_after_start_up_are_still_collected() -> None:
    with settled_heap():
        first, second = Node(), Node()
        first.other, second.other = second, first
        gone = weakref.ref(first)
        del first, second
        gc.collect()
        assert gone() is None
