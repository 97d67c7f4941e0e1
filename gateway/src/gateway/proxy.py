"""The HTTP data path: a plain ASGI handler that forwards one request to one
replica over pooled keep-alive connections and streams both bodies.

Order per request: headers (one Authorization, one Host), edge auth (a
present token must verify), rate limit, the body size limit, choose a replica
(least in flight), send. A connection that fails before anything was written
is retried on another replica for idempotent methods; everything else becomes
problem+json: 503 with `Retry-After` (no replica available, even after the
pool was looked at again, or none would take the connection: nothing was
sent), 502 (a replica answered garbage or broke off), 504 (upstream silent
for the route's timeout), 413 (a body above `max_body_bytes`, by its
Content-Length or as it streams in).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from starlette.types import Message, Receive, Scope, Send

from gateway.client import UpstreamBroken, UpstreamResponse
from gateway.errors import refuse, request_id
from gateway.headers import HeaderPolicy, OutgoingRequest, downstream_headers, upstream_request
from gateway.pool import SICK_STATUSES, Pool, Replica, not_listening
from gateway.ratelimit import Quota
from gateway.runtime import Route, Runtime
from gateway.spans import client_span, with_trace_context
from gateway.upstream import ConnectFailed
from kit.errors import (
    PROBLEM_JSON,
    BadGateway,
    DomainError,
    GatewayTimeout,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthenticated,
    problem_response,
)
from kit.observe import remember_user
from kit.security import Principal, bearer_from_headers

logger = logging.getLogger("gateway.proxy")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CLIENT_CLOSED_REQUEST = 499  # nginx's code, for metrics only: nobody receives it
_PROBLEM_JSON = PROBLEM_JSON.encode()


class ClientDisconnected(Exception):
    """The client went away while its request body was being forwarded."""


class BodyTooLarge(Exception):
    """The client's body grew past the limit while it was being forwarded."""


class ClientClosed(Exception):
    """The client went away before its request reached a replica: nobody is
    left to answer (counted as 499)."""


def too_large(limit: int) -> PayloadTooLarge:
    # The connection stays open: a client sends its whole body before it reads
    # the answer, and a close now would reset the connection under it, answer
    # lost. The edge reads the rest and drops it (for a few seconds at most).
    return PayloadTooLarge(f"The request body exceeds {limit} bytes")


class StreamedBody:
    """A request body still arriving from the client, forwarded chunk by chunk
    and counted as it comes."""

    __slots__ = ("disconnected", "finished", "first", "limit", "receive", "received", "too_large")

    def __init__(self, first: bytes, receive: Receive, *, limit: int) -> None:
        self.first = first
        self.receive = receive
        self.limit = limit
        self.received = len(first)
        self.disconnected = False
        self.finished = False
        self.too_large = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        if self.first:
            yield self.first
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                # raising (not returning) keeps a truncated body from looking complete
                self.disconnected = True
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if chunk:
                self.received += len(chunk)
                if self.received > self.limit:
                    self.too_large = True
                    raise BodyTooLarge
                yield chunk
            if not message.get("more_body", False):
                self.finished = True
                return


def says_sick(status: int, content_type: bytes | None) -> bool:
    """Whether an answer is a sickness signal. A 503 the service wrote itself
    as problem+json says a dependency it needs is down (every replica would
    say the same; its readiness probe tells the replica's own state), so it
    counts as a working replica; a bare 502/503/504 (an overloaded server, a
    proxy in between) counts against it."""
    if status not in SICK_STATUSES:
        return False
    return status != 503 or not (content_type or b"").startswith(_PROBLEM_JSON)


def connection_failed(pool: Pool, replica: Replica, error: BaseException) -> None:
    """A connection that never opened: refused means nothing listens there
    (out at once); a connect timeout may be a busy replica (one failure)."""
    if not_listening(error):
        pool.unreachable(replica)
    else:
        # a connect that timed out (gateway.client, gateway.upstream)
        if isinstance(getattr(error, "os_error", error), TimeoutError):
            pool.timed_out(replica)
        else:
            pool.failed(replica)
        pool.request_refresh()


