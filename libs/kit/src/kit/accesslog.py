"""Access logs: one line per HTTP request, two per WebSocket session.

A pure-ASGI middleware (it wraps `send` and `receive`, never buffers), placed
inside the request-id and tracing middleware so each line carries both ids.
The line is written when the response is complete (HTTP) or when the session
opens and when it closes (WebSocket), at INFO on the `access` logger, with
the fields of `kit.logs` plus:

    method, route (the template, never the raw path), path, status,
    duration_ms, bytes (response body bytes sent), user_id (once a token was
    verified), client; for WebSockets: event (open, close, refused),
    close_code and closed_by (client or server)

Probes and scrapes (`/healthz`, `/readyz`, `/metrics`) log at DEBUG: every
checker calls them every few seconds. The query string is never logged (it
may carry an API key).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kit.observe import route_of, user_of

logger = logging.getLogger("access")

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class AccessLogMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        log: logging.Logger = logger,
        quiet_paths: Iterable[str] = QUIET_PATHS,
    ) -> None:
        self.app = app
        self.log = log
        self.quiet_paths = frozenset(quiet_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        level = self.level_for(scope)
        if not self.log.isEnabledFor(level):
            await self.app(scope, receive, send)
            return
        if kind == "http":
            await self._http(scope, receive, send, level)
        else:
            await self._websocket(scope, receive, send, level)

    def level_for(self, scope: Scope) -> int:
        return logging.DEBUG if scope["path"] in self.quiet_paths else logging.INFO

    def request_done(
        self,
        scope: Scope,
        status: int,
        started: float,
        sent_bytes: int,
        level: int | None = None,
    ) -> None:
        """Writes one HTTP request's line (also for a server that answers
        without this middleware in the way, as the gateway's direct path does).
        `level` is the one `level_for` gave, when the caller has already found
        it enabled; without it the line is written only if its level is."""
        if level is None:
            level = self.level_for(scope)
            if not self.log.isEnabledFor(level):
                return
        fields = _request_fields(scope, status, started)
        fields["bytes"] = sent_bytes
        self.log.log(
            level, "%s %s %s", fields["method"], fields["route"], status, extra={"fields": fields}
        )

    async def _http(self, scope: Scope, receive: Receive, send: Send, level: int) -> None:
        started = time.perf_counter()
        status = 0
        sent_bytes = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent_bytes += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            # the outermost error handler answers 500 after this middleware
            status = status or 500
            raise
        finally:
            self.request_done(scope, status, started, sent_bytes, level)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, level: int) -> None:
        session = _SocketSession(self.log, level, scope, receive, send)
        try:
            await self.app(scope, session.receive, session.send)
        finally:
            session.finish()


class _SocketSession:
    """What the access log follows of one WebSocket session, for its whole life:
    a small object, where closures over the same state would hold a cell for
    each variable and a function for each wrapper (a socket may live for hours,
    and a server may hold thousands)."""

    __slots__ = (
        "_receive",
        "_send",
        "close_code",
        "closed_by",
        "level",
        "log",
        "opened",
        "scope",
        "started",
        "status",
    )

    def __init__(
        self, log: logging.Logger, level: int, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.log = log
        self.level = level
        self.scope = scope
        self._receive = receive
        self._send = send
        self.started = time.perf_counter()
        self.opened = 0.0
        self.close_code: int | None = None
        self.closed_by = ""
        self.status = 0

    async def send(self, message: Message) -> None:
        message_type = message["type"]
        if message_type == "websocket.accept":
            self.status = 101
            self.opened = time.perf_counter()
            fields = _request_fields(self.scope, self.status, self.started)
            fields["event"] = "open"
            self.log.log(self.level, "websocket open %s", fields["route"], extra={"fields": fields})
        elif message_type == "websocket.close" and self.close_code is None:
            self.close_code = int(message.get("code", 1000))
            self.closed_by = "server"
        elif message_type == "websocket.http.response.start":
            self.status = message["status"]
        await self._send(message)

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "websocket.disconnect" and self.close_code is None:
            self.close_code = int(message.get("code", 1005))
            self.closed_by = "client"
        return message

    def finish(self) -> None:
        if self.opened:
            fields = _request_fields(self.scope, self.status, self.opened)
            fields.update(event="close", close_code=self.close_code, closed_by=self.closed_by)
            message = "websocket close %s %s"
        else:
            # refused before the handshake completed: uvicorn answers 403
            self.status = self.status or 403
            fields = _request_fields(self.scope, self.status, self.started)
            fields.update(event="refused", close_code=self.close_code)
            message = "websocket refused %s %s"
        self.log.log(
            self.level, message, fields["route"], self.close_code, extra={"fields": fields}
        )


def _request_fields(scope: Scope, status: int, started: float) -> dict[str, Any]:
    client = scope.get("client")
    return {
        "method": scope.get("method", "GET"),
        "route": route_of(scope),
        "path": scope["path"],
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        "user_id": user_of(scope),
        "client": client[0] if client else None,
    }
