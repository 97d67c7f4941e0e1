"""Redis pub/sub between chat replicas: the one module that knows channel names.

Each replica holds one subscriber connection with a pattern subscription to
every room channel plus a channel of its own for readiness probes, so a room
needs no subscribe round trip when its first socket arrives. Payloads carry a
small header in front of the frame the clients receive, so a replica routes a
message without parsing its JSON:

    m:<id>:<message frame>       a stored message of the room
    m:<id>/<traceparent>:<frame> the same, sent inside a trace (W3C traceparent)
    p:<node>:<presence frame>    a presence diff from replica <node>

The trace context is optional: a message without it (tracing off, or from a
replica older than tracing) is delivered all the same. A replica older than
tracing cannot read the traced form, so turn tracing on once every chat
replica runs a version that has it.

When the subscriber connection breaks, the bus reconnects with jittered
exponential backoff, subscribes again and then calls `on_resync` (given to
`start`, with `on_message`), which reads from PostgreSQL whatever the replica
missed. Publishes that fail meanwhile are kept (bounded) and sent again after
the reconnect; a publish that fails while the bus is taken for up (Redis
frozen: a partition, a server stuck in a long command) starts that reconnect
itself, so the publishes after it are kept at once rather than each waiting
out its timeout. Meanwhile the other replicas' messages still arrive: each
room here reads from PostgreSQL what it has not delivered
(`main.catch_up_loop`).

The publisher is a pool of its own (`main`): publishing never waits for a
connection that presence or the limits hold. `publish_many` sends a batch in
one pipeline (a presence flush: one publication per changed room).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from kit.pools import REDIS_DRIVER
from kit.tasks import cancel_and_wait

logger = logging.getLogger("chat.bus")

ROOM_PREFIX = "chat:room:"
ROOM_PATTERN = ROOM_PREFIX + "*"
BACKLOG_LIMIT = 10_000


def room_channel(room: str) -> str:
    return ROOM_PREFIX + room


def node_channel(node: str) -> str:
    return f"chat:node:{node}"


def message_payload(message_id: int, frame: str, traceparent: str | None = None) -> str:
    if traceparent:
        return f"m:{message_id}/{traceparent}:{frame}"
    return f"m:{message_id}:{frame}"


def message_head(head: str) -> tuple[int, str | None]:
    """The message id and the trace context (or None) of an `m:` payload's head."""
    message_id, _, traceparent = head.partition("/")
    return int(message_id), traceparent or None


def presence_payload(node: str, frame: str) -> str:
    return f"p:{node}:{frame}"


MessageHandler = Callable[[str, str], None]
"""Called with (room, payload) for every publication on a room channel."""


def _ignore_message(room: str, payload: str) -> None:
    """Before `start`: nobody listens yet."""


def _nothing() -> None:
    pass


