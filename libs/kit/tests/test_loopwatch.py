"""LoopWatch: a loop that ran late is known to have stalled, for a while."""

from __future__ import annotations

import asyncio
import time

from kit.loopwatch import LoopWatch


def block_the_loop(seconds: float) -> None:
    """Work that holds the event loop (the storm being simulated)."""
    time.sleep(seconds)


async def test_a_loop_held_past_the_tolerance_counts_as_stalled_for_the_window() -> None:
    lateness: list[float] = []
    woke = asyncio.Event()

    def observe(late: float) -> None:
        lateness.append(late)
        woke.set()

    watch = LoopWatch(interval=0.02, tolerance=0.2, window=0.5, observe=observe)
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.wait_for(woke.wait(), 5)  # the watch has woken at least once
        block_the_loop(0.5)
        # still inside the stall, before the watch has run: its wake-up is overdue
        assert watch.stalled()
        woke.clear()
        await asyncio.wait_for(woke.wait(), 5)
        assert max(lateness) >= 0.2
        assert watch.worst >= 0.2
        assert watch.stalled()
        # the window passes with the loop on time again
        deadline = time.monotonic() + 5
        while watch.stalled():
            assert time.monotonic() < deadline, "the stall was never forgotten"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_lateness_under_the_tolerance_is_no_stall() -> None:
    watch = LoopWatch(tolerance=0.25, window=5.0)
    assert not watch.stalled()
    watch.record(0.1)
    assert not watch.stalled()
    watch.record(0.3)
    assert watch.stalled()
    assert watch.worst == 0.3
