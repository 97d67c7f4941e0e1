"""Header rewriting at the edge: hop-by-hop headers stay on their hop,
`X-Forwarded-*` and `X-Request-ID` describe the client's request upstream."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

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
# the X-Forwarded-* headers: the gateway writes its own (`_forwarding`), from
# what a trusted proxy in front says
_REWRITTEN_FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# every header by which a request says where it came from: an untrusted
# client's never reach a service (RFC 7239's `Forwarded` passes on only from
# a trusted proxy, as it wrote it)
_CLIENT_FORWARDING = _REWRITTEN_FORWARDING | {b"forwarded"}
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
        return cls(dropped if trust_forwarded else dropped | _CLIENT_FORWARDING, trust_forwarded)

    @classmethod
    def for_websocket(cls, *, trust_forwarded: bool) -> HeaderPolicy:
        http = cls.for_http(trust_forwarded=trust_forwarded)
        return cls(http.dropped | _WEBSOCKET_HANDSHAKE, trust_forwarded)


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
        elif name in _REWRITTEN_FORWARDING:
            # a trusted proxy's scheme and host go on; `_forwarding` writes the rest
            forwarded[name] = text
            continue
        headers.append((name.decode("latin-1"), text))
    if connection is not None:
        listed = _connection_tokens(connection)
        headers = [(name, value) for name, value in headers if name.encode() not in listed]
    headers += _forwarding(
        scope, forwarded.get(b"x-forwarded-proto"), forwarded.get(b"x-forwarded-host") or host
    )
    headers.append(("X-Request-ID", request_id))
    return OutgoingRequest(headers, authorization, has_body, content_length)


def _forwarding(scope: Scope, forwarded_proto: str | None, host: str) -> list[tuple[str, str]]:
    """The X-Forwarded-* headers: the addresses the request came from, the
    scheme and host it asked for.

    `X-Forwarded-For` is the connection's peer, after the client a trusted
    proxy in front reported (`ClientFromTrustedProxy`). Entries a client wrote
    itself never go on: the services take the first entry for their client
    (their uvicorn trusts every peer, as only the gateway reaches them), and
    auth's login throttle counts by it."""
    client = scope.get("client")
    hops = [client[0] if client else ""]
    if PEER_KEY in scope:  # the client a trusted proxy reported, then that proxy
        peer = scope[PEER_KEY]
        hops.append(peer[0] if peer else "")
    scheme = scope.get("scheme", "http")
    return [
        ("X-Forwarded-For", ", ".join(hops)),
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


PEER_KEY = "gateway.peer"
"""The scope key of the connection's peer, kept when "client" is the address a
trusted proxy in front reported."""


def reported_client(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The address a trusted proxy in front reports for its client: the last
    `X-Forwarded-For` entry, the one that proxy appended (those before it came
    from the client and may be anything). None without one, or if it is not
    an IP address."""
    reported: bytes | None = None
    for name, value in headers:
        if name == b"x-forwarded-for":
            reported = value  # several headers are one list, in order
    if reported is None:
        return None
    address = reported.rpartition(b",")[2].strip().decode("latin-1")
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


class ClientFromTrustedProxy:
    """Behind a trusted proxy (`TRUST_FORWARDED_HEADERS=true`) every
    connection comes from that proxy: the client of a request or socket is the
    address the proxy reports (`reported_client`), as nginx's real-IP module
    and uvicorn's proxy headers make it. Rate limits, access log lines and
    spans then name the client, not the proxy; the proxy's own address stays
    under `PEER_KEY` for the `X-Forwarded-For` chain sent on. The per-address
    connection cap still counts connections, i.e. the proxy's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            adopt_reported_client(scope)
        await self.app(scope, receive, send)


def adopt_reported_client(scope: Scope) -> None:
    """Makes the address a trusted proxy reports the scope's client, the
    proxy's own kept under `PEER_KEY` (see `ClientFromTrustedProxy`)."""
    address = reported_client(scope["headers"])
    if address is not None:
        scope[PEER_KEY] = scope.get("client")
        scope["client"] = (address, 0)
