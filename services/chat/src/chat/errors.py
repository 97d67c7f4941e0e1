"""Chat's domain errors; kit maps them to problem+json on HTTP routes."""

from __future__ import annotations

from kit.errors import InvalidInput


class InvalidRoom(InvalidInput):
    def __init__(self, room: str) -> None:
        super().__init__(
            f"Invalid room name {room[:80]!r}",
            errors=[{"loc": ["path", "room"], "msg": "Invalid room name", "type": "value_error"}],
        )
