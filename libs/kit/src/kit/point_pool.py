"""A pool for point reads (catalog's get-by-id and list, auth's current user)
that costs less than the read.

asyncpg's own pool is general purpose: every checkout and return goes through
timeouts, a shielded release task and a session reset, which on one core costs
more CPU than the primary-key read it serves (32 readers on one core, pool and
driver together: about 60 µs of CPU per read with it, 25 µs with this one).
Point reads need none of that: each is one statement outside any transaction,
so there is no session state to reset. What this pool keeps:

- at most `max_size` connections, opened on first need, so start-up never
  waits on the database;
- a connection goes back after a lease that ended cleanly, or with an error
  the server answered a statement with (a value refused, the statement
  timeout): the connection is idle again, and a client sending bad input over
  and over must not cost the service a new connection (TCP and SCRAM) each
  time. Any other error or a cancellation (a statement may still be running
  on it) closes it, and its slot passes to the next waiter, which opens a
  fresh connection;
- a lost connection (the database restarted) closes every idle one with it, as
  they died the same way, so a retry gets a new connection rather than another
  dead one;
- waiters are served first come, first served, each for at most
  `wait_timeout` (the engine's pool timeout, 10 s), then refused with
  `PoolTimeout`; idle connections last in, first out, so a quiet period keeps
  the same few warm.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import asyncpg

from kit.db import CONNECT_TIMEOUT_SECONDS, POOL_TIMEOUT_SECONDS, asyncpg_dsn
from kit.lifespan import Parts
from kit.pools import PoolUsage, observe_wait
from kit.settings import DatabaseSettings

Connections = Callable[[], AbstractAsyncContextManager[Any]]
"""Opens a bare asyncpg connection for the length of an `async with`
(`PointReadPool.acquire`, or a test's connection inside its transaction)."""

# What a connection lost to a database restart (or shutdown, or a backend
# terminated by an administrator) raises from the driver: the server's own
# notice (57P01 and its kin), the socket's error, or, when the notice arrived
# while the connection sat idle, asyncpg's protocol state out of step.
# Class 57 ("operator intervention") bar 57014: a statement cancelled (the
# statement timeout) leaves its connection as good as it was.
DISCONNECTED = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.DatabaseDroppedError,
    asyncpg.exceptions.IdleSessionTimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)


def statement_refused(error: BaseException | None) -> bool:
    """Whether the server answered a statement with an error (severity ERROR)
    that leaves the connection ready for the next one: not a FATAL or PANIC
    one, which ends the session, and not a lost connection."""
    if not isinstance(error, asyncpg.PostgresError) or isinstance(error, DISCONNECTED):
        return False
    # severity_en is never translated (PostgreSQL 9.6+); severity may be
    return (getattr(error, "severity_en", None) or getattr(error, "severity", None)) == "ERROR"


class PoolClosed(asyncpg.InterfaceError):  # type: ignore[misc] # asyncpg is untyped
    """The pool was closed (the app is shutting down)."""


class PoolTimeout(TimeoutError):
    """No connection came free within the pool's wait: the database is slow or
    silent, and a request that waited this long is better answered 503 (a
    retry) than served after its client gave up. A timeout, so batched reads
    do not ask again (kit.batching)."""


class PointReadPool:
    def __init__(
        self,
        dsn: str,
        *,
        max_size: int,
        wait_timeout: float = POOL_TIMEOUT_SECONDS,
        **connect_options: Any,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._dsn = dsn
        self._max_size = max_size
        self._wait_timeout = wait_timeout
        self._connect_options = {"timeout": CONNECT_TIMEOUT_SECONDS, **connect_options}
        self._idle: collections.deque[asyncpg.Connection] = collections.deque()
        # A waiter gets a connection, or None: a free slot to open one in.
        self._waiters: collections.deque[asyncio.Future[asyncpg.Connection | None]] = (
            collections.deque()
        )
        # Slots taken: connections open, opening, or lent out.
        self._size = 0
        self._closed = False

    @property
    def size(self) -> int:
        """Connections open or being opened."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Leases waiting for a connection."""
        return sum(not waiter.done() for waiter in self._waiters)

    def pool_usage(self) -> PoolUsage:
        """What `/metrics` reports of this pool (kit.pools)."""
        idle = len(self._idle)
        return PoolUsage(
            in_use=self._size - idle, idle=idle, max_size=self._max_size, waiting=self.waiting
        )

    def acquire(self) -> Lease:
        """`async with pool.acquire() as connection:`, one connection for the block."""
        return Lease(self)

    async def close(self) -> None:
        """Closes the idle connections now and the leased ones as they come back."""
        self._closed = True
        while self._idle:
            self._idle.pop().terminate()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed("the pool is closed"))

    async def _take(self) -> asyncpg.Connection:
        if self._closed:
            raise PoolClosed("the pool is closed")
        while self._idle:
            idle = self._idle.pop()
            if not idle.is_closed():
                return idle
            self._size -= 1
        # a connection in hand costs no clock read; a wait or a connect is timed
        started = time.perf_counter()
        if self._size >= self._max_size:
            try:
                async with asyncio.timeout(self._wait_timeout):
                    handed = await self._wait()
            except TimeoutError:
                raise PoolTimeout(
                    f"no database connection came free within {self._wait_timeout:g} s"
                ) from None
            if handed is not None:
                observe_wait("point_pool", started)
                return handed
        else:
            self._size += 1
        # This task holds a slot: open a connection in it, or pass the slot on.
        try:
            connection: asyncpg.Connection = await asyncpg.connect(
                self._dsn, **self._connect_options
            )
        except BaseException:
            self._hand_on(None)
            raise
        observe_wait("point_pool", started)
        if self.closed:  # closed while connecting
            connection.terminate()
            self._hand_on(None)
            raise PoolClosed("the pool is closed")
        return connection

    async def _wait(self) -> asyncpg.Connection | None:
        waiter: asyncio.Future[asyncpg.Connection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # handed over just as this task was cancelled: pass it on
                self._hand_on(waiter.result())
            raise

    def _hand_on(self, connection: asyncpg.Connection | None) -> None:
        """Gives a connection (or, with None, a slot) to the first live waiter;
        with none waiting, the connection goes idle or the slot is freed."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        if connection is None:
            self._size -= 1
        else:
            self._idle.append(connection)

    def _give_back(self, connection: asyncpg.Connection, error: BaseException | None) -> None:
        if (
            (error is None or statement_refused(error))
            and not self._closed
            and not connection.is_closed()
            and not connection.is_in_transaction()
        ):
            self._hand_on(connection)
            return
        connection.terminate()
        if isinstance(error, DISCONNECTED):
            # the idle ones lost the same server: drop them before anyone retries
            while self._idle:
                self._idle.pop().terminate()
                self._size -= 1
        self._hand_on(None)


class Lease:
    __slots__ = ("_connection", "_pool")

    def __init__(self, pool: PointReadPool) -> None:
        self._pool = pool
        self._connection: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        self._connection = await self._pool._take()
        return self._connection

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool._give_back(connection, error)


def open_point_pool(parts: Parts, settings: DatabaseSettings, *, max_size: int) -> PointReadPool:
    """The service's pool for point reads, on its database with its server
    settings (the statement and command timeouts), closed when the app stops."""
    pool = PointReadPool(
        asyncpg_dsn(str(settings.database_url)),
        max_size=max_size,
        **settings.database_connect_options,
    )
    return parts.add(pool, PointReadPool.close)