class Bus:
    def __init__(
        self,
        *,
        url: str,
        node_id: str,
        publisher: Redis,
        backoff_max_seconds: float = 5.0,
    ) -> None:
        self.url = url
        self.node_id = node_id
        self.publisher = publisher
        self.on_message: MessageHandler = _ignore_message
        self.on_resync: Callable[[], None] = _nothing
        self.backoff_max_seconds = backoff_max_seconds
        self.connected = asyncio.Event()
        self._probes: dict[str, asyncio.Future[None]] = {}
        self._backlog: deque[tuple[str, str]] = deque(maxlen=BACKLOG_LIMIT)
        # one flusher of the backlog at a time (the reconnect's and the heartbeat's)
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._subscriber: Redis | None = None
        self._reconnects = 0

    @property
    def reconnects(self) -> int:
        """How many times the subscriber came back after losing Redis."""
        return self._reconnects

    @property
    def backlog_size(self) -> int:
        """Publications kept for after the reconnect."""
        return len(self._backlog)

    def start(self, *, on_message: MessageHandler, on_resync: Callable[[], None]) -> None:
        """Subscribes, and hands every room publication to `on_message`, and
        every reconnect to `on_resync` (the hub: `Hub.on_bus_message`, `Hub.resync`)."""
        self.on_message, self.on_resync = on_message, on_resync
        self._task = asyncio.create_task(self._run(), name="chat-bus")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            # never waits for good on a task that lost its cancellation
            await cancel_and_wait(task)
        await self._close_subscriber()

    def force_reconnect(self) -> None:
        """Drops the subscriber (it stopped hearing the bus) and connects a fresh one."""
        self.connected.clear()
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.create_task(self._run(reconnecting=True), name="chat-bus")

    async def publish(self, channel: str, payload: str) -> None:
        """Publishes now, or keeps the payload for after the reconnect."""
        if not self.connected.is_set():
            self._backlog.append((channel, payload))
            return
        try:
            await self.publisher.publish(channel, payload)
        except (RedisError, OSError) as error:
            logger.warning("publish to %s failed, kept for later: %s", channel, error)
            self._backlog.append((channel, payload))
            self._publish_failed()

    async def publish_many(self, publications: list[tuple[str, str]]) -> None:
        """Publishes (channel, payload) pairs in one round trip, or keeps them."""
        if not publications:
            return
        if not self.connected.is_set():
            self._backlog.extend(publications)
            return
        try:
            async with self.publisher.pipeline(transaction=False) as pipe:
                for channel, payload in publications:
                    pipe.publish(channel, payload)
                await pipe.execute()
        except (RedisError, OSError) as error:
            logger.warning("publishing %d payloads failed, kept: %s", len(publications), error)
            self._backlog.extend(publications)
            self._publish_failed()

    def _publish_failed(self) -> None:
        """A publish that failed on a bus taken for up: the subscriber starts
        over, and until it is back every publication is kept at once instead
        of waiting out its own timeout (a frozen Redis would otherwise hold each
        sender's next frame that long). The reconnect republishes what was kept
        and reads what this replica missed."""
        if self.connected.is_set():
            self.force_reconnect()

    async def probe(self, within: float) -> None:
        """Publishes on this replica's own channel and waits for it to come back:
        proof that the subscriber still hears the bus, not only that Redis answers."""
        if not self.connected.is_set():
            raise RuntimeError("bus subscriber is not connected")
        token = uuid.uuid4().hex
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probes[token] = arrived
        try:
            await self.publisher.publish(node_channel(self.node_id), token)
            async with asyncio.timeout(within):
                await arrived
        finally:
            self._probes.pop(token, None)

    async def _run(self, *, reconnecting: bool = False) -> None:
        delay = 0.05
        while True:
            try:
                subscriber = await self._connect()
                delay = 0.05
                if reconnecting:
                    self._reconnects += 1
                reconnecting = True
                self.connected.set()
                logger.info("bus subscribed")
                self.on_resync()
                await self._flush_backlog()
                await self._listen(subscriber)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure means: reconnect
                logger.warning("bus connection lost: %s", error)
            self.connected.clear()
            await self._close_subscriber()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.backoff_max_seconds)

    async def _connect(self) -> Any:
        await self._close_subscriber()
        self._subscriber = Redis.from_url(
            self.url,
            decode_responses=True,
            socket_connect_timeout=2.0,
            socket_keepalive=True,
            driver_info=REDIS_DRIVER,
        )
        pubsub = self._subscriber.pubsub()
        await pubsub.psubscribe(ROOM_PATTERN)
        await pubsub.subscribe(node_channel(self.node_id))
        confirmed = 0
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a
        # cancellation that comes as the reply does, and the bus stopped (or
        # replaced by a reconnect) would listen on for good
        async with asyncio.timeout(5.0):
            while confirmed < 2:  # both confirmations: the subscriptions are live from here
                reply = await pubsub.get_message(timeout=None)
                if reply is not None and reply["type"] in ("subscribe", "psubscribe"):
                    confirmed += 1
        return pubsub

    async def _listen(self, pubsub: Any) -> None:
        own_channel = node_channel(self.node_id)
        while True:
            reply = await pubsub.get_message(timeout=None)
            if reply is None:
                continue
            kind = reply["type"]
            if kind == "pmessage":
                channel: str = reply["channel"]
                self._dispatch(channel[len(ROOM_PREFIX) :], reply["data"])
            elif kind == "message" and reply["channel"] == own_channel:
                arrived = self._probes.get(reply["data"])
                if arrived is not None and not arrived.done():
                    arrived.set_result(None)

    def _dispatch(self, room: str, payload: str) -> None:
        try:
            self.on_message(room, payload)
        except Exception:
            logger.exception("handling a bus message for room %s failed", room)

    async def flush(self) -> None:
        """Sends kept publications now, if the bus is up and nobody is sending
        them already (the heartbeat calls this)."""
        if self._backlog and self.connected.is_set() and not self._flushing.locked():
            try:
                await self._flush_backlog()
            except (RedisError, OSError) as error:
                logger.warning("republishing kept messages failed: %s", error)

    async def _flush_backlog(self) -> None:
        """Publishes the kept publications in order, each once: one flusher at a
        time, and an entry leaves the backlog only once it is published (and
        only if a full backlog did not drop it meanwhile)."""
        async with self._flushing:
            backlog = self._backlog
            while backlog:
                entry = backlog[0]
                await self.publisher.publish(*entry)
                if backlog and backlog[0] is entry:
                    backlog.popleft()

    async def _close_subscriber(self) -> None:
        subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            with contextlib.suppress(Exception):
                await subscriber.aclose()
