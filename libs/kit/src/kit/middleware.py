"""Pure-ASGI middleware shared by every service and the gateway.

Each class wraps `send` instead of buffering the response, so streaming
bodies and WebSockets pass through untouched (a middleware that buffers would not).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kit.context import request_id_var
from kit.errors import problem_response

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_BYTES = REQUEST_ID_HEADER.encode()
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def incoming_request_id(scope: Scope) -> str:
    """The client's request id when it is safe to echo and log, a new one otherwise."""
    for name, value in scope["headers"]:
        if name == _REQUEST_ID_BYTES:
            candidate: str = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(candidate):
                return candidate
            break
    # 128 random bits as 32 hex digits, without building a UUID object
    return os.urandom(16).hex()


def set_response_header(message: Message, name: bytes, value: bytes) -> None:
    """Sets one header of a response-start (or accept) message, replacing any
    of that name: a plain list pass, cheaper than a MutableHeaders per response."""
    headers = [pair for pair in message.get("headers", ()) if pair[0].lower() != name]
    headers.append((name, value))
    message["headers"] = headers


class RequestIdMiddleware:
    """Adopts or creates `X-Request-ID`, exposes it to logs and echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = incoming_request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        # Not reset on the way out: the server runs each request in a task of
        # its own, and the outermost error handler, which runs after this
        # middleware returns, must still see the id for the problem's `instance`.
        request_id_var.set(request_id)
        encoded = request_id.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                set_response_header(message, _REQUEST_ID_BYTES, encoded)
            await send(message)

        await self.app(scope, receive, send_with_id)


class TimingMiddleware:
    """Adds `X-Process-Time`: seconds from the request's arrival to its response head."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_timing(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = f"{time.perf_counter() - started:.6f}".encode()
                set_response_header(message, b"x-process-time", elapsed)
            await send(message)

        await self.app(scope, receive, send_with_timing)


class TrustedHostMiddleware:
    """Refuses requests whose Host header is not ours, as problem+json (400)."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed_hosts = [host.lower() for host in allowed_hosts]
        self.allow_any = "*" in self.allowed_hosts

    def is_allowed(self, host: str) -> bool:
        host = host.split(":")[0].lower()
        for pattern in self.allowed_hosts:
            if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allow_any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        if self.is_allowed(host):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "Invalid host"})
            return
        response = problem_response(
            status=400, title="Bad request", slug="invalid-host", detail="Invalid host header"
        )
        await response(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuses request bodies above `max_bytes` with 413, before reading them whole."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            status=413,
            title="Payload too large",
            slug="payload-too-large",
            detail=f"The request body exceeds {self.max_bytes} bytes",
        )
        await response(scope, receive, send)


class _BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body parsing lets it through to the 413 handler."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"The request body exceeds {max_bytes} bytes")
