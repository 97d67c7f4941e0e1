"""Batched point reads against a real PostgreSQL. The statement computes its
rows from the keys it is given (key n -> n * 2, none for negative keys), so
each test sees exactly which keys went out in which statement."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from kit.batching import BatchedReads, SharedReads
from kit.db import asyncpg_dsn
from kit.point_pool import PointReadPool, PoolClosed

DOUBLES = "SELECT key, key * 2 AS double FROM unnest($1::int[]) AS key WHERE key >= 0"


class Lost(Exception):
    pass


@pytest.fixture
def database_url(postgres_server_url: str) -> str:
    return f"{postgres_server_url}/test"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[PointReadPool]:
    pool = PointReadPool(asyncpg_dsn(database_url), max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


def batched(pool: PointReadPool, sql: str = DOUBLES, **options: int) -> BatchedReads:
    options.setdefault("max_in_flight", 1)
    return BatchedReads(pool.acquire, sql, key="key", on_lost=lambda _error: Lost(), **options)


async def warm(pool: PointReadPool, connections: int) -> None:
    """Opens `connections` connections, so a batch starts without connecting first."""
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(connections):
            await stack.enter_async_context(pool.acquire())
    assert pool.idle == connections


def doubles(rows: Sequence[asyncpg.Record | None]) -> list[int | None]:
    return [None if row is None else row["double"] for row in rows]


async def test_a_read_alone_goes_out_at_once_in_a_batch_of_one(pool: PointReadPool) -> None:
    reads = batched(pool)
    assert doubles([await reads.fetch(21)]) == [42]
    assert doubles([await reads.fetch(-1)]) == [None]
    assert reads.batches == 2


async def test_reads_that_wait_together_share_one_statement(pool: PointReadPool) -> None:
    reads = batched(pool)
    keys = [3, 1, -5, 3, 8, 0, 1]
    rows = await asyncio.gather(*(reads.fetch(key) for key in keys))
    assert doubles(rows) == [6, 2, None, 6, 16, 0, 2]
    assert reads.batches == 1


async def test_reads_arriving_during_a_statement_go_in_the_next_one(pool: PointReadPool) -> None:
    slow = (
        "SELECT key, key * 2 AS double FROM unnest($1::int[]) AS key, pg_sleep(0.2) WHERE key >= 0"
    )
    reads = batched(pool, slow)
    await warm(pool, 1)
    first = asyncio.create_task(reads.fetch(1))
    await asyncio.sleep(0)  # the first read has started its batch, which runs next
    later = [asyncio.create_task(reads.fetch(key)) for key in (2, 3, 4)]
    assert doubles(await asyncio.gather(first, *later)) == [2, 4, 6, 8]
    assert reads.batches == 2


async def test_batches_run_side_by_side_up_to_max_in_flight(pool: PointReadPool) -> None:
    slow = "SELECT key, pg_backend_pid() AS double FROM unnest($1::int[]) AS key, pg_sleep(0.2)"
    reads = batched(pool, slow, max_in_flight=2)
    await warm(pool, 2)
    first = asyncio.create_task(reads.fetch(1))
    await asyncio.sleep(0)
    second = asyncio.create_task(reads.fetch(2))
    rows = await asyncio.gather(first, second)
    assert reads.batches == 2
    assert len(set(doubles(rows))) == 2  # two statements on two connections at once


async def test_a_large_crowd_is_split_into_batches_of_at_most_max_batch(
    pool: PointReadPool,
) -> None:
    reads = batched(pool, max_batch=100)
    rows = await asyncio.gather(*(reads.fetch(key) for key in range(250)))
    assert doubles(rows) == [key * 2 for key in range(250)]
    assert reads.batches == 3


async def test_a_read_that_gives_up_leaves_the_others_their_rows(pool: PointReadPool) -> None:
    reads = batched(pool)
    tasks = [asyncio.create_task(reads.fetch(key)) for key in (1, 2, 3)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    assert doubles([await tasks[0], await tasks[2]]) == [2, 6]
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]


async def test_an_error_reaches_every_read_of_its_batch_and_no_other(pool: PointReadPool) -> None:
    reads = batched(pool, "SELECT key, 1 / (key - 2) AS double FROM unnest($1::int[]) AS key")
    outcomes = await asyncio.gather(*(reads.fetch(key) for key in (1, 2)), return_exceptions=True)
    assert all(isinstance(outcome, asyncpg.DivisionByZeroError) for outcome in outcomes)
    assert (await reads.fetch(3))["double"] == 1


async def test_a_lost_connection_is_retried_once_on_a_new_one(
    pool: PointReadPool, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    slow = "SELECT key, key * 2 AS double FROM unnest($1::int[]) AS key, pg_sleep(0.3)"
    reads = batched(pool, slow)
    read = asyncio.create_task(reads.fetch(7))
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        # the server drops the connection in the middle of the statement
        terminated = False
        while not terminated:
            terminated = bool(
                await admin.fetchval(
                    "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE query LIKE '%unnest($1::int[])%' AND pid <> pg_backend_pid()"
                )
            )
    finally:
        await admin.close()
    with caplog.at_level(logging.WARNING, logger="kit.batching"):
        assert (await read)["double"] == 14
    assert reads.batches == 2
    assert "database connection lost" in caplog.text


async def test_a_connection_lost_twice_raises_the_outage_error(database_url: str) -> None:
    unreachable = PointReadPool(
        asyncpg_dsn(database_url).replace("@", "@nowhere.invalid.", 1), max_size=1, timeout=2
    )
    try:
        reads = batched(unreachable)
        with pytest.raises(Lost):
            await reads.fetch(1)
        assert reads.batches == 0
    finally:
        await unreachable.close()


async def test_a_read_past_the_statement_timeout_fails_once_and_is_not_run_again(
    database_url: str,
) -> None:
    timed = PointReadPool(
        asyncpg_dsn(database_url), max_size=1, server_settings={"statement_timeout": "100"}
    )
    try:
        reads = batched(
            timed, "SELECT key, key AS double FROM unnest($1::int[]) AS key, pg_sleep(30)"
        )
        # not a lost connection: the waiting reads get the driver's error, once
        with pytest.raises(asyncpg.QueryCanceledError):
            await reads.fetch(1)
        assert reads.batches == 1
        assert (timed.size, timed.idle) == (1, 1)
        shared = SharedReads(timed.acquire, on_lost=lambda _error: Lost())
        with pytest.raises(asyncpg.QueryCanceledError):
            await shared.fetch("SELECT pg_sleep(30)", (), lambda rows: rows)
        assert (timed.size, timed.idle) == (1, 1)
    finally:
        await timed.close()


async def test_a_read_the_database_never_answers_is_given_up_once_not_asked_again(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The command timeout (the driver's, for a database that answers
    nothing): the connection is closed and the reads fail, without a second
    statement on a fresh connection that would keep them waiting as long again."""
    silent = PointReadPool(asyncpg_dsn(database_url), max_size=1, command_timeout=0.3)
    try:
        reads = batched(
            silent, "SELECT key, key AS double FROM unnest($1::int[]) AS key, pg_sleep(30)"
        )
        with pytest.raises(Lost):
            await reads.fetch(1)
        assert reads.batches == 1
        shared = SharedReads(silent.acquire, on_lost=lambda _error: Lost())
        with pytest.raises(Lost):
            await shared.fetch("SELECT pg_sleep(30)", (), lambda rows: rows)
        assert shared.statements == 1
        assert "retrying on a new one" not in caplog.text
        assert (silent.size, silent.idle) == (0, 0)
    finally:
        await silent.close()


