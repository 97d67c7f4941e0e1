"""Concurrent reads answered together, on kit.point_pool's connections: reads
by key, one statement per batch (`BatchedReads`: catalog's get-by-id, auth's
current user), and identical reads, one statement for all (`SharedReads`:
catalog's list).

Under load most of a point read's cost is the round trip, not the row: the
statement's bind and send, the wake-up when the answer arrives, a connection
checkout, and a wait for a free connection once there are more requests than
connections. So reads that wait together are asked together: a read joins the
pending batch, and the batch goes out as one `WHERE id = ANY($1)` when a
connection is free for it. At most `max_in_flight` batches run at once.

- Alone (light load) a read goes out at once, in a batch of one: no added wait.
- A batch is taken only when its connection is in hand, so every read in it
  was asked for before its statement was sent: it sees every write committed
  before it arrived, as a read of its own would.
- Equal keys in one batch share one row.
- A request that gives up (cancelled) leaves the batch; the others still get
  their rows.
- A connection lost to a database restart is retried once on a fresh one;
  one that timed out (a silent database) is not, and other errors reach every
  read of the batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from kit.point_pool import DISCONNECTED, Connections, PoolClosed

logger = logging.getLogger("kit.batching")

Futures = list[asyncio.Future[Any]]
T = TypeVar("T")


async def _on_a_live_connection(
    connections: Connections,
    read: Callable[[Any], Awaitable[list[Any]]],
    on_lost: Callable[[BaseException], BaseException],
) -> list[Any]:
    """`read`'s rows, on a connection of `connections`. A connection lost (the
    database restarted) is tried once more on a fresh one; one that timed out
    is not: the database answered nothing in time (frozen, or cut off), and
    asking again would make the request wait as long once more."""
    for attempt in range(2):
        try:
            async with connections() as connection:
                return await read(connection)
        except DISCONNECTED as error:
            if attempt or isinstance(error, TimeoutError):
                raise on_lost(error) from error
            logger.warning("database connection lost (%s); retrying on a new one", error)
    raise AssertionError("unreachable")


class BatchedReads:
    def __init__(
        self,
        connections: Connections,
        sql: str,
        *,
        key: str,
        on_lost: Callable[[BaseException], BaseException],
        max_in_flight: int,
        max_batch: int = 100,
    ) -> None:
        """`sql` takes the keys as `$1` (an array) and returns a `key` column;
        `on_lost` turns a connection lost twice in a row into the error reads raise."""
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_in_flight and max_batch must be at least 1")
        self._connections = connections
        self._sql = sql
        self._key = key
        self._on_lost = on_lost
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._pending: dict[Hashable, Futures] = {}
        # a started batch has not taken the pending reads yet: new ones join it
        self._gathering = False
        # batches started (waiting for a connection or running)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0  # statements sent, for tests and metrics

    async def fetch(self, key: Hashable) -> Any:
        """The row whose key is `key`, or None."""
        if self._closed:
            raise PoolClosed("the reads are closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiting = self._pending.get(key)
        if waiting is None:
            self._pending[key] = [future]
        else:
            waiting.append(future)
        if not self._gathering and len(self._tasks) < self._max_in_flight:
            self._start()
        return await future

    async def aclose(self) -> None:
        """Stops the running batches; their reads, and those waiting, are cancelled."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # a batch cancelled before it ran never took its reads
        _fail(self._take(), asyncio.CancelledError())

    def _start(self) -> None:
        self._gathering = True
        task = asyncio.get_running_loop().create_task(self._run())
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if (
            self._pending
            and not self._closed
            and not self._gathering
            and len(self._tasks) < self._max_in_flight
        ):
            self._start()

    def _take(self) -> dict[Hashable, Futures]:
        self._gathering = False
        if len(self._pending) <= self._max_batch or self._closed:
            batch, self._pending = self._pending, {}
            return batch
        keys = list(self._pending)[: self._max_batch]
        return {key: self._pending.pop(key) for key in keys}

    async def _run(self) -> None:
        batch: dict[Hashable, Futures] | None = None

        async def read(connection: Any) -> list[Any]:
            nonlocal batch
            if batch is None:
                batch = self._take()
            self.batches += 1
            return await connection.fetch(self._sql, list(batch))  # type: ignore[no-any-return]

        try:
            rows = await _on_a_live_connection(self._connections, read, self._on_lost)
        except BaseException as error:
            if batch is None:
                batch = self._take()
            _fail(batch, error)
            if not isinstance(error, Exception):
                raise
            return
        assert batch is not None  # taken before the statement ran
        found = {row[self._key]: row for row in rows}
        for key, futures in batch.items():
            row = found.get(key)
            for future in futures:
                if not future.done():
                    future.set_result(row)


def _fail(batch: dict[Hashable, Futures], error: BaseException) -> None:
    for futures in batch.values():
        for future in futures:
            if future.done():
                continue
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)


class SharedReads:
    """Identical reads that wait together share one statement and its result.

    The list's first pages are asked for over and over with the same query:
    the same rows would be read, decoded and serialised once per request. A
    read names its statement and arguments (its key); one that arrives while
    an identical read is still waiting for a connection joins it and gets the
    same result. As with `BatchedReads`, a read is joined only until its
    statement is sent: every read sees every write committed before it
    arrived. `build` turns the rows into the result outside the connection.
    """

    def __init__(
        self, connections: Connections, *, on_lost: Callable[[BaseException], BaseException]
    ) -> None:
        self._connections = connections
        self._on_lost = on_lost
        self._waiting: dict[Hashable, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.statements = 0  # sent, for tests

    async def fetch(
        self, sql: str, arguments: tuple[Hashable, ...], build: Callable[[list[Any]], T]
    ) -> T:
        if self._closed:
            raise PoolClosed("the reads are closed")
        key = (sql, arguments)
        future = self._waiting.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            # nobody may be left to look at an error: mark it seen
            future.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._waiting[key] = future
            task = asyncio.get_running_loop().create_task(self._run(key, future, build))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # a request that gives up leaves the read running for the others
        result: T = await asyncio.shield(future)
        return result

    async def aclose(self) -> None:
        """Stops the running reads; their readers are cancelled."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # a read cancelled before it ran never settled its future
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            future.cancel()

    async def _run(
        self, key: tuple[str, tuple[Hashable, ...]], future: asyncio.Future[Any], build: Any
    ) -> None:
        sql, arguments = key

        async def read(connection: Any) -> list[Any]:
            self._stop_joining(key, future)
            self.statements += 1
            return await connection.fetch(sql, *arguments)  # type: ignore[no-any-return]

        try:
            rows = await _on_a_live_connection(self._connections, read, self._on_lost)
            result = build(rows)
        except asyncio.CancelledError:
            self._stop_joining(key, future)
            future.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - handed to every read waiting on it
            self._stop_joining(key, future)
            future.set_exception(error)
            return
        future.set_result(result)

    def _stop_joining(self, key: Hashable, future: asyncio.Future[Any]) -> None:
        if self._waiting.get(key) is future:
            del self._waiting[key]
