"""Local fan-out: the sockets of each room on this replica, in id order.

A `RoomFeed` exists while a room has sockets here. It remembers the highest
message id it delivered. Messages arrive from this replica's own senders and
from the bus, in any order and possibly twice: an id at or below the mark is
dropped, the next id is delivered (then any buffered successors), a later id
is buffered, and if the hole is still open after `gap_fill_wait_ms` the feed
reads the missing ids from PostgreSQL. Ids are assigned in commit order, so
once id n is published every id below it is already readable.

Each socket is a `Connection` with a bounded outbox drained by its own writer
task; delivering never awaits a socket, so a slow consumer cannot hold up a
room. Its outbox overflowing gets it disconnected instead (close 4008).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.websockets import WebSocket

from chat import service, tracing
from chat.bus import Bus, message_head, message_payload, presence_payload, room_channel
from chat.config import Settings
from chat.metrics import ChatMetrics
from chat.presence import Presence
from chat.schemas import StoredMessage
from kit.security import revoked_token_key, revoked_user_key

if TYPE_CHECKING:
    from kit.security import Principal

logger = logging.getLogger("chat.hub")

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_SHUTDOWN = 1012
CLOSE_TRY_AGAIN = 1013
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_TOKEN_REVOKED = 4003
REVOCATION_BATCH = 500
CLOSE_SLOW_CONSUMER = 4008

PENDING_LIMIT = 10_000
"""Ahead-of-order messages one feed buffers; beyond it they are re-read from PostgreSQL."""


class Connection:
    """One socket: who it is, its outbox and the tasks that serve it."""

    __slots__ = (
        "_expiry",
        "_outbox",
        "_waiter",
        "close_code",
        "close_reason",
        "display_name",
        "email_verified",
        "expires_at",
        "handler",
        "id",
        "issued_at",
        "jti",
        "kicked",
        "last_sent_id",
        "limit",
        "present",
        "room",
        "user_id",
        "websocket",
        "writer",
    )

    def __init__(
        self, *, websocket: WebSocket, principal: Principal, room: str, limit: int
    ) -> None:
        self.id = uuid.uuid4().hex
        self.websocket = websocket
        self.user_id = principal.user_id
        self.display_name = principal.name or principal.user_id
        self.expires_at = principal.expires_at
        self.jti = principal.jti
        self.issued_at = principal.issued_at
        self.email_verified = principal.email_verified
        self.room = room
        self.limit = limit
        self.last_sent_id = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.kicked = False
        self.present = False
        self.writer: asyncio.Task[None] | None = None
        self.handler: asyncio.Task[object] | None = None
        self._outbox: deque[tuple[int, str] | None] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None

    # -- outgoing ---------------------------------------------------------

    def push(self, message_id: int, frame: str) -> bool:
        """Queues a message frame (id order); False when the outbox is full."""
        if len(self._outbox) >= self.limit:
            return False
        self._outbox.append((message_id, frame))
        self._wake()
        return True

    @property
    def queued(self) -> int:
        """Frames waiting in the outbox."""
        return len(self._outbox)

    def push_frame(self, frame: str) -> bool:
        """Queues a frame outside the id order (presence, errors, acknowledgements)."""
        return self.push(0, frame)

    def request_close(self, code: int, reason: str) -> None:
        """Closes after the frames already queued; the close itself is never refused."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self._outbox.append(None)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run_writer(self, first_frames: list[str], replay: Replay | None) -> None:
        """Sends `first_frames`, then the replay, then the outbox until closed."""
        websocket = self.websocket
        try:
            for frame in first_frames:
                await websocket.send_text(frame)
            if replay is not None:
                try:
                    await replay(self)
                except Exception as error:
                    if isinstance(error, asyncio.CancelledError):
                        raise
                    logger.warning("replay for %s failed: %s", self.id, error)
                    await websocket.close(CLOSE_INTERNAL, "replay failed; reconnect with since")
                    return
            outbox = self._outbox
            while True:
                while not outbox:
                    self._waiter = asyncio.get_running_loop().create_future()
                    await self._waiter
                    self._waiter = None
                item = outbox.popleft()
                if item is None:
                    await websocket.close(self.close_code or CLOSE_NORMAL, self.close_reason)
                    return
                message_id, frame = item
                if message_id:
                    if message_id <= self.last_sent_id:
                        continue  # already sent by the replay
                    self.last_sent_id = message_id
                await websocket.send_text(frame)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the peer went away; the reader sees it too
            logger.debug("writer of %s ended: %s", self.id, error)

    # -- incoming ---------------------------------------------------------

    def renew(self, principal: Principal, close_on_expiry: bool) -> None:
        """Adopts a fresh token of the same user: its expiry, revocation identity
        and whether it vouches for the user's email."""
        self.jti, self.issued_at = principal.jti, principal.issued_at
        self.email_verified = principal.email_verified
        self.schedule_expiry(principal.expires_at, close_on_expiry)

    def schedule_expiry(self, expires_at: int, enabled: bool) -> None:
        self.expires_at = expires_at
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if enabled:
            delay = max(0.0, expires_at - time.time())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self.request_close(CLOSE_TOKEN_EXPIRED, "token expired")

    def dropped(self) -> bool:
        """Whether the hub dropped this socket (slow consumer, shutdown)."""
        return self.kicked

    def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()


