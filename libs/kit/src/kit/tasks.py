"""Stopping background tasks without ever waiting for good."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

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
