"""Background chores: run over and over for the process's life, and stopped
without ever waiting for good."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

logger = logging.getLogger("kit.tasks")

CANCEL_GRACE_SECONDS = 5.0
CANCEL_ATTEMPTS = 3


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancels `task` and waits for it to end. A cancellation can be lost (on
    Python 3.11, `asyncio.wait_for` returns the result of an inner future that
    completes as it is cancelled), and a loop that lost it runs on: so the task
    is cancelled again after a grace period, and after a few attempts it is left
    behind with an error rather than holding the app's shutdown forever."""
    for _ in range(CANCEL_ATTEMPTS):
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_GRACE_SECONDS)
        if task.done():
            if not task.cancelled() and task.exception() is not None:
                logger.error(
                    "background task %s had failed", task.get_name(), exc_info=task.exception()
                )
            return
        logger.warning(
            "background task %s outlived its cancellation; cancelling again", task.get_name()
        )
    logger.error("background task %s would not stop; shutting down without it", task.get_name())


async def every(
    wait: float | Callable[[], float],
    run: Callable[[], Awaitable[object]],
    *,
    log: logging.Logger,
    failed: str,
    traceback: bool = False,
) -> NoReturn:
    """Waits, runs `run`, and so on until cancelled (a task of the app's
    `Parts`, cancelled when it stops). `wait` is seconds, or a function that
    gives the next wait (a flush on the clock's grid). A failure is logged as
    `failed`, with the error's message, or its whole traceback where any
    failure would be a bug (`traceback`), and the next round tries again: a
    chore outlives an outage of what it needs."""
    while True:
        await asyncio.sleep(wait() if callable(wait) else wait)
        try:
            await run()
        except Exception as error:
            if traceback:
                log.exception(failed)
            else:
                log.warning("%s: %s", failed, error)