Replay = Callable[[Connection], Awaitable[None]]


class RoomFeed:
    """One room's ordered stream on this replica."""

    __slots__ = (
        "_fill_task",
        "_gap_timer",
        "connections",
        "delivered",
        "hub",
        "pending",
        "ready",
        "room",
        "started",
    )

    def __init__(self, room: str, hub: Hub) -> None:
        self.room = room
        self.hub = hub
        self.connections: set[Connection] = set()
        self.delivered = 0
        self.ready = False
        self.pending: dict[int, str] = {}
        self.started: asyncio.Task[None] | None = None
        self._gap_timer: asyncio.TimerHandle | None = None
        self._fill_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The bus already hears the room (pattern subscription), so any id above
        the `last_id` read now reaches the feed; those at or below it are history."""
        self.delivered = await service.room_last_id(engine=self.hub.engine, room=self.room)
        self.ready = True
        self._after_change()

    def offer(self, message_id: int, frame: str) -> None:
        if not self.ready:
            if len(self.pending) < PENDING_LIMIT:
                self.pending[message_id] = frame
            return
        if message_id <= self.delivered:
            return
        if message_id == self.delivered + 1:
            self._deliver(message_id, frame)
            if self.pending:
                self._after_change()
            return
        if len(self.pending) < PENDING_LIMIT:
            self.pending[message_id] = frame
        self._schedule_fill(self.hub.gap_fill_wait)

    def _deliver(self, message_id: int, frame: str) -> None:
        self.delivered = message_id
        self.hub.metrics.deliveries.inc(len(self.connections))
        self.hub.metrics.delivered(frame)
        overflowed = [conn for conn in self.connections if not conn.push(message_id, frame)]
        for connection in overflowed:
            self.hub.kick(connection, CLOSE_SLOW_CONSUMER, "slow consumer")

    def _after_change(self) -> None:
        """Delivers buffered successors, forgets stale ones, and watches any hole left."""
        pending = self.pending
        for stale in [key for key in pending if key <= self.delivered]:
            del pending[stale]
        while (frame := pending.pop(self.delivered + 1, None)) is not None:
            self._deliver(self.delivered + 1, frame)
        if pending:
            self._schedule_fill(self.hub.gap_fill_wait)
        elif self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None

    def _schedule_fill(self, delay: float) -> None:
        if self._gap_timer is None and self._fill_task is None:
            loop = asyncio.get_running_loop()
            self._gap_timer = loop.call_later(delay, self.catch_up)

    def catch_up(self) -> None:
        """Reads every stored id above the mark (a hole, or a bus outage)."""
        self._gap_timer = None
        if self._fill_task is None and self.ready:
            self.hub.metrics.gap_fills.inc()
            self._fill_task = asyncio.create_task(self._fill(), name=f"fill-{self.room}")

    async def _fill(self) -> None:
        retry = False
        try:
            page_size = self.hub.settings.replay_page_size
            while True:
                page = await service.messages_after(
                    engine=self.hub.engine, room=self.room, after=self.delivered, limit=page_size
                )
                for message in page:
                    self.offer(message.id, message.frame())
                if len(page) < page_size:
                    break
        except Exception as error:  # noqa: BLE001 - the database will be back; try again
            logger.warning("filling room %s from the database failed: %s", self.room, error)
            retry = True
        finally:
            self._fill_task = None
        self._after_change()
        if retry and self.connections:
            self._schedule_fill(1.0)

    def close(self) -> None:
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None
        if self._fill_task is not None:
            self._fill_task.cancel()


class Hub:
    """Every room feed and socket of this replica."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        settings: Settings,
        presence: Presence,
        node_id: str,
        metrics: ChatMetrics,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.settings = settings
        self.presence = presence
        self.node_id = node_id
        self.gap_fill_wait = settings.gap_fill_wait_ms / 1000
        self.feeds: dict[str, RoomFeed] = {}
        self.bus: Bus | None = None
        self._background: set[asyncio.Task[None]] = set()

    # -- membership -------------------------------------------------------

    async def join(self, connection: Connection) -> int:
        """Adds the socket to its room's feed; returns the id it starts after."""
        room = connection.room
        feed = self.feeds.get(room)
        if feed is None:
            feed = RoomFeed(room, self)
            self.feeds[room] = feed
            feed.started = asyncio.create_task(feed.start(), name=f"start-{room}")
        assert feed.started is not None
        try:
            await asyncio.shield(feed.started)
        except Exception:
            if self.feeds.get(room) is feed and not feed.connections:
                del self.feeds[room]
                feed.close()
            raise
        if self.feeds.get(room) is not feed:  # a failed start was dropped meanwhile
            return await self.join(connection)
        feed.connections.add(connection)
        self.metrics.sockets.inc()
        connection.last_sent_id = feed.delivered
        return feed.delivered

    def leave(self, connection: Connection) -> bool:
        """Removes the socket; False if it had already left."""
        feed = self.feeds.get(connection.room)
        if feed is None or connection not in feed.connections:
            return False
        feed.connections.discard(connection)
        self.metrics.sockets.dec()
        if connection.present:
            connection.present = False
            self.presence.left(connection.room, connection.user_id, connection.display_name)
        if not feed.connections:
            del self.feeds[connection.room]
            feed.close()
        return True

    def kick(self, connection: Connection, code: int, reason: str) -> None:
        """Drops a socket at once (the room never waits for it) and ends its tasks;
        its handler then sends the close frame, given time for the buffer to drain."""
        if connection.kicked:
            return
        connection.kicked = True
        if code == CLOSE_SLOW_CONSUMER:
            self.metrics.slow_consumers.inc()
        connection.close_code, connection.close_reason = code, reason
        self.leave(connection)
        connection.stop()
        if connection.handler is not None and not connection.handler.done():
            connection.handler.cancel()

    # -- messages ---------------------------------------------------------

    def offer(self, room: str, message_id: int, frame: str) -> None:
        feed = self.feeds.get(room)
        if feed is not None:
            feed.offer(message_id, frame)

    async def publish_message(self, message: StoredMessage) -> None:
        """Delivers a just-committed message here at once, then to the other replicas."""
        frame = message.frame()
        tracing.stored(message.id)
        feed = self.feeds.get(message.room)
        if feed is not None:
            with tracing.deliver_span(
                message.room, message.id, None, sockets=len(feed.connections), node=self.node_id
            ):
                feed.offer(message.id, frame)
        if self.bus is not None:
            with tracing.publish_span(message.room, message.id) as traceparent:
                payload = message_payload(message.id, frame, traceparent)
                await self.bus.publish(room_channel(message.room), payload)

    def on_bus_message(self, room: str, payload: str) -> None:
        feed = self.feeds.get(room)
        if feed is None:
            return
        kind, _, rest = payload.partition(":")
        head, _, frame = rest.partition(":")
        if kind == "m":
            message_id, traceparent = message_head(head)
            if feed.ready and message_id <= feed.delivered:
                return  # delivered already: the sender's replica hears its own publications
            with tracing.deliver_span(
                room, message_id, traceparent, sockets=len(feed.connections), node=self.node_id
            ):
                feed.offer(message_id, frame)
        elif kind == "p" and head != self.node_id:
            self._push_to_room(feed, frame)

    def resync(self) -> None:
        """After the bus came back: read what every room missed meanwhile."""
        for feed in list(self.feeds.values()):
            feed.catch_up()

    # -- presence ---------------------------------------------------------

    def announce(self, connection: Connection) -> None:
        """Counts the socket in its room's presence; the next diff tells the room."""
        if not connection.present and not connection.kicked:
            connection.present = True
            self.presence.joined(connection.room, connection.user_id, connection.display_name)

    async def flush_presence(self) -> None:
        """Writes what changed to Redis and sends each changed room its diff,
        here and through the bus (one pipeline for all rooms)."""
        frames = await self.presence.flush()
        if not frames or not self.settings.presence_frames:
            return
        for room, frame in frames.items():
            feed = self.feeds.get(room)
            if feed is not None:
                self._push_to_room(feed, frame)
        if self.bus is not None:
            await self.bus.publish_many(
                [
                    (room_channel(room), presence_payload(self.node_id, frame))
                    for room, frame in frames.items()
                ]
            )

    def _push_to_room(self, feed: RoomFeed, frame: str) -> None:
        overflowed = [conn for conn in feed.connections if not conn.push_frame(frame)]
        for connection in overflowed:
            self.kick(connection, CLOSE_SLOW_CONSUMER, "slow consumer")

    async def close_revoked(self, redis: Redis) -> None:
        """Closes sockets whose token was revoked (logout) since they connected (4003)."""
        connections = [conn for feed in self.feeds.values() for conn in feed.connections]
        for start in range(0, len(connections), REVOCATION_BATCH):
            batch = connections[start : start + REVOCATION_BATCH]
            keys = []
            for conn in batch:
                keys += [revoked_token_key(conn.jti), revoked_user_key(conn.user_id)]
            values = await redis.mget(keys)
            for index, conn in enumerate(batch):
                token_revoked, user_revoked_before = values[2 * index], values[2 * index + 1]
                if token_revoked is not None or (
                    user_revoked_before is not None and conn.issued_at < float(user_revoked_before)
                ):
                    conn.request_close(CLOSE_TOKEN_REVOKED, "token revoked")

    def outbox_depths(self) -> list[int]:
        """Frames queued per socket (the metrics read it at scrape time)."""
        return [conn.queued for feed in self.feeds.values() for conn in feed.connections]

    # -- lifecycle --------------------------------------------------------

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close_all(self, code: int, reason: str) -> None:
        """Closes every socket (shutdown); each handler then ends on its own."""
        connections = [conn for feed in self.feeds.values() for conn in feed.connections]
        for connection in connections:
            connection.request_close(code, reason)
        writers = [conn.writer for conn in connections if conn.writer is not None]
        if writers:
            await asyncio.wait(writers, timeout=2.0)
        for connection in connections:
            self.kick(connection, code, reason)
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 1.0)
