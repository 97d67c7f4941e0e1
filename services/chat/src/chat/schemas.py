"""Message shapes: the stored message, its wire frames, and the HTTP responses."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

ROOM_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ROOM = re.compile(ROOM_PATTERN)


def valid_room(room: str) -> bool:
    return _ROOM.match(room) is not None


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    room: str
    id: int
    user_id: str
    display_name: str
    text: str
    client_id: str | None
    sent_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.id,
            "room": self.room,
            "user": {"id": self.user_id, "display_name": self.display_name},
            "text": self.text,
            # always with microseconds, so the same instant always renders the same
            "sent_at": self.sent_at.isoformat(timespec="microseconds"),
            "client_id": self.client_id,
        }

    def frame(self) -> str:
        """The `message` frame, serialised once and sent as is to every socket."""
        return dumps(self.as_dict())


def ready_frame(*, room: str, last_id: int, node: str) -> str:
    return dumps({"type": "ready", "room": room, "last_id": last_id, "node": node})


def error_frame(detail: str) -> str:
    return dumps({"type": "error", "detail": detail})


def rate_limited_frame(*, retry_after: float, client_id: str | None) -> str:
    """The frame was dropped: resend it (same `client_id`) after `retry_after` seconds."""
    return dumps(
        {
            "type": "error",
            "detail": "Rate limit exceeded; frame dropped",
            "retry_after": round(retry_after, 3),
            "client_id": client_id,
        }
    )


def invalid_frame(errors: list[dict[str, Any]]) -> str:
    """An `error` frame that names each invalid field, as a 422's `errors` do."""
    cleaned = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    fields = ", ".join(".".join(str(part) for part in e["loc"]) for e in cleaned)
    return dumps({"type": "error", "detail": f"Invalid frame: {fields}", "errors": cleaned})


PresenceChange = tuple[str, str, int]
"""(user id, display name, sockets that came or went)."""


def presence_diff_frame(
    *, room: str, joins: list[PresenceChange], leaves: list[PresenceChange]
) -> str:
    """Who came and who went in a room on one replica since its last diff."""

    def users(changes: list[PresenceChange]) -> list[dict[str, Any]]:
        return [
            {"id": user_id, "display_name": name, "connections": count}
            for user_id, name, count in changes
        ]

    return dumps({"type": "presence", "room": room, "joins": users(joins), "leaves": users(leaves)})


class ChatUser(BaseModel):
    id: str
    display_name: str


class MessageOut(BaseModel):
    type: str = "message"
    id: int
    room: str
    user: ChatUser
    text: str
    sent_at: str
    client_id: str | None


class HistoryPage(BaseModel):
    room: str
    items: list[MessageOut]
    next_after: int | None
    """Pass as `after` for the next page; null when this page reached the newest message."""


class PresentUser(BaseModel):
    id: str
    display_name: str
    connections: int


class PresenceOut(BaseModel):
    room: str
    users: list[PresentUser]
