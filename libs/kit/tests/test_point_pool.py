"""kit's point-read pool against a real PostgreSQL: bounds, reuse, and what it
does with connections that a lease leaves in doubt."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import asyncpg
import pytest

from kit.db import asyncpg_dsn
from kit.errors import is_outage
from kit.point_pool import DISCONNECTED, PointReadPool, PoolClosed, PoolTimeout


@pytest.fixture
def dsn(postgres_server_url: str) -> str:
    return asyncpg_dsn(f"{postgres_server_url}/test")


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[PointReadPool]:
    pool = PointReadPool(dsn, max_size=3)
    try:
        yield pool
    finally:
        await pool.close()


async def queued(task: asyncio.Task[int], pool: PointReadPool) -> None:
    """Lets `task` run up to its wait for a connection (no I/O on the way)."""
    await asyncio.sleep(0)
    assert not task.done()
    assert pool.waiting == 1


async def hold(pool: PointReadPool, held: asyncio.Event, release: asyncio.Event) -> None:
    async with pool.acquire():
        held.set()
        await release.wait()


async def backend_pid(pool: PointReadPool) -> int:
    async with pool.acquire() as connection:
        pid: int = await connection.fetchval("SELECT pg_backend_pid()")
        return pid


async def let_go(pool: PointReadPool, release: asyncio.Event, holder: asyncio.Task[None]) -> None:
    """Ends `hold`'s lease: the pool of one serves again, on its one connection."""
    release.set()
    await holder
    assert await asyncio.wait_for(backend_pid(pool), 10) > 0
    assert (pool.size, pool.idle) == (1, 1)


async def test_opens_nothing_until_first_used_then_reuses_one_connection(
    pool: PointReadPool,
) -> None:
    assert pool.size == 0
    first = await backend_pid(pool)
    assert await backend_pid(pool) == first
    assert (pool.size, pool.idle) == (1, 1)


async def test_never_opens_more_than_max_size(pool: PointReadPool) -> None:
    in_use = 0
    most_in_use = 0

    async def read(n: int) -> int:
        nonlocal in_use, most_in_use
        async with pool.acquire() as connection:
            in_use += 1
            most_in_use = max(most_in_use, in_use)
            value: int = await connection.fetchval("SELECT $1::int FROM pg_sleep(0.01)", n)
            in_use -= 1
            return value

    assert await asyncio.gather(*(read(n) for n in range(20))) == list(range(20))
    assert most_in_use == 3
    assert pool.size == 3


async def failing_lease(pool: PointReadPool, *statements: str) -> asyncpg.Connection:
    """Runs `statements` on one lease until one raises; the lease's connection."""
    held: list[asyncpg.Connection] = []

    async def lease() -> None:
        async with pool.acquire() as connection:
            held.append(connection)
            for statement in statements:
                await connection.execute(statement)

    with pytest.raises(asyncpg.PostgresError):
        await lease()
    return held[0]


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM no_such_table",  # 42P01
        "SELECT 'not a number'::int",  # 22P02: the client's input
        "SELECT chr(0)",  # 54000: a NUL byte
    ],
)
async def test_a_statement_the_server_refused_leaves_its_connection_in_the_pool(
    pool: PointReadPool, statement: str
) -> None:
    first = await backend_pid(pool)
    connection = await failing_lease(pool, statement)
    assert not connection.is_closed()
    assert (pool.size, pool.idle) == (1, 1)
    assert await backend_pid(pool) == first


async def test_a_lease_ended_by_an_error_of_its_own_closes_its_connection(
    pool: PointReadPool,
) -> None:
    first = await backend_pid(pool)
    held: list[asyncpg.Connection] = []

    async def lease() -> None:
        async with pool.acquire() as connection:
            held.append(connection)
            raise RuntimeError("the caller's own failure, midway through its reads")

    with pytest.raises(RuntimeError):
        await lease()
    assert held[0].is_closed()
    assert pool.size == 0
    assert await backend_pid(pool) != first


async def test_a_connection_left_inside_a_transaction_is_closed(pool: PointReadPool) -> None:
    first = await backend_pid(pool)
    connection = await failing_lease(pool, "BEGIN", "SELECT 'not a number'::int")
    assert connection.is_closed()
    assert pool.size == 0
    assert await backend_pid(pool) != first


async def test_a_statement_past_the_statement_timeout_is_cancelled_and_its_connection_kept(
    dsn: str,
) -> None:
    pool = PointReadPool(dsn, max_size=1, server_settings={"statement_timeout": "100"})
    try:
        first = await backend_pid(pool)
        # 30 s unbounded; the statement timeout ends it long before the test's own limit
        async with asyncio.timeout(10):
            connection = await failing_lease(pool, "SELECT pg_sleep(30)")
        assert not connection.is_closed()
        assert (pool.size, pool.idle) == (1, 1)
        assert await backend_pid(pool) == first
        async with pool.acquire() as connection:
            assert await connection.fetchval("SHOW statement_timeout") == "100ms"
    finally:
        await pool.close()


