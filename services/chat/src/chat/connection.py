"""One socket's state and its writer; nothing else writes it.

A `Connection` holds who the socket speaks for, a bounded outbox drained by
its own writer task, its token's expiry timer, and how it closes. The hub
pushes frames into the outbox and never awaits the socket, so a slow consumer
cannot hold up a room; an outbox that overflows gets the socket dropped
instead (close 4008). The endpoint (chat.endpoint) starts it once the
handshake is done and stops it when the socket ends.

A frame pushed while the writer is idle (nothing queued, nothing being sent)
is written to the socket's transport there and then, already encoded
(`kit.websocket.write_frame`): a room's message is framed once for all its
sockets, and no task wakes for it. Anything else (the socket's transport
paused, a replay running, frames queued) goes through the outbox and the
writer, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from starlette.websockets import WebSocket

from chat.schemas import StoredMessage
from kit.websocket import WebSocketProtocol, frames_of, text_frame

if TYPE_CHECKING:
    from kit.security import Principal

logger = logging.getLogger("chat.connection")

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_SHUTDOWN = 1012
CLOSE_TRY_AGAIN = 1013
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_TOKEN_REVOKED = 4003
CLOSE_SLOW_CONSUMER = 4008


class Replay(NamedTuple):
    """What a socket that asked for `?since=<id>` is sent before the live feed."""

    since: int
    read_after: Callable[[int], Awaitable[Sequence[StoredMessage]]]
    """A page of the room's stored messages above an id, oldest first."""
    page_size: int


class Connection:
    """One socket: who it is, its outbox, the tasks that serve it, how it closes."""

    __slots__ = (
        "_dropped",
        "_expiry",
        "_frames",
        "_handler",
        "_outbox",
        "_present",
        "_waiter",
        "_writer",
        "close_code",
        "close_reason",
        "display_name",
        "email_verified",
        "expires_at",
        "id",
        "issued_at",
        "jti",
        "last_sent_id",
        "limit",
        "room",
        "user_id",
        "websocket",
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
        self._dropped = False
        self._present = False
        self._writer: asyncio.Task[None] | None = None
        self._handler: asyncio.Task[object] | None = None
        self._outbox: deque[tuple[int, str] | None] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._frames: WebSocketProtocol | None = frames_of(websocket.scope)

    # -- life ---------------------------------------------------------------

    def start(
        self, *, after: int, first_frames: list[str], replay: Replay | None, close_on_expiry: bool
    ) -> bool:
        """Starts the writer in the calling task (the socket's handler): the
        first frames, then the replay, then every message above `after`.
        False if the socket was dropped before it could start."""
        if self._dropped:
            return False
        self._handler = asyncio.current_task()
        self.last_sent_id = after
        self._writer = asyncio.create_task(self._write(first_frames, replay))
        self.schedule_expiry(self.expires_at, close_on_expiry)
        return True

    @property
    def writer(self) -> asyncio.Task[None] | None:
        return self._writer

    @property
    def dropped(self) -> bool:
        """Whether the socket was dropped (slow consumer, shutdown): its handler
        only sends the close frame."""
        return self._dropped

    def drop(self, code: int, reason: str) -> bool:
        """Stops serving the socket at once and cancels its handler, which then
        sends the close frame; False if it was dropped already."""
        if self._dropped:
            return False
        self._dropped = True
        self.close_code, self.close_reason = code, reason
        self.stop()
        if self._handler is not None and not self._handler.done():
            self._handler.cancel()
        return True

    def stop(self) -> None:
        """Ends the writer and the expiry timer (the socket is over)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()

    def mark_present(self) -> bool:
        """True if the socket now counts in its room's presence (and did not before)."""
        if self._present or self._dropped:
            return False
        self._present = True
        return True

    def mark_absent(self) -> bool:
        """True if the socket counted in its room's presence until now."""
        present, self._present = self._present, False
        return present

    # -- outgoing -----------------------------------------------------------

    def push(self, message_id: int, frame: str, encoded: bytes | None = None) -> bool:
        """Sends a message frame (id order; `encoded`: the same as `text_frame`
        makes it, shared by every socket of a room), at once if the writer is
        idle, else through the outbox; False when the outbox is full."""
        if (
            self._waiter is not None  # the writer waits on an empty outbox...
            and not self._outbox  # ...and was not woken for a frame that failed this test
            and (message_id == 0 or message_id > self.last_sent_id)
            and self._frames is not None
            and self._frames.write_frame(encoded or text_frame(frame))
        ):
            if message_id:
                self.last_sent_id = message_id
            return True
        if len(self._outbox) >= self.limit:
            return False
        self._outbox.append((message_id, frame))
        self._wake()
        return True

    @property
    def queued(self) -> int:
        """Frames waiting in the outbox."""
        return len(self._outbox)

    def push_frame(self, frame: str, encoded: bytes | None = None) -> bool:
        """Sends a frame outside the id order (presence, errors, acknowledgements)."""
        return self.push(0, frame, encoded)

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

    async def _write(self, first_frames: list[str], replay: Replay | None) -> None:
        """Sends `first_frames`, then the replay, then the outbox until closed."""
        websocket = self.websocket
        try:
            for frame in first_frames:
                await websocket.send_text(frame)
            if replay is not None and not await self._replay(replay):
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

    async def _replay(self, replay: Replay) -> bool:
        """Sends the stored messages above `since`; False (and closes) if it failed."""
        try:
            self.last_sent_id = replay.since
            while True:
                page = await replay.read_after(self.last_sent_id)
                for message in page:
                    await self.websocket.send_text(message.frame())
                    self.last_sent_id = message.id
                if len(page) < replay.page_size:
                    return True
        except Exception as error:
            if isinstance(error, asyncio.CancelledError):
                raise
            logger.warning("replay for %s failed: %s", self.id, error)
            await self.websocket.close(CLOSE_INTERNAL, "replay failed; reconnect with since")
            return False

    # -- its token ----------------------------------------------------------

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
