"""The direct path: a proxied request without a body, started by the
connection's protocol under the outer middleware rather than through it.

On the ASGI path a proxied GET passes five layers before the proxy (request
id, access log, timing, the host check, CORS) and uvicorn's general response
writer after it; each wraps `send` again, and the writer checks every header
against two patterns. Together that is about a sixth of the gateway's CPU a
request, uvicorn's request cycle a third (`bench/results.md`).

`DirectPath` does for such a request what those layers do, in one place:

- the request id: the client's `X-Request-ID` when it is safe, a new one
  otherwise, in the logs' context and in the answer;
- the client a trusted proxy in front reports (`TRUST_FORWARDED_HEADERS`);
- `X-Process-Time`, and the access log line (`kit.accesslog`);
- the response head, written as uvicorn writes it (with its `Date` and
  `Server`, chunked framing for a body of unknown length, `Connection: close`
  when the connection does not stay open), held until the body's first bytes
  so that both go in one write (`edge.HeadFirst`).

Below that it calls the same layers as the ASGI path: GZip for a client that
accepts it, the dispatcher and the proxy, with its edge auth, rate limit,
replica choice, retries, streaming and problem+json refusals.

It takes a request only when none of the layers it skips would act on it
otherwise: a path the proxy serves, no request body (so no `Expect` either), a host the
gateway accepts, no `Origin` when CORS is configured, tracing off. Everything
else, and every request when uvicorn wraps the app (its proxy headers, say),
goes the ASGI way. Pipelined requests keep their order: uvicorn queues a
request cycle whichever way it is answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import cast

from starlette.types import ASGIApp, Message, Receive, Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from gateway.headers import adopt_reported_client
from gateway.runtime import Route, route_for
from kit.accesslog import AccessLogMiddleware
from kit.context import request_id_var
from kit.middleware import TrustedHostMiddleware, incoming_request_id

# uvicorn's logger for an application's failure, as its request cycle logs it
logger = logging.getLogger("uvicorn.error")

_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
# set by this path itself, in place of any the upstream sent
_OWN_HEADERS = frozenset({b"x-request-id", b"x-process-time"})
_CONNECTION_CLOSE = b"connection: close\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class DirectPath:
    """Which requests take the direct path, and each one's run (a task the
    edge protocol starts in place of uvicorn's `run_asgi`)."""

    def __init__(
        self,
        *,
        routes: Mapping[str, Route],
        app: ASGIApp,
        hosts: TrustedHostMiddleware,
        access_log: AccessLogMiddleware,
        cors: bool,
        trust_forwarded: bool,
    ) -> None:
        """`app` is the layer under CORS (GZip, then the dispatcher)."""
        self.routes = dict(routes)
        self.app = app
        self.hosts = hosts
        self.access_log = access_log
        self.cors = cors
        self.trust_forwarded = trust_forwarded

    def takes(self, cycle: RequestResponseCycle) -> bool:
        """Whether the request is one this path answers as the ASGI path would."""
        scope = cycle.scope
        if route_for(self.routes, scope["path"]) is None:
            return False
        host_checked = self.hosts.allow_any
        for name, value in scope["headers"]:
            if name in _BODY_HEADERS:
                return False
            if name == b"origin" and self.cors:
                return False
            if name == b"host" and not host_checked:
                # the first Host is the one the host check reads
                if not self.hosts.is_allowed(value.decode("latin-1")):
                    return False
                host_checked = True
        return host_checked

    async def run(self, cycle: RequestResponseCycle) -> None:
        """The request from the outermost layer down, as the protocol's task."""
        started = time.perf_counter()
        scope = cast(Scope, cycle.scope)
        request_id = incoming_request_id(scope)
        scope["state"]["request_id"] = request_id
        request_id_var.set(request_id)  # for every log line of this request's task
        if self.trust_forwarded:
            adopt_reported_client(scope)
        response = DirectResponse(cycle, request_id.encode(), started)
        try:
            # the dispatcher names the route for the access log
            await self.app(scope, cast(Receive, cycle.receive), response.send)
        except BaseException as error:
            response.status = response.status or 500
            logger.error("Exception in ASGI application\n", exc_info=error)
            if not cycle.response_started:
                await cycle.send_500_response()
            else:
                cycle.transport.close()
        else:
            if not cycle.response_started and not cycle.disconnected:
                logger.error("ASGI callable returned without starting response.")
                await cycle.send_500_response()
            elif not cycle.response_complete and not cycle.disconnected:
                logger.error("ASGI callable returned without completing response.")
                cycle.transport.close()
        finally:
            cycle.on_response = lambda: None
            self.access_log.request_done(scope, response.status, started, response.sent_bytes)


