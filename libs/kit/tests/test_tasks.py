"""Chores that run over and over: a failure is logged and the next round runs."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kit.tasks import cancel_and_wait, every

log = logging.getLogger("test.chores")


async def test_a_chore_runs_again_after_each_failure_until_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds: list[int] = []
    fifth = asyncio.Event()

    async def chore() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 5:
            fifth.set()
        if len(rounds) % 2:
            raise ConnectionError("the database is away")

    task = asyncio.create_task(every(0.001, chore, log=log, failed="chore failed"))
    async with asyncio.timeout(10):
        await fifth.wait()
    await cancel_and_wait(task)
    assert task.cancelled()
    failures = [r for r in caplog.records if r.name == "test.chores"]
    assert [r.getMessage() for r in failures][:3] == ["chore failed: the database is away"] * 3
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in failures)


async def test_a_chore_whose_failure_is_a_bug_logs_its_traceback_and_waits_as_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    waits: list[float] = []
    ran = asyncio.Event()

    def next_wait() -> float:
        waits.append(0.001 * (len(waits) + 1))
        return waits[-1]

    async def chore() -> None:
        ran.set()
        raise KeyError("a bug")

    task = asyncio.create_task(
        every(next_wait, chore, log=log, failed="flush failed", traceback=True)
    )
    async with asyncio.timeout(10):
        await ran.wait()
    await cancel_and_wait(task)
    assert waits[0] == 0.001  # asked before the first round
    (failure, *_) = [r for r in caplog.records if r.name == "test.chores"]
    assert failure.getMessage() == "flush failed"
    assert failure.levelno == logging.ERROR
    assert failure.exc_info is not None
    assert failure.exc_info[0] is KeyError
