"""Background tasks of an app's life end when it stops, even one that loses a cancellation."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from kit import lifespan
from kit.lifespan import Parts


async def test_a_task_is_cancelled_and_awaited_when_the_parts_close() -> None:
    finished: list[str] = []

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            finished.append("cleaned up")

    async with AsyncExitStack() as stack:
        task = Parts(stack).task(work(), name="forever")
        await asyncio.sleep(0)
    assert task.cancelled()
    assert finished == ["cleaned up"]


async def test_a_task_that_loses_its_cancellation_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lifespan, "CANCEL_GRACE_SECONDS", 0.05)
    cancellations = 0

    async def swallows_the_first() -> None:
        # what a loop around asyncio.wait_for does on 3.11 when the cancel races a result
        nonlocal cancellations
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations > 1:
                    raise

    async with AsyncExitStack() as stack:
        task = Parts(stack).task(swallows_the_first(), name="stubborn")
        await asyncio.sleep(0)
    assert task.cancelled()
    assert cancellations == 2


async def test_a_task_that_never_stops_does_not_hold_the_shutdown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lifespan, "CANCEL_GRACE_SECONDS", 0.02)
    release = asyncio.Event()

    async def never_stops() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    async with AsyncExitStack() as stack:
        task = Parts(stack).task(never_stops(), name="deaf")
        await asyncio.sleep(0)
    assert not task.done()
    assert "deaf would not stop" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.done()
