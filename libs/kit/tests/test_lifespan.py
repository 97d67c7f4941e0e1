"""Background tasks of an app's life end when it stops, even one that loses a
cancellation; so do the Redis calls it gave up on."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any, ClassVar

import pytest
from pydantic import RedisDsn
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

import kit.tasks
from kit import lifespan, security
from kit.errors import ServiceUnavailable
from kit.lifespan import Parts, open_redis, open_verifier
from kit.settings import ServiceSettings


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
    monkeypatch.setattr(kit.tasks, "CANCEL_GRACE_SECONDS", 0.05)
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
    monkeypatch.setattr(kit.tasks, "CANCEL_GRACE_SECONDS", 0.02)
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


class GatedConnection(Connection):
    """A connection whose connect waits for `gate`: a name lookup or a SYN
    taking its time, the moment a closing pool cannot reach it."""

    gate = asyncio.Event()
    attempts = 0
    ended = 0
    opened: ClassVar[list[Connection]] = []

    async def _connect(self) -> None:
        GatedConnection.attempts += 1
        try:
            await GatedConnection.gate.wait()
            await super()._connect()  # type: ignore[no-untyped-call]
            GatedConnection.opened.append(self)
        finally:
            GatedConnection.ended += 1


class GatedRedis(Redis):
    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Redis:  # type: ignore[override]
        return Redis.from_url(url, connection_class=GatedConnection, **kwargs)


async def test_redis_calls_given_up_on_open_no_connection_after_the_lifespan(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revocation check and a login's cutoff read that Redis did not answer in
    time end with the lifespan: neither connects once the pool is closed."""
    from kit_testing import TokenMinter

    monkeypatch.setattr(lifespan, "Redis", GatedRedis)
    monkeypatch.setattr(security, "STRAGGLER_GRACE_SECONDS", 0.05)
    monkeypatch.setattr(GatedConnection, "gate", asyncio.Event())
    monkeypatch.setattr(GatedConnection, "opened", [])
    minter = TokenMinter()
    settings = ServiceSettings(redis_url=RedisDsn(redis_url), _env_file=None)

    async with AsyncExitStack() as stack:
        parts = Parts(stack)
        redis = open_redis(parts, settings)
        verifier = await open_verifier(parts, settings, redis=redis, keys=minter.key_source)
        with pytest.raises(ServiceUnavailable, match="revocation list is unreachable"):
            await verifier.verify(minter.token())
        assert await security.user_revoked_before(redis, "u-1") is None
    started = GatedConnection.attempts

    GatedConnection.gate.set()  # Redis answers again, after the app stopped
    give_up = time.monotonic() + 5
    while GatedConnection.ended < GatedConnection.attempts:  # every connect has ended
        assert time.monotonic() < give_up, "a connect attempt never ended"
        await asyncio.sleep(0.01)
    assert GatedConnection.attempts == started
    assert [connection for connection in GatedConnection.opened if connection.is_connected] == []