def unreachable(service: str, pool: Pool) -> ServiceUnavailable:
    """No replica took the connection: nothing was sent, so the client may retry."""
    return ServiceUnavailable(
        f"The {service} service is unreachable; retry",
        headers={"Retry-After": str(pool.retry_after())},
    )


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Proxy:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.retries = runtime.settings.retries
        self.max_body_bytes = runtime.settings.max_body_bytes
        self.policy = HeaderPolicy.for_http(
            trust_forwarded=runtime.settings.trust_forwarded_headers
        )

    async def authenticate(self, authorization: str | None) -> Principal | None:
        """The token's principal; None without a token. Raises Unauthenticated."""
        if authorization is None:
            return None
        token = bearer_from_headers(authorization)
        if token is None:
            return None
        return await self.runtime.verifier.verify(token)

    async def admit(self, scope: Scope, authorization: str | None) -> Quota | None:
        """Edge auth, then the rate limit; raises the refusal as a DomainError."""
        limiter = self.runtime.limiter
        client = scope.get("client")
        address = client[0] if client else ""
        try:
            principal = await self.authenticate(authorization)
        except Unauthenticated:
            # refused tokens count against the address, so guessing is throttled too
            if limiter is not None:
                await limiter.hit(user_id=None, client_address=address)
            raise
        if principal is not None:
            remember_user(scope, principal.user_id)
        if limiter is None:
            return None
        return await limiter.hit(
            user_id=principal.user_id if principal else None, client_address=address
        )

    async def __call__(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            status = await self.forward(route, scope, receive, send)
        except DomainError as error:
            status = error.status
            await refuse(scope, receive, send, error)
        except Exception:
            logger.exception("proxying failed")
            status = 500
            await problem_response(
                status=500,
                title="Internal server error",
                slug="internal",
                detail="The gateway failed to handle this request; it has been logged.",
            )(scope, receive, send)
        self.metrics.request(route.name, scope["method"], status, time.perf_counter() - started)

    async def forward(self, route: Route, scope: Scope, receive: Receive, send: Send) -> int:
        outgoing = upstream_request(scope, self.policy, request_id(scope))
        quota = await self.admit(scope, outgoing.authorization)
        try:
            body = await self.read_body(outgoing, receive)
            replica, response, sent_at = await self.send_upstream(route, scope, outgoing, body)
        except ClientClosed:
            return CLIENT_CLOSED_REQUEST
        pool = route.pool
        try:
            self.metrics.upstream(route.name, time.perf_counter() - sent_at, response.status)
            if says_sick(response.status, response.header(b"content-type")):
                pool.failed(replica)
            else:
                # any other answer, 4xx or 500 included, shows a working replica
                pool.succeeded(replica)
            await self.relay(response, route.timeout_seconds, quota, body, receive, send)
            return response.status
        finally:
            replica.in_flight -= 1
            response.release()

    async def read_body(
        self, outgoing: OutgoingRequest, receive: Receive
    ) -> bytes | StreamedBody | None:
        """The request's body: whole if it came in one message, else streamed on."""
        limit = self.max_body_bytes
        if outgoing.content_length is not None and outgoing.content_length > limit:
            raise too_large(limit)
        if not outgoing.has_body:
            return None
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientClosed
        chunk: bytes = message.get("body", b"")
        if len(chunk) > limit:
            raise too_large(limit)
        return StreamedBody(chunk, receive, limit=limit) if message.get("more_body") else chunk

    async def send_upstream(
        self,
        route: Route,
        scope: Scope,
        outgoing: OutgoingRequest,
        body: bytes | StreamedBody | None,
    ) -> tuple[Replica, UpstreamResponse, float]:
        """Sends the request to a replica, and to another if the connection never
        opened (nothing was sent); the chosen replica stays counted in flight
        until the caller is done with the response."""
        method: str = scope["method"]
        # a kept-alive connection found closed under the request may have
        # carried part of it: sent again only if it can be sent twice (a body
        # still streaming from the client cannot)
        replayable = method in IDEMPOTENT_METHODS and not isinstance(body, StreamedBody)
        pool = route.pool
        target = scope["raw_path"] or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        client = self.runtime.client
        tried: list[Replica] = []
        while True:
            replica = await self.runtime.replica_for(route, tried)
            replica.in_flight += 1
            sent_at = time.perf_counter()
            try:
                with client_span(method, replica, target) as span:
                    response = await client.request(
                        replica.address,
                        replica.port,
                        method,
                        target,
                        with_trace_context(outgoing.headers, span.carried),
                        body,
                        read_timeout=route.timeout_seconds,
                        replayable=replayable,
                    )
                    span.answered(response.status)
                return replica, response, sent_at
            except ConnectFailed as error:
                # the connection never opened: nothing was sent, not a byte of
                # a streamed body read, so any request may go to another
                # replica (a POST to a replica that just stopped listening, in
                # a rolling update, is served by the next one)
                replica.in_flight -= 1
                self.metrics.upstream(route.name, 0.0, None)
                connection_failed(pool, replica, error)
                if len(tried) < self.retries:
                    tried.append(replica)
                    self.metrics.retries.labels(route.name).inc()
                    continue
                raise unreachable(route.name, pool) from error
            except (
                TimeoutError,
                UpstreamBroken,
                OSError,
                ClientDisconnected,
                BodyTooLarge,
            ) as error:
                replica.in_flight -= 1
                raise self.failure(route, replica, body, error) from error

    def failure(
        self, route: Route, replica: Replica, body: bytes | StreamedBody | None, error: Exception
    ) -> Exception:
        """What to answer when a request sent to `replica` got no response."""
        if isinstance(error, TimeoutError):
            self.metrics.upstream(route.name, 0.0, None)
            route.pool.timed_out(replica)
            return GatewayTimeout(
                f"The {route.name} service did not answer within {route.timeout_seconds:g} s"
            )
        if isinstance(body, StreamedBody) and body.too_large:
            return too_large(self.max_body_bytes)
        if isinstance(body, StreamedBody) and body.disconnected:
            return ClientClosed()
        self.metrics.upstream(route.name, 0.0, None)
        route.pool.failed(replica)
        return BadGateway(f"The {route.name} service failed to answer")

    async def relay(
        self,
        response: UpstreamResponse,
        read_timeout: float,
        quota: Quota | None,
        body: bytes | StreamedBody | None,
        receive: Receive,
        send: Send,
    ) -> None:
        headers = downstream_headers(response.raw_headers)
        if quota is not None:
            headers.extend(quota.headers())
        start: Message = {
            "type": "http.response.start",
            "status": response.status,
            "headers": headers,
        }
        if response.complete():
            # the whole body came with the head: one message, no streaming machinery
            await send(start)
            await send({"type": "http.response.body", "body": response.body()})
            return
        await send(start)
        watcher: asyncio.Future[None] | None = None
        if not isinstance(body, StreamedBody) or body.finished:
            # the request body is read, so receive() now only reports a disconnect;
            # a client gone mid-stream closes the upstream response
            watcher = asyncio.ensure_future(_until_disconnect(receive))

            def client_gone(done: asyncio.Future[None]) -> None:
                # uvicorn also reports a disconnect once the response is complete
                if not done.cancelled() and not response.complete():
                    response.close()

            watcher.add_done_callback(client_gone)
        try:
            while chunk := await response.read(read_timeout):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except (UpstreamBroken, TimeoutError, OSError) as error:
            # the head is out: all that is left is to cut the response short
            logger.warning("upstream response broke off: %s", error)
        finally:
            if watcher is not None:
                watcher.cancel()
