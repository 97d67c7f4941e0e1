"""Message shapes: the stored message, its wire frames, and the HTTP responses."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import BaseModel

ROOM_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ROOM = re.compile(ROOM_PATTERN)


def valid_room(room: str) -> bool:
    # fullmatch: `$` also matches before a final newline ("lobby\n")
    return _ROOM.fullmatch(room) is not None


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

    def row(self) -> dict[str, Any]:
        """Its columns as the messages table names them (`dataclasses.asdict`
        would deep-copy every field, `sent_at` included)."""
        return {
            "room": self.room,
            "id": self.id,
            "user_id": self.user_id,
            "display_name": self.display_name,
            "text": self.text,
            "client_id": self.client_id,
            "sent_at": self.sent_at,
        }

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
    detail = f"Invalid frame: {fields}" if fields else "Invalid frame"  # () is the whole frame
    return dumps({"type": "error", "detail": detail, "errors": cleaned})


class PresenceChange(NamedTuple):
    user_id: str
    display_name: str
    connections: int
    """Sockets of the user that came or went on the replica."""
    here: int
    """Sockets of the user on the replica now."""


def presence_frames(room: str, diffs: list[str]) -> str:
    """Several `presence` diffs of one room (from different replicas, or one
    replica's successive flushes) as one frame: `diffs` holds them whole, in the
    order they came, and a client applies them in that order."""
    return f'{{"type":"presence","room":{dumps(room)},"diffs":[{",".join(diffs)}]}}'


def presence_diff_frame(
    *,
    room: str,
    node: str,
    seq: int,
    joins: list[PresenceChange],
    leaves: list[PresenceChange],
    gone: bool = False,
) -> str:
    """Who came and who went in a room on one replica since its last diff; with
    `gone`, the replica died and every user it had is in `leaves`."""

    def users(changes: list[PresenceChange]) -> list[dict[str, Any]]:
        return [
            {"id": user_id, "display_name": name, "connections": count, "here": here}
            for user_id, name, count, here in changes
        ]

    frame: dict[str, Any] = {
        "type": "presence",
        "room": room,
        "node": node,
        "seq": seq,
        "joins": users(joins),
        "leaves": users(leaves),
    }
    if gone:
        frame["gone"] = True
    return dumps(frame)


def presence_listing_frame(listing: PresenceOut) -> str:
    """A room's presence whole, as its listing over HTTP gives it: sent to the
    sockets of a replica whose bus was away (the diffs it carried meanwhile
    are lost). A client takes it as it takes that listing: counts newer than
    it, from later frames, stand."""
    return dumps(
        {"type": "presence", "room": listing.room, "listing": listing.model_dump(mode="json")}
    )


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


class NodePresence(BaseModel):
    node: str
    """The replica these sockets are on."""
    seq: int
    """The replica's flush that wrote these counts: frames from it with a higher `seq` are newer."""
    users: list[PresentUser]


class PresenceOut(BaseModel):
    room: str
    users: list[PresentUser]
    """Everyone connected, with their sockets on every replica added up."""
    nodes: list[NodePresence]
    """The same, replica by replica: what a client applies `presence` frames to."""
    at: int
    """When this was read, in milliseconds since the epoch: a replica missing here
    whose frames a client holds with a lower `seq` is gone."""
