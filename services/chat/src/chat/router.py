"""HTTP and WebSocket routes of chat; thin: parse, call, shape."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, WebSocket
from redis.exceptions import RedisError

from chat import service
from chat.deps import EngineDep, PresenceDep, RoomPath, SettingsDep
from chat.endpoint import chat_socket
from chat.schemas import HistoryPage, MessageOut, PresenceOut
from kit.deps import CurrentPrincipal
from kit.errors import ServiceUnavailable

router = APIRouter(prefix="/chat", tags=["chat"])


@router.get("/rooms/{room}/messages", summary="Room history, oldest first")
async def history(
    room: RoomPath,
    principal: CurrentPrincipal,
    engine: EngineDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, description="Only messages with a higher id")] = 0,
    limit: Annotated[int, Query(ge=1, description="Page size; capped by the server")] = 50,
) -> HistoryPage:
    limit = min(limit, settings.history_max_limit)
    messages = await service.messages_after(engine=engine, room=room, after=after, limit=limit)
    items = [MessageOut.model_validate(message.as_dict()) for message in messages]
    next_after = items[-1].id if len(items) == limit else None
    return HistoryPage(room=room, items=items, next_after=next_after)


@router.get("/rooms/{room}/presence", summary="Who is connected, across all replicas")
async def presence(
    room: RoomPath, principal: CurrentPrincipal, presence: PresenceDep
) -> PresenceOut:
    try:
        return await presence.listing(room)
    except (RedisError, OSError) as error:
        raise ServiceUnavailable("Presence is unavailable while Redis is unreachable") from error


@router.websocket("/ws/{room}")
async def websocket(websocket: WebSocket, room: str) -> None:
    """Token in `Authorization: Bearer` or the subprotocol pair `bearer, <token>`;
    optional `?since=<id>` replays what came after that id first."""
    await chat_socket(websocket, room)
