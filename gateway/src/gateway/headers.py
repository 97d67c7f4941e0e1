"""Header rewriting at the edge: hop-by-hop headers stay on their hop,
`X-Forwarded-*` and `X-Request-ID` describe the client's request upstream."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import Scope

from kit.errors import DomainError

# RFC 9110 §7.6.1 plus the de-facto ones; each names a property of one connection
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_FORWARDED = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)
# the gateway sets its own request id; uvicorn answers `Expect: 100-continue` itself
_ALWAYS_REPLACED = frozenset({b"x-request-id", b"expect"})
_WEBSOCKET_HANDSHAKE = frozenset(
    {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions"}
    | {b"sec-websocket-protocol", b"sec-websocket-accept"}
)
# the gateway's server writes its own Date and Server, as nginx does
_RESPONSE_DROPPED = HOP_BY_HOP | {b"date", b"server"}


def _connection_tokens(value: bytes) -> frozenset[bytes]:
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """Which incoming request headers never reach an upstream."""

    dropped: frozenset[bytes]
    trust_forwarded: bool

    @classmethod
    def for_http(cls, *, trust_forwarded: bool) -> HeaderPolicy:
        dropped = HOP_BY_HOP | _ALWAYS_REPLACED
        return cls(dropped if trust_forwarded else dropped | _FORWARDED, trust_forwarded)

    @classmethod
    def for_websocket(cls, *, trust_forwarded: bool) -> HeaderPolicy:
        http = cls.for_http(trust_forwarded=trust_forwarded)
        return cls(http.dropped | _WEBSOCKET_HANDSHAKE, trust_forwarded)


_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


@dataclass(slots=True)
class OutgoingRequest:
    headers: list[tuple[str, str]]
    authorization: str | None
    has_body: bool
    content_length: int | None = None


class DuplicateHeader(DomainError):
    """Two values for a header that has one meaning: which one would the
    gateway check and which would the service believe?"""

    status, title, slug = 400, "Bad request", "duplicate-header"


def upstream_request(scope: Scope, policy: HeaderPolicy, request_id: str) -> OutgoingRequest:
    """The headers to send upstream, read in one pass over the client's.

    Raises DuplicateHeader for a second `Authorization` or `Host`."""
    headers: list[tuple[str, str]] = []
    authorization: str | None = None
    has_body = False
    content_length: int | None = None
    host_seen = False
    connection: bytes | None = None
    forwarded: dict[bytes, str] = {}
    host = ""
    dropped = policy.dropped
    for name, value in scope["headers"]:
        if name in dropped:
            if name == b"connection":
                connection = value
            elif name == b"transfer-encoding":
                has_body = True
            continue
        text = value.decode("latin-1")
        if name == b"content-length":
            has_body = value != b"0"
            # the server's parser admits only digits here
            content_length = int(value) if value.isdigit() else None
        elif name == b"authorization":
            if authorization is not None:
                raise DuplicateHeader("Send one Authorization header, not several")
            authorization = text
        elif name == b"host":
            if host_seen:
                raise DuplicateHeader("Send one Host header, not several")
            host_seen = True
            host = text
        elif name in _FORWARDED:
            forwarded[name] = text  # replaced below, the client's address added
            continue
        headers.append((name.decode("latin-1"), text))
    if connection is not None:
        listed = _connection_tokens(connection)
        headers = [(name, value) for name, value in headers if name.encode() not in listed]
    headers += _forwarding(
        scope,
        forwarded.get(b"x-forwarded-for"),
        forwarded.get(b"x-forwarded-proto"),
        forwarded.get(b"x-forwarded-host") or host,
    )
    headers.append(("X-Request-ID", request_id))
    return OutgoingRequest(headers, authorization, has_body, content_length)


def _forwarding(
    scope: Scope, forwarded_for: str | None, forwarded_proto: str | None, host: str
) -> list[tuple[str, str]]:
    """The X-Forwarded-* headers: the client's address added to those it came
    through, the scheme and host it asked for."""
    client = scope.get("client")
    client_host = client[0] if client else ""
    scheme = scope.get("scheme", "http")
    return [
        ("X-Forwarded-For", f"{forwarded_for}, {client_host}" if forwarded_for else client_host),
        (
            "X-Forwarded-Proto",
            forwarded_proto or ("https" if scheme in ("https", "wss") else "http"),
        ),
        ("X-Forwarded-Host", host),
    ]


def downstream_headers(raw_headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream response's headers, minus the hop-by-hop ones, names lower-cased."""
    headers: list[tuple[bytes, bytes]] = []
    connection: bytes | None = None
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered in _RESPONSE_DROPPED:
            if lowered == b"connection":
                connection = value
            continue
        headers.append((lowered, value))
    if connection is not None:
        listed = _connection_tokens(connection)
        headers = [(name, value) for name, value in headers if name not in listed]
    return headers
