"""The gateway's settings: kit's shared ones plus upstream pools, health, limits."""

from __future__ import annotations

from typing import Annotated

from pydantic import AnyHttpUrl, Field, field_validator
from pydantic_settings import NoDecode

from gateway.ratelimit import SYNC_SECONDS
from kit.settings import ServiceSettings

UpstreamList = Annotated[list[AnyHttpUrl], NoDecode, Field(min_length=1)]


def _split_upstreams(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(ServiceSettings):
    service_name: str = "gateway"

    # Each pool is one or more base URLs. A host name is resolved by DNS to
    # every replica's address (compose and Swarm's dnsrr return one address per
    # replica) and re-resolved every `dns_refresh_seconds`; IP literals are
    # taken as they are, so `http://10.0.0.5:8000,http://10.0.0.6:8000` works.
    auth_upstream: UpstreamList = Field(default_factory=lambda: [AnyHttpUrl("http://auth:8000")])
    catalog_upstream: UpstreamList = Field(
        default_factory=lambda: [AnyHttpUrl("http://catalog:8000")]
    )
    chat_upstream: UpstreamList = Field(default_factory=lambda: [AnyHttpUrl("http://chat:8000")])
    dns_refresh_seconds: float = Field(default=5.0, gt=0)

    # Seconds without a byte from the upstream (before the response head, or
    # between body chunks) before the request fails with 504.
    auth_timeout_seconds: float = Field(default=10.0, gt=0)
    catalog_timeout_seconds: float = Field(default=10.0, gt=0)
    chat_timeout_seconds: float = Field(default=30.0, gt=0)
    connect_timeout_seconds: float = Field(default=2.0, gt=0)

    # Passive health: a refused connection takes a replica out at once; this
    # many sickness signals in a row (a timeout, a reset, a 502/503/504 from
    # it; never a 4xx or 500, which answer the request, not the replica's
    # health) eject it for `eject_seconds`, never more than half of a pool.
    eject_after_failures: int = Field(default=3, ge=1)
    eject_seconds: float = Field(default=10.0, ge=0)
    # Another replica is tried this many times for idempotent requests whose
    # connection failed before anything was sent.
    retries: int = Field(default=2, ge=0)

    # Active health: GET `health_check_path` on every replica; 0 turns it off.
    # A non-2xx answer marks a replica unhealthy at once; a probe that fails in
    # transport (times out: the replica may just be busy) must fail
    # `health_check_failures` times in a row. Fewer than half healthy: every
    # live replica takes traffic (panic routing).
    health_check_interval_seconds: float = Field(default=5.0, ge=0)
    health_check_timeout_seconds: float = Field(default=2.0, gt=0)
    health_check_failures: int = Field(default=3, ge=1)
    health_check_path: str = "/readyz"

    # Worker processes of `python -m gateway` (the image's command), each a
    # complete gateway on a listening socket of its own (SO_REUSEPORT, so the
    # kernel spreads connections over them); 0 = one per usable core.
    workers: int = Field(default=0, ge=0)
    # Connections the kernel queues for a worker before it accepts them (the
    # backlog of each worker's listening socket); beyond it a client's SYN is
    # dropped and retried after 1 s, then 3 s. A killed chat replica's
    # clients come back within a second, thousands at once: queued, they are
    # served in order. The kernel caps it at `net.core.somaxconn` (4096 since
    # Linux 5.4).
    listen_backlog: int = Field(default=4096, ge=1)

    # Edge guards below ASGI (gateway.edge): the request head must arrive
    # within `header_timeout_seconds` and fit in `max_header_bytes`; a body
    # still owed may go `body_idle_timeout_seconds` without a byte; one client
    # address holds at most `max_connections_per_client` connections (0: no
    # cap), counted by each worker process on its own (so at most `workers` x
    # the cap in all). Bodies above `max_body_bytes` (kit's setting) are
    # refused with 413.
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    body_idle_timeout_seconds: float = Field(default=20.0, gt=0)
    max_header_bytes: int = Field(default=32_768, ge=1024)
    max_connections_per_client: int = Field(default=256, ge=0)

    # Fixed-window limits per client address (anonymous) and per user. A client
    # far from its limit is counted in Redis in batches, every
    # `rate_limit_sync_seconds` (0: each request before it is admitted); near
    # it, one request at a time (gateway.ratelimit).
    rate_limit_enabled: bool = True
    rate_limit_anonymous: int = Field(default=300, ge=1)
    rate_limit_user: int = Field(default=1200, ge=1)
    rate_limit_window_seconds: int = Field(default=60, ge=1)
    rate_limit_sync_seconds: float = Field(default=SYNC_SECONDS, ge=0)
    # While Redis cannot answer, each gateway process counts on its own.
    redis_timeout_seconds: float = Field(default=0.5, gt=0)

    # Only when a proxy of your own stands in front of the gateway: keep its
    # X-Forwarded-* and Forwarded (append to X-Forwarded-For), and take the
    # client address it reports (gateway.headers.ClientFromTrustedProxy).
    trust_forwarded_headers: bool = False

    openapi_cache_seconds: float = Field(default=300.0, ge=0)
    ws_max_message_bytes: int = Field(default=1_048_576, gt=0)
    # WebSocket upgrades each worker handles at once, from the token check to
    # the upstream's answer (0: no cap); the others wait their turn up to
    # `ws_handshake_wait_seconds`, then get 503 with Retry-After. A reconnect
    # storm is then served in turns rather than all at once (gateway.websocket).
    ws_handshakes_in_flight: int = Field(default=64, ge=0)
    ws_handshake_wait_seconds: float = Field(default=15.0, gt=0)

    @field_validator("auth_upstream", "catalog_upstream", "chat_upstream", mode="before")
    @classmethod
    def _comma_separated_upstreams(cls, value: object) -> object:
        return _split_upstreams(value)

    @field_validator("auth_upstream", "catalog_upstream", "chat_upstream")
    @classmethod
    def _plain_http_origins(cls, value: list[AnyHttpUrl]) -> list[AnyHttpUrl]:
        for url in value:
            if url.scheme != "http" or url.path not in (None, "", "/") or url.query:
                raise ValueError(f"{url} must be http://host:port (paths are never rewritten)")
        return value
