"""One lifespan pattern for every app: its parts opened in order, closed in
reverse, and a typed state its routes read.

    async def open_parts(parts: Parts, settings: Settings) -> State:
        redis = open_redis(parts, settings)
        verifier = await open_verifier(parts, settings, redis=redis)
        parts.task(purge_now_and_then(redis), name="purge")
        return State(settings=settings, verifier=verifier, redis=redis)

    def create_app(settings: Settings | None = None) -> FastAPI:
        settings = settings or Settings()
        app = FastAPI(lifespan=lifespan(lambda parts: open_parts(parts, settings)))
        assemble(app, settings, readiness=...)
        app.include_router(router)
        return app

`open_parts` lists what the app owns, each part right after what it needs;
`Parts` (an `AsyncExitStack`) closes them in the reverse order when the app
stops, or when a later part fails to open, so no part is ever left open. The
state it returns is what `request.state` holds: it extends `AppState`, the
keys kit's own dependencies read (kit.deps, kit.health, kit.metrics), and
everything in it that is a pool is sampled by kit.pools under its key.

Once every part is open the heap is settled (kit.heap) unless the app says
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, Generic, TypedDict, TypeVar

import httpx
from fastapi import FastAPI
from redis.asyncio import Redis

from kit.heap import settled_heap
from kit.pools import REDIS_DRIVER, redis_reconnects
from kit.security import KeySource, TokenVerifier, settle_redis_calls
from kit.settings import ServiceSettings
from kit.tasks import cancel_and_wait

logger = logging.getLogger("kit.lifespan")

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)
T = TypeVar("T")


class AppState(TypedDict, Generic[SettingsT]):
    """What kit reads from every app's state: its settings and its verifier."""

    settings: SettingsT
    verifier: TokenVerifier


StateT = TypeVar("StateT", bound=AppState[Any])
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[StateT]]


class Parts:
    """What a lifespan has opened, closed in reverse order when it ends."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self._stack = stack

    async def enter(self, part: AbstractAsyncContextManager[T]) -> T:
        """A part that opens and closes as an async context manager (a Redis
        client, an HTTP client, a token verifier, a pool)."""
        return await self._stack.enter_async_context(part)

    def add(self, part: T, close: Callable[[T], Awaitable[object]]) -> T:
        """A part already open, and how to close it: `add(engine, AsyncEngine.dispose)`."""
        self._stack.push_async_callback(close, part)
        return part

    def task(self, work: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Background work for the app's life: cancelled, and awaited, when it stops."""
        task = asyncio.create_task(work, name=name)
        self._stack.push_async_callback(cancel_and_wait, task)
        return task


def lifespan(
    open_parts: Callable[[Parts], Awaitable[StateT]], *, settle_heap: bool = True
) -> Lifespan[StateT]:
    """The app's lifespan: `open_parts` opens everything and returns the state."""

    @contextlib.asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[StateT]:
        async with AsyncExitStack() as stack:
            state = await open_parts(Parts(stack))
            if settle_heap:
                stack.enter_context(settled_heap())
            yield state

    return run


REDIS_COMMAND_TIMEOUT_SECONDS = 5.0


def open_redis(parts: Parts, settings: ServiceSettings) -> Redis:
    """The service's Redis client. A connect that hangs (Redis stopping, a
    partition) fails after 2 s instead of the kernel's minutes, so the
    revocation mirror reconnects promptly; a pooled connection Redis closed
    (a restart) costs a reconnect, not an error (`redis_reconnects`); and no
    command waits longer than `REDIS_COMMAND_TIMEOUT_SECONDS` for a frozen
    Redis (a partition, a server stuck in a long command), however its caller
    bounds it: a request that needs Redis then answers 503, never hangs. The
    callers that can do without Redis bound their calls tighter themselves.
    (redis-py 8 defaults to the same 5 s; earlier releases waited for good, so
    it is said here.)"""
    return parts.add(
        Redis.from_url(
            str(settings.redis_url),
            socket_connect_timeout=2.0,
            socket_timeout=REDIS_COMMAND_TIMEOUT_SECONDS,
            driver_info=REDIS_DRIVER,
            **redis_reconnects(),
        ),
        close_redis,
    )


async def close_redis(redis: Redis) -> None:
    """Closes a Redis client once nothing can use it any more: the calls kit's
    helpers gave up on and left running end first (`settle_redis_calls`), else
    one still connecting would open its connection after the pool was closed."""
    await settle_redis_calls(redis)
    await redis.aclose()


async def open_verifier(
    parts: Parts, settings: ServiceSettings, *, redis: Redis, keys: KeySource | None = None
) -> TokenVerifier:
    """The service's token verifier, started: its revocation mirror on `redis`,
    and its keys from `keys`, else from auth's JWKS over a client of its own."""
    http = None if keys is not None else await parts.enter(httpx.AsyncClient())
    verifier = TokenVerifier.for_service(settings, redis=redis, keys=keys, http=http)
    return await parts.enter(verifier)
