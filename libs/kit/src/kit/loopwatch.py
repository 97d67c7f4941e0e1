"""How late this process's event loop runs, so that its own stalls are not
blamed on others.

A timeout measures the wall clock, not the peer: when the loop is busy (a
connection storm, a long burst of work), a connection or an answer that came
in time may sit unread until the timer fires. A gateway that counted those
timeouts against its upstreams would eject healthy replicas exactly when it
is busiest, and send the whole storm to the replicas left.

`LoopWatch` wakes every `interval` seconds and records how late each wake-up
was. The loop has `stalled` while a wake-up within the last `window` seconds
came at least `tolerance` seconds late: a timeout that fired in that time says
nothing about the peer. The lateness is also reported to `observe` (a
histogram), so operators see the loop's health.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoopWatch:
    __slots__ = ("_due_at", "_late_at", "interval", "observe", "tolerance", "window", "worst")

    def __init__(
        self,
        *,
        interval: float = 0.1,
        tolerance: float = 0.25,
        window: float = 5.0,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.interval = interval
        self.tolerance = tolerance
        self.window = window
        self.observe = observe
        self.worst = 0.0
        """The latest wake-up seen so far, in seconds late."""
        self._late_at = -window
        self._due_at: float | None = None  # the next wake-up, while `run` runs

    async def run(self) -> None:
        """Watches until cancelled (a task of the app's lifespan)."""
        try:
            while True:
                self._due_at = expected = time.monotonic() + self.interval
                await asyncio.sleep(self.interval)
                self.record(time.monotonic() - expected)
        finally:
            self._due_at = None

    def record(self, late: float) -> None:
        late = max(0.0, late)
        if late >= self.tolerance:
            self._late_at = time.monotonic()
        self.worst = max(self.worst, late)
        if self.observe is not None:
            self.observe(late)

    def stalled(self) -> bool:
        """Whether the loop ran `tolerance` late within the last `window` seconds,
        or is that late now (the watch's own wake-up is overdue: a timer that
        fired in the same stall may run before the watch does)."""
        now = time.monotonic()
        if self._due_at is not None and now - self._due_at >= self.tolerance:
            return True
        return now - self._late_at < self.window