async def test_closing_cancels_the_reads_in_flight(pool: PointReadPool) -> None:
    reads = batched(pool, "SELECT key, key AS double FROM unnest($1::int[]) AS key, pg_sleep(30)")
    await warm(pool, 1)
    waiting = asyncio.create_task(reads.fetch(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the batch has sent its statement
    assert reads.batches == 1
    await reads.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    with pytest.raises(PoolClosed):
        await reads.fetch(2)


async def test_closing_cancels_reads_whose_batch_never_started(pool: PointReadPool) -> None:
    reads = batched(pool)
    waiting = asyncio.create_task(reads.fetch(1))
    await asyncio.sleep(0)  # the read has started a batch, which has not run yet
    await reads.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiting


# --- shared reads: identical reads waiting together share one statement ---------------

PAGE = "SELECT n FROM generate_series(1, $1::int) AS n"
SLOW_PAGE = "SELECT n FROM generate_series(1, $1::int) AS n, pg_sleep(0.2)"


def numbers(rows: list[asyncpg.Record]) -> list[int]:
    return [row["n"] for row in rows]


def shared(pool: PointReadPool) -> SharedReads:
    return SharedReads(pool.acquire, on_lost=lambda _error: Lost())


async def test_closing_cancels_shared_reads_that_never_started(pool: PointReadPool) -> None:
    reads = shared(pool)
    waiting = asyncio.create_task(reads.fetch(PAGE, (3,), numbers))
    await asyncio.sleep(0)  # the read's task exists and has not run yet
    await reads.aclose()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 5)


async def test_identical_reads_waiting_together_share_one_statement_and_result(
    pool: PointReadPool,
) -> None:
    reads = shared(pool)
    results = await asyncio.gather(*(reads.fetch(PAGE, (3,), numbers) for _ in range(5)))
    assert results == [[1, 2, 3]] * 5
    assert all(result is results[0] for result in results)
    assert reads.statements == 1
    await reads.aclose()


async def test_reads_with_other_arguments_are_not_shared(pool: PointReadPool) -> None:
    reads = shared(pool)
    results = await asyncio.gather(*(reads.fetch(PAGE, (n,), numbers) for n in (1, 2, 1)))
    assert results == [[1], [1, 2], [1]]
    assert reads.statements == 2
    await reads.aclose()


async def test_a_read_arriving_after_the_statement_was_sent_runs_its_own(
    pool: PointReadPool,
) -> None:
    """So every read sees every write committed before it arrived."""
    reads = shared(pool)
    await warm(pool, 2)
    first = asyncio.create_task(reads.fetch(SLOW_PAGE, (2,), numbers))
    deadline = asyncio.get_running_loop().time() + 5
    while reads.statements == 0:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0)
    later = asyncio.create_task(reads.fetch(SLOW_PAGE, (2,), numbers))
    assert await first == await later == [1, 2]
    assert reads.statements == 2
    await reads.aclose()


async def test_a_shared_read_that_one_reader_gives_up_still_answers_the_others(
    pool: PointReadPool,
) -> None:
    reads = shared(pool)
    tasks = [asyncio.create_task(reads.fetch(SLOW_PAGE, (1,), numbers)) for _ in range(3)]
    await asyncio.sleep(0)
    tasks[0].cancel()
    assert [await tasks[1], await tasks[2]] == [[1], [1]]
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    await reads.aclose()


async def test_an_error_reaches_every_reader_of_a_shared_read(pool: PointReadPool) -> None:
    reads = shared(pool)
    failing = "SELECT 1 / ($1::int - $1::int) AS n"
    outcomes = await asyncio.gather(
        *(reads.fetch(failing, (1,), numbers) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(outcome, asyncpg.DivisionByZeroError) for outcome in outcomes)
    assert await reads.fetch(PAGE, (1,), numbers) == [1]
    await reads.aclose()