class DirectResponse:
    """uvicorn's response writer (`RequestResponseCycle.send`) for one direct
    request, with the request id and the time taken added to the head.

    What it writes came from the gateway's own code: an upstream's head as the
    gateway's client parsed it (lower-cased, hop-by-hop headers gone), or the
    gateway's own problem+json. uvicorn's check of every header for bytes that
    would break the head is left out for that reason."""

    __slots__ = ("chunked", "cycle", "no_body", "request_id", "sent_bytes", "started", "status")

    def __init__(self, cycle: RequestResponseCycle, request_id: bytes, started: float) -> None:
        self.cycle = cycle
        self.request_id = request_id
        self.started = started
        self.status = 0
        self.sent_bytes = 0
        self.chunked = False
        self.no_body = cycle.scope["method"] == "HEAD"

    async def send(self, message: Message) -> None:
        cycle = self.cycle
        # the access log counts what the app answered, as the middleware does,
        # also when the client has gone and nothing is written
        if message["type"] == "http.response.start":
            self.status = self.status or message["status"]
        else:
            self.sent_bytes += len(message.get("body", b""))
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        if not cycle.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected 'http.response.start', got '{message['type']}'")
            cycle.response_started = True
            # as uvicorn's writer: a body asked for with `Expect: 100-continue`
            # is not invited once the answer has begun (a "100 Continue" would
            # land inside it)
            cycle.waiting_for_100_continue = False
            cycle.transport.write(self.head(message["status"], message.get("headers", ())))
        elif not cycle.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(f"Expected 'http.response.body', got '{message['type']}'")
            body: bytes = message.get("body", b"")
            more_body: bool = message.get("more_body", False)
            if self.no_body:
                pass
            elif self.chunked:
                if body or not more_body:
                    framed = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
                    if not more_body:
                        framed.append(_LAST_CHUNK)
                    cycle.transport.write(b"".join(framed))
            elif body:
                cycle.transport.write(body)
            if not more_body:
                cycle.response_complete = True
                cycle.message_event.set()
                if not cycle.keep_alive:
                    cycle.transport.close()
                cycle.on_response()
        else:
            raise RuntimeError(f"Unexpected '{message['type']}' after the response was complete")

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        cycle = self.cycle
        content = [STATUS_LINE[status]]
        framed = False
        for name, value in cycle.default_headers:
            content += (name, b": ", value, b"\r\n")
        for name, value in headers:
            if name in _OWN_HEADERS:
                continue
            if name in _BODY_HEADERS:
                framed = True
                self.chunked = name == b"transfer-encoding"
            content += (name, b": ", value, b"\r\n")
        elapsed = b"%.6f" % (time.perf_counter() - self.started)
        content += (b"x-process-time: ", elapsed, b"\r\nx-request-id: ", self.request_id, b"\r\n")
        if not cycle.keep_alive:
            content.append(_CONNECTION_CLOSE)
        if status in (204, 304):
            self.no_body = True
        elif not framed and not self.no_body:
            self.chunked = True
            content.append(_CHUNKED)
        content.append(b"\r\n")
        return b"".join(content)
