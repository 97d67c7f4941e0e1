"""The chat WebSocket endpoint: one socket from the handshake to the close.

It authenticates the socket, joins it to its room (chat.hub), starts its
`Connection` (chat.connection) and reads the client's frames.

Refusals before the handshake completes are ASGI closes with 1008 (bad token,
bad room, bad `since`) or 1013 (PostgreSQL or Redis unreachable); uvicorn turns
a close before accept into an HTTP 403 answer to the upgrade request, so that
is what clients see. After the `ready` frame every close carries a code from
`chat.connection` (4001 token expired, 4003 token revoked, 4008 slow consumer,
1012 shutdown, 1011 replay failed). A socket beyond the user's limit is
accepted and closed at once with 4029 (`chat.limits`), so the client can
read why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

from fastapi import WebSocket
from fastapi.exceptions import WebSocketRequestValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from chat import service
from chat.config import Settings
from chat.connection import (
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TRY_AGAIN,
    Connection,
    Replay,
)
from chat.hub import Hub
from chat.limits import CLOSE_TOO_MANY_SOCKETS, UserLimits
from chat.schemas import (
    StoredMessage,
    dumps,
    error_frame,
    invalid_frame,
    rate_limited_frame,
    ready_frame,
    valid_room,
)
from chat.tracing import message_span
from kit.accesslog import AccessLogMiddleware
from kit.errors import ServiceUnavailable, Unauthenticated
from kit.inputs import json_errors, screen_request, too_deep
from kit.middleware import RequestIdMiddleware, TrustedHostMiddleware
from kit.observe import ROUTE_TEMPLATE_KEY, remember_user
from kit.security import (
    Principal,
    TokenVerifier,
    bearer_from_headers,
    bearer_from_subprotocols,
)
from kit.tracing import TracingMiddleware, tracing_enabled
from kit.websocket import release_headers

logger = logging.getLogger("chat.socket")

BEARER_SUBPROTOCOL = "bearer"
SOCKET_PREFIX = "/chat/ws/"
SOCKET_ROUTE = "/chat/ws/{room}"


class SocketEntry:
    """`/chat/ws/<room>` straight from the server, ahead of FastAPI (see
    `chat.main.ChatApp`).

    A socket lives for hours, and every ASGI layer it passes keeps a frame,
    often a closure and an exit stack, for as long: through FastAPI (its own
    telemetry and body-limit layers, Starlette's error middleware, kit's
    middleware, routing, dependencies) that was about 17 KB a socket. A socket
    here passes only the layers whose work it needs: the request id (logs and
    the `X-Request-ID` of the handshake), the server span when tracing is on,
    the access log's open and close lines, then the host check and the input
    screen. Every other request, and any other WebSocket path, goes to FastAPI."""

    def __init__(self, *, allowed_hosts: list[str]) -> None:
        socket: ASGIApp = AccessLogMiddleware(self._socket)
        # only its check is used: a refused host is answered here, as a socket
        self.hosts = TrustedHostMiddleware(socket, allowed_hosts=allowed_hosts)
        if tracing_enabled():
            socket = TracingMiddleware(socket)
        self.socket = RequestIdMiddleware(socket)

    @staticmethod
    def serves(scope: Scope) -> bool:
        """Whether `scope` is a socket of a room (`/chat/ws/<room>`)."""
        if scope["type"] != "websocket":
            return False
        path: str = scope.get("path", "")
        return path.startswith(SOCKET_PREFIX) and "/" not in path[len(SOCKET_PREFIX) :]

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Serves a socket `serves` took; returns the socket's coroutine rather
        than awaiting it, so this layer keeps no frame for the socket's life."""
        scope["path_params"] = {"room": scope["path"][len(SOCKET_PREFIX) :]}
        scope[ROUTE_TEMPLATE_KEY] = SOCKET_ROUTE
        return self.socket(scope, receive, send)

    async def _socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        hosts = self.hosts
        if not hosts.allow_any and not hosts.is_allowed(Headers(scope=scope).get("host", "")):
            await send({"type": "websocket.close", "code": CLOSE_POLICY, "reason": "Invalid host"})
            return
        websocket = WebSocket(scope, receive, send)
        try:
            await screen_request(websocket)
        except WebSocketRequestValidationError:
            await websocket.close(CLOSE_POLICY, "invalid input")
            return
        await chat_socket(websocket, scope["path_params"]["room"])


EMAIL_NOT_VERIFIED = (
    "Confirm your email address before sending messages, then renew the token (an auth frame)"
)


def parse_since(raw: str | None) -> int | bool | None:
    """The `since` query parameter: None when absent, False when invalid
    (ASCII digits only: `isdigit` also takes "²", which `int` refuses)."""
    if raw is None:
        return None
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else False


async def authenticate(websocket: WebSocket, verifier: TokenVerifier) -> tuple[Principal, bool]:
    """The principal, and whether the token came as the `bearer` subprotocol."""
    token = bearer_from_headers(websocket.headers.get("authorization"))
    via_subprotocol = False
    if token is None:
        token = bearer_from_subprotocols(websocket.scope.get("subprotocols", []))
        via_subprotocol = token is not None
    if token is None:
        raise Unauthenticated("A bearer token is required")
    return await verifier.verify(token), via_subprotocol


