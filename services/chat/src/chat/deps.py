"""Annotated dependency aliases: routes read the lifespan state through these."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from chat.config import Settings
from chat.presence import Presence
from chat.schemas import ROOM_PATTERN


def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


def get_engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.state.engine
    return engine


def get_presence(request: Request) -> Presence:
    presence: Presence = request.state.presence
    return presence


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[AsyncEngine, Depends(get_engine)]
PresenceDep = Annotated[Presence, Depends(get_presence)]
RoomPath = Annotated[
    str, Path(pattern=ROOM_PATTERN, description="Room name: 1-64 of A-Z a-z 0-9 _ -")
]
