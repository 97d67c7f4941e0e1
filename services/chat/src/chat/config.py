"""Chat settings: environment first, then `.env`, then these defaults (compose's values)."""

from __future__ import annotations

from pydantic import Field, PostgresDsn

from kit.settings import DatabaseSettings, VerifiedWritesSettings


class Settings(DatabaseSettings, VerifiedWritesSettings):
    service_name: str = "chat"
    database_url: PostgresDsn = PostgresDsn("postgresql+asyncpg://chat@postgres:5432/chat")

    max_text_length: int = Field(default=4000, gt=0)
    """Longest message text, in characters."""
    max_frame_chars: int = Field(default=65_536, gt=0)
    """Longest client frame, in characters: 4000 characters written as JSON
    escapes (a surrogate pair is 12 characters) take up to 48,000."""
    max_client_id_length: int = Field(default=64, gt=0)

    send_rate_per_second: float = Field(default=20.0, gt=0)
    """Steady rate of frames one user may send, all sockets and replicas together."""
    send_burst: int = Field(default=40, gt=0)
    """Frames one user may send at once before the rate applies."""
    max_sockets_per_user: int = Field(default=20, gt=0)
    """Sockets one user may hold at once across replicas; the next is closed with 4029."""

    send_queue_size: int = Field(default=512, gt=0)
    """Frames waiting for one socket; a socket whose queue overflows is closed (4008)."""
    slow_consumer_close_seconds: float = Field(default=5.0, gt=0)
    """How long the close frame of a dropped slow consumer may wait for its buffer to drain."""

    ws_ping_interval: float = Field(default=20.0, gt=0)
    """Protocol-level pings. uvicorn sends them, not the app: compose and the
    stack hand the same value to the image's uvicorn as `UVICORN_WS_PING_INTERVAL`
    (and `UVICORN_WS_PING_TIMEOUT`); here it is validated and documented."""
    ws_ping_timeout: float = Field(default=20.0, gt=0)

    gap_fill_wait_ms: int = Field(default=40, ge=0)
    """How long a hole in a room's ids may stay open before it is read from PostgreSQL."""
    close_on_token_expiry: bool = True
    """Close a socket (4001) when its token expires, unless an `auth` frame renewed it."""

    history_max_limit: int = Field(default=200, gt=0)
    replay_page_size: int = Field(default=500, gt=0)
    message_retention_days: float = Field(default=0.0, ge=0)
    """Messages older than this many days are deleted; 0 keeps every message.
    A room's ids go on from where they were: a jump in them is history removed."""
    message_purge_interval_seconds: float = Field(default=600.0, gt=0)
    """How often a replica deletes the messages past `message_retention_days`."""

    presence_ttl_seconds: float = Field(default=20.0, gt=0)
    """A replica's presence entries vanish this long after its last heartbeat."""
    presence_heartbeat_seconds: float = Field(default=5.0, gt=0)
    presence_interval_seconds: float = Field(default=1.0, gt=0)
    """How often a replica writes presence changes to Redis and sends each changed
    room one `presence` diff. Flushes fall on the wall clock's multiples of the
    interval on every replica, so a member gets one frame per interval holding
    every replica's diff (see `presence_gather_seconds`)."""
    presence_sockets_per_change: int = Field(default=4, ge=0)
    """A room with more sockets on this replica than this many times its
    changes holds them back (its Redis entries and its diff) until enough have
    come or `presence_max_delay_seconds` passed: a join storm into large rooms
    costs each member a frame per batch of joins, not one per interval. 0: no
    room is held."""
    presence_max_delay_seconds: float = Field(default=3.0, ge=0)
    """The longest a room's presence change is held back (see above)."""
    presence_gather_seconds: float = Field(default=0.25, ge=0)
    """How long a room's first presence diff waits for others (the other
    replicas' diffs of the same flush) before they go to its members as one
    frame. 0: every diff is sent on its own as it comes."""
    presence_frames: bool = True
    """Send `presence` diff frames to the rooms. The presence listing works either way."""

    redis_max_connections: int = Field(default=64, gt=0)
    """Pool size for commands (presence, limits, revocation checks); callers wait for one."""
    redis_publish_connections: int = Field(default=8, gt=0)
    """Pool size for publishing on the bus, apart from the commands' pool."""

    bus_probe_timeout_seconds: float = Field(default=1.5, gt=0)
    bus_backoff_max_seconds: float = Field(default=5.0, gt=0)