def replay_after(hub: Hub, room: str, since: int) -> Replay:
    page_size = hub.settings.replay_page_size

    def read_after(after: int) -> Awaitable[list[StoredMessage]]:
        return service.messages_after(engine=hub.engine, room=room, after=after, limit=page_size)

    return Replay(since=since, read_after=read_after, page_size=page_size)


def resume_point(
    hub: Hub, room: str, *, last_id: int, since: int | None
) -> tuple[int, list[str], Replay | None]:
    """Where a socket starts: the id the live feed starts after, the frames it
    is sent first, and the replay from PostgreSQL if one is needed.

    A socket resuming at or above the feed's mark needs nothing: every id above
    the mark reaches it through the feed, and none at or below `since` is sent
    again. One a few messages behind (a client whose replica died) is sent
    them from the feed's memory. Only one further behind reads PostgreSQL."""
    if since is None:
        return last_id, [], None
    if since >= last_id:
        return since, [], None
    held = hub.recent_frames(room, since, last_id)
    if held is not None:
        return last_id, held, None
    return last_id, [], replay_after(hub, room, since)


async def chat_socket(websocket: WebSocket, room: str) -> None:
    state = websocket.state
    settings: Settings = state.settings
    verifier: TokenVerifier = state.verifier

    since = parse_since(websocket.query_params.get("since"))
    if not valid_room(room) or since is False:
        await websocket.close(CLOSE_POLICY, "invalid room or since")
        return
    assert not isinstance(since, bool)
    try:
        principal, via_subprotocol = await authenticate(websocket, verifier)
    except Unauthenticated as error:
        await websocket.close(CLOSE_POLICY, error.detail)
        return
    except ServiceUnavailable as error:
        await websocket.close(CLOSE_TRY_AGAIN, error.detail)
        return

    remember_user(websocket.scope, principal.user_id)
    limits: UserLimits = state.limits
    subprotocol = BEARER_SUBPROTOCOL if via_subprotocol else None
    if not await limits.open_socket(principal.user_id):
        # accepted, so the client sees the close code and its reason
        await websocket.accept(subprotocol=subprotocol)
        limit = settings.max_sockets_per_user
        await websocket.close(CLOSE_TOO_MANY_SOCKETS, f"too many sockets (at most {limit})")
        return
    try:
        await serve_socket(websocket, principal, room=room, since=since, subprotocol=subprotocol)
    finally:
        await limits.close_socket(principal.user_id)


async def join_and_accept(connection: Connection, hub: Hub, subprotocol: str | None) -> int | None:
    """Joins the socket to its room, then completes the handshake; the id it
    starts after, or None if either failed (the socket is then closed)."""
    try:
        last_id = await hub.join(connection)
    except Exception as error:  # noqa: BLE001 - the database is unreachable
        logger.warning("joining room %s failed: %s", connection.room, error)
        await connection.websocket.close(CLOSE_TRY_AGAIN, "try again later")
        return None
    try:
        await connection.websocket.accept(subprotocol=subprotocol)
    except Exception:  # noqa: BLE001 - the client left during the handshake
        hub.leave(connection)
        return None
    return last_id


async def close_dropped(connection: Connection) -> None:
    """Sends the close frame of a socket the hub dropped."""
    code = connection.close_code or CLOSE_SLOW_CONSUMER
    await connection.websocket.close(code, connection.close_reason)


async def serve_socket(
    websocket: WebSocket,
    principal: Principal,
    *,
    room: str,
    since: int | None,
    subprotocol: str | None,
) -> None:
    """The socket from joining its room to its close."""
    state = websocket.state
    settings: Settings = state.settings
    hub: Hub = state.hub
    verifier: TokenVerifier = state.verifier
    connection = Connection(
        websocket=websocket, principal=principal, room=room, limit=settings.send_queue_size
    )
    last_id = await join_and_accept(connection, hub, subprotocol)
    if last_id is None:
        return
    release_headers(websocket.scope)
    after, missed, replay = resume_point(hub, room, last_id=last_id, since=since)
    first = [ready_frame(room=room, last_id=last_id, node=hub.node_id), *missed]
    if not connection.start(
        after=after,
        first_frames=first,
        replay=replay,
        close_on_expiry=settings.close_on_token_expiry,
    ):  # dropped while the handshake completed
        await close_dropped(connection)
        return
    hub.announce(connection)
    try:
        await receive_frames(
            connection, hub=hub, settings=settings, verifier=verifier, limits=state.limits
        )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not connection.dropped or task is None:
            raise
        task.uncancel()
        # the close frame waits behind whatever the peer has not read yet
        with contextlib.suppress(Exception):
            await asyncio.wait_for(close_dropped(connection), settings.slow_consumer_close_seconds)
    finally:
        connection.stop()
        hub.leave(connection)