async def test_a_cancelled_query_is_not_a_lost_connection() -> None:
    assert not isinstance(asyncpg.QueryCanceledError("statement timeout"), DISCONNECTED)
    assert isinstance(asyncpg.exceptions.AdminShutdownError("shutting down"), DISCONNECTED)


async def test_a_cancelled_statement_never_goes_back_to_the_pool(pool: PointReadPool) -> None:
    started = asyncio.Event()

    async def slow() -> None:
        async with pool.acquire() as connection:
            started.set()
            await connection.execute("SELECT pg_sleep(30)")

    task = asyncio.create_task(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (pool.size, pool.idle) == (0, 0)
    assert await backend_pid(pool) > 0


async def test_a_discarded_connection_passes_its_slot_to_a_waiter(dsn: str) -> None:
    pool = PointReadPool(dsn, max_size=1)
    try:
        held, release = asyncio.Event(), asyncio.Event()

        async def fails_while_holding() -> None:
            async with pool.acquire():
                held.set()
                await release.wait()
                raise RuntimeError("the holder fails")

        holder = asyncio.create_task(fails_while_holding())
        await held.wait()  # the holder has the only connection
        waiter = asyncio.create_task(backend_pid(pool))
        await queued(waiter, pool)
        release.set()
        with pytest.raises(RuntimeError):
            await holder
        assert await asyncio.wait_for(waiter, 10) > 0
        assert pool.size == 1
    finally:
        await pool.close()


async def test_a_waiter_that_gives_up_takes_no_slot_with_it(dsn: str) -> None:
    pool = PointReadPool(dsn, max_size=1)
    try:
        held, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(pool, held, release))
        await held.wait()
        impatient = asyncio.create_task(backend_pid(pool))
        await queued(impatient, pool)
        impatient.cancel()
        with pytest.raises(asyncio.CancelledError):
            await impatient
        await let_go(pool, release, holder)
    finally:
        await pool.close()


async def test_a_wait_for_a_connection_is_bounded_and_leaves_the_pool_as_it_was(
    dsn: str,
) -> None:
    pool = PointReadPool(dsn, max_size=1, wait_timeout=0.2)
    try:
        held, release = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(hold(pool, held, release))
        await held.wait()
        with pytest.raises(PoolTimeout, match=r"no database connection came free within 0\.2 s"):
            await backend_pid(pool)
        # an outage to the client (503, retry), and a timeout to batched reads
        # (not asked again)
        assert is_outage(PoolTimeout())
        assert isinstance(PoolTimeout(), TimeoutError)
        assert pool.waiting == 0
        await let_go(pool, release, holder)
    finally:
        await pool.close()


async def test_a_lost_connection_takes_the_idle_ones_with_it(pool: PointReadPool, dsn: str) -> None:
    pids: list[int] = []

    async def hold_and_note(held: asyncio.Event, release: asyncio.Event) -> None:
        async with pool.acquire() as connection:
            pids.append(await connection.fetchval("SELECT pg_backend_pid()"))
            held.set()
            await release.wait()

    release = asyncio.Event()
    held = [asyncio.Event() for _ in range(3)]
    holders = [asyncio.create_task(hold_and_note(event, release)) for event in held]
    for event in held:
        await event.wait()
    release.set()
    await asyncio.gather(*holders)
    assert pool.idle == 3

    # the server loses every backend of the pool (as in a restart)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)
    finally:
        await admin.close()

    # whether or not the driver has noticed yet, no dead connection is handed out twice
    for _ in range(2):
        try:
            assert await backend_pid(pool) > 0
            break
        except DISCONNECTED:
            assert pool.idle == 0
    else:
        pytest.fail("the pool kept handing out dead connections")


async def test_an_unreachable_database_frees_the_slot(dsn: str) -> None:
    pool = PointReadPool(dsn.replace("@", "@nowhere.invalid.", 1), max_size=1, timeout=2)
    try:
        for _ in range(2):  # the slot came back: the second attempt connects (and fails) too
            with pytest.raises(socket.gaierror):
                await backend_pid(pool)
        assert pool.size == 0
    finally:
        await pool.close()


async def test_closing_refuses_new_leases_and_wakes_the_waiting(dsn: str) -> None:
    pool = PointReadPool(dsn, max_size=1)
    held, release = asyncio.Event(), asyncio.Event()

    async def holding() -> None:
        async with pool.acquire() as connection:
            held.set()
            await release.wait()
        assert connection.is_closed()  # came back after the close: not kept

    holder = asyncio.create_task(holding())
    await held.wait()
    waiter = asyncio.create_task(backend_pid(pool))
    await queued(waiter, pool)
    await pool.close()
    with pytest.raises(PoolClosed):
        await waiter
    with pytest.raises(PoolClosed):
        await backend_pid(pool)
    release.set()
    await holder
    assert pool.idle == 0
