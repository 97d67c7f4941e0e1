"""Local fan-out: the sockets of each room on this replica, in id order.

A `RoomFeed` exists while a room has sockets here. It remembers the highest
message id it delivered. Messages arrive from this replica's own senders and
from the bus, in any order and possibly twice: an id at or below the mark is
dropped, the next id is delivered (then any buffered successors), a later id
is buffered, and if the hole is still open after `gap_fill_wait_ms` the feed
reads the missing ids from PostgreSQL. Ids are assigned in commit order, so
once id n is published every id below it is already readable.

The hub tracks which sockets (each a `chat.connection.Connection`) are in
which room, delivers to them, and drops one whose outbox overflows (close
4008); it never writes a socket's state itself.

Presence diffs, this replica's and those the bus brings from the others,
wait in their room's feed for `presence_gather_seconds` after the first and
go to the room's sockets together: the replicas flush on the same ticks of
the wall clock (`chat.main.presence_loop`), so a member gets one frame per
tick, not one per replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from chat import service, tracing
from chat.bus import Bus, message_head, message_payload, presence_payload, room_channel
from chat.config import Settings
from chat.connection import (
    CLOSE_SHUTDOWN,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOKEN_REVOKED,
    Connection,
)
from chat.metrics import ChatMetrics
from chat.presence import Presence
from chat.schemas import StoredMessage, presence_frames, presence_listing_frame
from kit.security import revoked_among
from kit.websocket import text_frame

logger = logging.getLogger("chat.hub")

PENDING_LIMIT = 10_000
"""Ahead-of-order messages one feed buffers; beyond it they are re-read from PostgreSQL."""
RECENT_FRAMES = 64
"""Frames a feed keeps of what it delivered last: a socket resuming with a `since`
among them is sent them from memory, not read from PostgreSQL."""


class RoomFeed:
    """One room's ordered stream on this replica."""

    __slots__ = (
        "_again",
        "_fill_task",
        "_gap_timer",
        "_presence_timer",
        "connections",
        "delivered",
        "hub",
        "pending",
        "presence",
        "ready",
        "recent",
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
        # the frames of ids delivered - len(recent) + 1 ... delivered, in order
        self.recent: deque[str] = deque(maxlen=RECENT_FRAMES)
        self.started: asyncio.Task[None] | None = None
        self._gap_timer: asyncio.TimerHandle | None = None
        self._fill_task: asyncio.Task[None] | None = None
        # a catch-up was asked for while a read was under way or the feed was
        # starting: that read may predate what it was asked for, so read again
        self._again = False
        # presence diffs gathered for the room's next presence frame (`gather_presence`)
        self.presence: list[str] = []
        self._presence_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        """The bus already hears the room (pattern subscription), so any id above
        the `last_id` read now reaches the feed; those at or below it are history."""
        self.delivered = await service.room_last_id(engine=self.hub.engine, room=self.room)
        self.ready = True
        self._after_change()
        if self._again:
            self.catch_up()

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

    def frames_after(self, since: int, upto: int) -> list[str] | None:
        """The frames of ids above `since` up to `upto` from memory, or None
        unless the feed still holds every one of them."""
        first_held = self.delivered - len(self.recent) + 1
        if since + 1 < first_held or upto > self.delivered:
            return None
        if since >= upto:
            return []
        return list(itertools.islice(self.recent, since + 1 - first_held, upto + 1 - first_held))

    def _deliver(self, message_id: int, frame: str) -> None:
        self.delivered = message_id
        self.recent.append(frame)
        self.hub.metrics.deliveries.inc(len(self.connections))
        self.hub.metrics.delivered(frame)
        encoded = text_frame(frame)  # once for every socket of the room
        overflowed = [
            conn for conn in self.connections if not conn.push(message_id, frame, encoded)
        ]
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
        """Reads every stored id above the mark (a hole, or a bus outage); asked
        while a read is under way or the feed starts, it reads again after."""
        if self._gap_timer is not None:
            self._gap_timer.cancel()  # asked before the hole's timer: this read covers it
            self._gap_timer = None
        if self._fill_task is not None or not self.ready:
            self._again = True
            return
        self._again = False
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
        elif self._again:
            self.catch_up()

    def gather_presence(self, frame: str, wait: float) -> None:
        """Keeps a presence diff for the room's next frame, sent `wait` seconds
        after the first diff gathered (at once with no wait)."""
        self.presence.append(frame)
        if wait <= 0:
            self.send_presence()
        elif self._presence_timer is None:
            self._presence_timer = asyncio.get_running_loop().call_later(wait, self.send_presence)

    def send_presence(self) -> None:
        """Sends the gathered diffs: one as it came, several as one frame (`diffs`)."""
        self._presence_timer = None
        diffs, self.presence = self.presence, []
        if diffs:
            frame = diffs[0] if len(diffs) == 1 else presence_frames(self.room, diffs)
            metrics = self.hub.metrics
            metrics.presence_frames.inc()
            metrics.presence_diffs.inc(len(diffs))
            self.hub.push_to_room(self, frame)

    def close(self) -> None:
        self.presence = []
        if self._presence_timer is not None:
            self._presence_timer.cancel()
            self._presence_timer = None
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
        bus: Bus,
        metrics: ChatMetrics,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.settings = settings
        self.presence = presence
        self.bus = bus
        self.node_id = settings.node_id
        self.gap_fill_wait = settings.gap_fill_wait_ms / 1000
        self.presence_gather = settings.presence_gather_seconds
        self.feeds: dict[str, RoomFeed] = {}
        # rooms whose sockets here get the presence listing at the next flush:
        # the bus was away, and the other replicas' diffs it carried are lost
        self._relist: set[str] = set()

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
        return feed.delivered

    def leave(self, connection: Connection) -> bool:
        """Removes the socket; False if it had already left."""
        feed = self.feeds.get(connection.room)
        if feed is None or connection not in feed.connections:
            return False
        feed.connections.discard(connection)
        self.metrics.sockets.dec()
        if connection.mark_absent():
            self.presence.left(connection.room, connection.user_id, connection.display_name)
        if not feed.connections:
            del self.feeds[connection.room]
            feed.close()
        return True

    def recent_frames(self, room: str, since: int, upto: int) -> list[str] | None:
        """The room's frames of ids above `since` up to `upto`, if this replica
        still holds them all in memory (see `RoomFeed.frames_after`)."""
        feed = self.feeds.get(room)
        return None if feed is None else feed.frames_after(since, upto)

    def kick(self, connection: Connection, code: int, reason: str) -> None:
        """Drops a socket at once (the room never waits for it) and ends its tasks;
        its handler then sends the close frame, given time for the buffer to drain."""
        if not connection.drop(code, reason):
            return
        if code == CLOSE_SLOW_CONSUMER:
            self.metrics.slow_consumers.inc()
        self.leave(connection)

    # -- messages ---------------------------------------------------------

    def offer(self, room: str, message_id: int, frame: str) -> None:
        feed = self.feeds.get(room)
        if feed is not None:
            feed.offer(message_id, frame)

    def delivered_here(self, message: StoredMessage) -> bool:
        """Whether this replica's feed of the room has delivered `message`."""
        feed = self.feeds.get(message.room)
        return feed is not None and feed.ready and message.id <= feed.delivered

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
            feed.gather_presence(frame, self.presence_gather)

    async def catch_up_behind(self) -> None:
        """Reads the messages a room's feed here has not delivered though they
        were stored: one whose publication never happened (its replica killed
        between the commit and the publish) and that nobody sent again reaches
        the room within a heartbeat, not only when a later message shows the
        hole. A message on its way (committed, publication under way) is read
        too; its publication is then dropped as delivered."""
        feeds = [feed for feed in self.feeds.values() if feed.ready]
        if not feeds:
            return
        last_ids = await service.rooms_last_ids(
            engine=self.engine, rooms=[feed.room for feed in feeds]
        )
        for feed in feeds:
            if last_ids.get(feed.room, 0) > feed.delivered:
                feed.catch_up()

    def resync(self) -> None:
        """After the bus came back: read what every room missed meanwhile, and
        give the sockets here each room's presence whole at the next flush
        (Redis keeps no diff for a subscriber that was away)."""
        for feed in list(self.feeds.values()):
            feed.catch_up()
        self._relist.update(self.feeds)

    # -- presence ---------------------------------------------------------

    def announce(self, connection: Connection) -> None:
        """Counts the socket in its room's presence; the next diff tells the room."""
        if connection.mark_present():
            self.presence.joined(connection.room, connection.user_id, connection.display_name)

    async def flush_presence(self) -> None:
        """Writes what changed to Redis and sends each changed room its diff,
        here and through the bus (one pipeline for all rooms)."""
        frames = await self.presence.flush()
        await self._tell_rooms(list(frames.items()))
        if self._relist:
            await self._send_listings()

    async def _send_listings(self) -> None:
        """Each room waiting for it gets its listing, to the sockets here: a
        `presence` frame with `listing`, which a client takes as it takes the
        listing it reads over HTTP. A room whose read fails waits for the next
        flush."""
        rooms, self._relist = self._relist, set()
        for room in sorted(rooms):
            feed = self.feeds.get(room)
            if feed is None or not feed.connections or not self.settings.presence_frames:
                continue
            try:
                listing = await self.presence.listing(room)
            except (RedisError, OSError) as error:
                logger.warning("presence of room %s not sent again (retried): %s", room, error)
                self._relist.add(room)
                continue
            if room in self.feeds:
                self.push_to_room(self.feeds[room], presence_listing_frame(listing))

    async def presence_heartbeat(self) -> None:
        """Keeps this replica's presence alive, and tells rooms about dead replicas."""
        await self._tell_rooms(await self.presence.heartbeat())

    async def _tell_rooms(self, frames: list[tuple[str, str]]) -> None:
        """Presence frames to the rooms' sockets here, and through the bus."""
        if not frames or not self.settings.presence_frames:
            return
        for room, frame in frames:
            feed = self.feeds.get(room)
            if feed is not None:
                feed.gather_presence(frame, self.presence_gather)
        await self.bus.publish_many(
            [(room_channel(room), presence_payload(self.node_id, frame)) for room, frame in frames]
        )

    def push_to_room(self, feed: RoomFeed, frame: str) -> None:
        encoded = text_frame(frame)
        overflowed = [conn for conn in feed.connections if not conn.push_frame(frame, encoded)]
        for connection in overflowed:
            self.kick(connection, CLOSE_SLOW_CONSUMER, "slow consumer")

    async def close_revoked(self, redis: Redis) -> None:
        """Closes sockets whose token was revoked (logout) since they connected (4003).

        Sockets holding the same token share one verdict, so each token is read
        from Redis once however many sockets hold it: a user's tabs and devices
        often reuse one token, and the check runs at every heartbeat."""
        holders: dict[tuple[str, str, int], list[Connection]] = {}
        for connection in self.connections():
            token = (connection.jti, connection.user_id, connection.issued_at)
            holders.setdefault(token, []).append(connection)
        tokens = [sockets[0] for sockets in holders.values()]
        revoked = await revoked_among(redis, tokens)
        for sockets, refused in zip(holders.values(), revoked, strict=True):
            if refused:
                for connection in sockets:
                    connection.request_close(CLOSE_TOKEN_REVOKED, "token revoked")

    def connections(self) -> list[Connection]:
        """Every socket of this replica."""
        return [conn for feed in self.feeds.values() for conn in feed.connections]

    def outbox_depths(self) -> list[int]:
        """Frames queued per socket (the metrics read it at scrape time)."""
        return [conn.queued for feed in self.feeds.values() for conn in feed.connections]

    # -- lifecycle --------------------------------------------------------

    async def close_all(self, code: int, reason: str) -> None:
        """Closes every socket; each handler then ends on its own."""
        connections = self.connections()
        for connection in connections:
            connection.request_close(code, reason)
        writers = [conn.writer for conn in connections if conn.writer is not None]
        if writers:
            await asyncio.wait(writers, timeout=2.0)
        for connection in connections:
            self.kick(connection, code, reason)

    async def shut_down(self) -> None:
        """The app is stopping: every socket is closed with 1012."""
        await self.close_all(CLOSE_SHUTDOWN, "server shutting down")