def client_id_of(raw: str) -> str | None:
    """The `client_id` of a dropped frame, so its sender knows what to resend."""
    try:
        frame = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    client_id = frame.get("client_id") if isinstance(frame, dict) else None
    return client_id if isinstance(client_id, str) and not json_errors(client_id) else None


def reply(hub: Hub, connection: Connection, frame: str) -> None:
    if not connection.push_frame(frame):
        hub.kick(connection, CLOSE_SLOW_CONSUMER, "slow consumer")


def parse_frame(raw: str) -> dict[str, Any] | str:
    """The client's frame as a JSON object, or the error frame that answers it."""
    try:
        frame = json.loads(raw)
    except ValueError:
        return error_frame("Frame is not valid JSON")
    except RecursionError:
        return invalid_frame([too_deep(())])
    if not isinstance(frame, dict):
        return error_frame("Frame must be a JSON object")
    if problems := json_errors(frame, ()):
        # NUL, lone surrogates, numbers beyond 64 bits: named, never stored
        return invalid_frame(problems)
    return frame


async def receive_frames(
    connection: Connection,
    *,
    hub: Hub,
    settings: Settings,
    verifier: TokenVerifier,
    limits: UserLimits,
) -> None:
    websocket = connection.websocket
    while True:
        event = await websocket.receive()
        if event["type"] == "websocket.disconnect":
            return
        if connection.close_code is not None:
            # closing: its token expired or was revoked, or the replica stops.
            # The close frame waits behind what was queued for the socket (a
            # client reading nothing keeps it there), and meanwhile nothing the
            # socket sends is taken: a logged-out session posts no more
            continue
        raw = event.get("text")
        # every frame counts, on the user's one allowance across sockets and
        # replicas: a binary or oversized one too
        if (wait := await limits.take_frame(connection.user_id)) > 0:
            client_id = client_id_of(raw) if raw and len(raw) <= settings.max_frame_chars else None
            reply(hub, connection, rate_limited_frame(retry_after=wait, client_id=client_id))
            continue
        if raw is None:
            reply(hub, connection, error_frame("Binary frames are not supported; send JSON text"))
            continue
        if len(raw) > settings.max_frame_chars:
            reply(hub, connection, error_frame(f"Frame too large (max {settings.max_frame_chars})"))
            continue
        frame = parse_frame(raw)
        if isinstance(frame, str):
            reply(hub, connection, frame)
            continue
        kind = frame.get("type")
        if kind == "message":
            with message_span(connection.room):
                await on_message(connection, frame, hub=hub, settings=settings)
        elif kind == "auth":
            await on_auth(connection, frame, hub=hub, settings=settings, verifier=verifier)
        else:
            reply(hub, connection, error_frame("Unknown frame type; expected message or auth"))


async def on_message(
    connection: Connection, frame: dict[str, Any], *, hub: Hub, settings: Settings
) -> None:
    if settings.verified_email_required and not connection.email_verified:
        reply(hub, connection, error_frame(EMAIL_NOT_VERIFIED))
        return
    text = frame.get("text")
    client_id = frame.get("client_id")
    limit = settings.max_text_length
    if not isinstance(text, str) or not 1 <= len(text) <= limit:
        reply(hub, connection, error_frame(f"text must be a string of 1..{limit} characters"))
        return
    id_limit = settings.max_client_id_length
    if client_id is not None and (
        not isinstance(client_id, str) or not 1 <= len(client_id) <= id_limit
    ):
        reply(
            hub, connection, error_frame(f"client_id must be a string of 1..{id_limit} characters")
        )
        return
    try:
        message, duplicate = await service.store_message(
            engine=hub.engine,
            room=connection.room,
            user_id=connection.user_id,
            display_name=connection.display_name,
            text=text,
            client_id=client_id,
            sent_at=datetime.now(UTC),
        )
    except Exception as error:  # noqa: BLE001 - tell the client; it may resend with its client_id
        logger.warning("storing a message in %s failed: %s", connection.room, error)
        reply(hub, connection, error_frame("Message not stored; try again"))
        return
    hub.metrics.messages.inc(0 if duplicate else 1)
    if duplicate and hub.delivered_here(message):
        # the sender's acknowledgement again; the room already has it once
        reply(hub, connection, message.frame())
    else:
        # a resend whose first copy was stored but never published (its
        # replica killed, or the database lost between the commit and its
        # answer) is published now: the room's feeds drop what they have had
        await hub.publish_message(message)


async def on_auth(
    connection: Connection,
    frame: dict[str, Any],
    *,
    hub: Hub,
    settings: Settings,
    verifier: TokenVerifier,
) -> None:
    token = frame.get("token")
    if not isinstance(token, str) or not token:
        reply(hub, connection, error_frame("auth needs a token"))
        return
    try:
        principal = await verifier.verify(token)
    except (Unauthenticated, ServiceUnavailable) as error:
        reply(hub, connection, error_frame(f"Token refused: {error.detail}"))
        return
    if principal.user_id != connection.user_id:
        reply(hub, connection, error_frame("Token refused: it is for another user"))
        return
    connection.renew(principal, settings.close_on_token_expiry)
    reply(hub, connection, dumps({"type": "auth", "expires_at": principal.expires_at}))
