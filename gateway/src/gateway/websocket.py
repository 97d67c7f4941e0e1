"""WebSocket proxying: the upgrade goes to a replica chosen like any request,
then frames are relayed one by one in both directions and close codes pass
through. The token may come as `Authorization: Bearer` or as the subprotocol
pair `bearer, <token>`; it is verified before any upstream is contacted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

from prometheus_client import Gauge
from starlette.types import Receive, Scope, Send

from gateway.errors import refuse, request_id
from gateway.headers import HeaderPolicy, OutgoingRequest, upstream_request
from gateway.pool import SICK_STATUSES, Replica
from gateway.proxy import Proxy, connection_failed, unreachable
from gateway.runtime import Route, Runtime
from gateway.spans import client_span, with_trace_context
from gateway.upstream import (
    ConnectFailed,
    HandshakeFailed,
    UpgradeRefused,
    UpstreamSocket,
    open_upstream,
)
from kit.errors import BadGateway, DomainError, GatewayTimeout, NotFound, ServiceUnavailable
from kit.security import bearer_from_subprotocols
from kit.websocket import frames_of, release_headers

logger = logging.getLogger("gateway.websocket")

WS_GOING_AWAY = 1001
WS_SERVICE_RESTART = 1012
WS_BAD_GATEWAY = 1014
# codes that describe a connection but may not be sent in a close frame
_NOT_ON_THE_WIRE = {1005: 1000, 1006: WS_GOING_AWAY, 1015: WS_GOING_AWAY}


def wire_close_code(code: int) -> int:
    code = _NOT_ON_THE_WIRE.get(code, code)
    return code if 1000 <= code <= 1014 or 3000 <= code <= 4999 else 1000


class HandshakeGate:
    """At most `limit` upgrades of this worker between the token check and the
    upstream's answer; the rest wait their turn, up to `wait_seconds`, then
    get a 503 with `Retry-After`.

    A reconnect storm (a replica killed under thousands of sockets) brings
    every client back within a second or two. Served all at once, the
    handshakes share the event loop until each one's timers (connect, Redis,
    probes) fire before their answers are read: replicas look dead, Redis
    looks down, and the work done for a handshake that then times out is
    lost. In turns, each handshake runs at the speed of a quiet gateway and
    the waiting ones cost a parked coroutine each."""

    __slots__ = ("_free", "_queue", "_waiting", "limit", "wait_seconds")

    def __init__(self, limit: int, wait_seconds: float, waiting: Gauge | None = None) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self._waiting = waiting
        self._free = limit
        # first come, first served: a slot set free goes to the oldest waiter
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(not future.done() for future in self._queue)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.limit <= 0:
            yield
            return
        if self._free > 0 and not self._queue:
            self._free -= 1
        else:
            await self._wait_for_slot()
        try:
            yield
        finally:
            self._release()

    async def _wait_for_slot(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._queue.append(future)
        if self._waiting is not None:
            self._waiting.inc()
        try:
            async with asyncio.timeout(self.wait_seconds):
                await future
        except BaseException as error:
            if future.done() and not future.cancelled():
                self._release()  # handed a slot just as the wait ended: pass it on
            else:
                future.cancel()
            if isinstance(error, TimeoutError):
                raise ServiceUnavailable(
                    "Too many WebSocket handshakes at once; retry",
                    headers={"Retry-After": str(1 + random.randrange(3))},
                ) from None
            raise
        finally:
            if self._waiting is not None:
                self._waiting.dec()

    def _release(self) -> None:
        while self._queue:
            future = self._queue.popleft()
            if not future.done():
                future.set_result(None)  # the slot passes straight to the next waiter
                return
        self._free += 1


class WebSocketProxy:
    def __init__(self, runtime: Runtime, proxy: Proxy) -> None:
        self.runtime = runtime
        self.proxy = proxy
        self.metrics = runtime.metrics
        self.gate = HandshakeGate(
            runtime.settings.ws_handshakes_in_flight,
            runtime.settings.ws_handshake_wait_seconds,
            waiting=runtime.metrics.websocket_handshakes_waiting,
        )
        self.policy = HeaderPolicy.for_websocket(
            trust_forwarded=runtime.settings.trust_forwarded_headers
        )

    async def __call__(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        if (await receive())["type"] != "websocket.connect":
            return
        subprotocols: list[str] = list(scope.get("subprotocols", ()))
        try:
            async with self.gate.slot():
                outgoing = upstream_request(scope, self.policy, request_id(scope))
                authorization = outgoing.authorization
                if authorization is None and (token := bearer_from_subprotocols(subprotocols)):
                    authorization = f"Bearer {token}"
                await self.proxy.admit(scope, authorization)
                upstream, replica = await self.connect(route, scope, outgoing, subprotocols)
        except UpgradeRefused as refused:
            # mirror the replica's refusal: a policy close reads as 403 to the client
            self.metrics.request(route.name, "GET", refused.status, time.perf_counter() - started)
            await send({"type": "websocket.close", "code": 1008, "reason": ""})
            return
        except DomainError as error:
            self.metrics.request(route.name, "GET", error.status, time.perf_counter() - started)
            await refuse(scope, receive, send, error)
            return
        self.metrics.request(route.name, "GET", 101, time.perf_counter() - started)
        # a relay lives for hours: keep nothing of the handshake's request
        del outgoing, authorization, subprotocols
        release_headers(scope)
        try:
            await send(
                {"type": "websocket.accept", "subprotocol": upstream.subprotocol, "headers": []}
            )
            # the replica's whole frames go straight to the client (gateway.upstream)
            upstream.forward = frames_of(scope)
            relay = Relay(upstream, receive, send, on_lost=lambda: route.pool.lost(replica))
            self.runtime.websockets.add(relay.shut_down)
            try:
                await relay.run()
            finally:
                self.runtime.websockets.discard(relay.shut_down)
        finally:
            replica.in_flight -= 1
            # sends 1001 unless a close is under way, and lets the connection end
            await upstream.close(WS_GOING_AWAY)

    async def connect(
        self, route: Route, scope: Scope, outgoing: OutgoingRequest, subprotocols: list[str]
    ) -> tuple[UpstreamSocket, Replica]:
        pool = route.pool
        settings = self.runtime.settings
        target = scope["raw_path"] or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        tried: list[Replica] = []
        while True:
            replica = await self.runtime.replica_for(route, tried)
            replica.in_flight += 1
            try:
                async with asyncio.timeout(route.timeout_seconds):
                    with upgrade_span(replica, target) as carried:
                        upstream = await open_upstream(
                            replica.address,
                            replica.port,
                            target,
                            with_trace_context(outgoing.headers, carried),
                            subprotocols=subprotocols,
                            max_size=settings.ws_max_message_bytes,
                            connect_timeout=settings.connect_timeout_seconds,
                            # the route's timeout bounds silence; here, a replica
                            # that reads nothing of the client's frames
                            write_stall_seconds=route.timeout_seconds,
                        )
            except UpgradeRefused as refused:
                replica.in_flight -= 1
                if refused.status in SICK_STATUSES:
                    pool.failed(replica)
                else:
                    pool.succeeded(replica)
                if refused.status >= 500:
                    # the replica opened nothing (one stopping, say): another may
                    if self._retry_elsewhere(route, tried, replica):
                        continue
                    raise BadGateway(f"The {route.name} service refused the upgrade") from refused
                if refused.status == 404:
                    raise NotFound("No WebSocket endpoint at this path") from refused
                raise
            except ConnectFailed as error:
                replica.in_flight -= 1
                connection_failed(pool, replica, error)
                if len(tried) < self.proxy.retries:
                    tried.append(replica)
                    self.metrics.retries.labels(route.name).inc()
                    continue
                raise unreachable(route.name, pool) from error
            except TimeoutError as error:
                replica.in_flight -= 1
                pool.timed_out(replica)
                raise GatewayTimeout(
                    f"The {route.name} service did not accept within {route.timeout_seconds:g} s"
                ) from error
            except (HandshakeFailed, OSError) as error:
                # no socket opened (a reset, or an answer that was no upgrade):
                # nothing of the client's reached a session, so another replica
                # may take the upgrade
                replica.in_flight -= 1
                pool.failed(replica)
                if self._retry_elsewhere(route, tried, replica):
                    continue
                raise BadGateway(f"The {route.name} service failed the upgrade") from error
            pool.succeeded(replica)
            return upstream, replica

    def _retry_elsewhere(self, route: Route, tried: list[Replica], replica: Replica) -> bool:
        """Whether an upgrade `replica` answered without opening a socket goes
        to another: retries are left and another live replica is there (else
        the client hears what this one answered, not "no replica")."""
        if len(tried) >= self.proxy.retries:
            return False
        now = time.monotonic()
        if not any(
            other is not replica and other not in tried and other.down_until <= now
            for other in route.pool.replicas
        ):
            return False
        tried.append(replica)
        self.metrics.retries.labels(route.name).inc()
        return True


@contextlib.contextmanager
def upgrade_span(replica: Replica, target: bytes) -> Iterator[list[tuple[str, str]]]:
    """With tracing on, the upgrade is a client span whose context goes upstream
    (`traceparent`), so the replica's session continues the client's trace;
    yields the headers that carry it (none with tracing off)."""
    with client_span("GET", replica, target) as span:
        try:
            yield span.carried
        except UpgradeRefused as refused:
            span.answered(refused.status)
            raise
        span.answered(101)


RELAY_GRACE_SECONDS = 5.0
"""How long the other direction has to finish (a close frame each way) once
one has ended, before the upstream connection is cut."""


class Relay:
    """Frames both ways, unbuffered; whichever side closes first, the other follows.

    An upstream that vanishes without a close frame (its process killed, its
    connection reset) is reported through `on_lost`: the pool counts it
    against the replica and resolves the replicas again, so the clients that
    reconnect at once are not sent back to a replica that is gone.

    Once one direction has ended, the other has `RELAY_GRACE_SECONDS` to
    finish; then the upstream connection is cut (which ends any wait on it)
    and both are cancelled. A direction can otherwise wait for ever: frames
    for a replica that no longer reads them (it dropped the socket, and its
    own close waits behind what the gateway has not read), after the client
    went away. Each such relay held two tasks, a descriptor and its buffers
    for good, one more per attempt, which the per-address cap (counting the
    client's connection, gone) did not bound."""

    __slots__ = ("client_open", "cut", "on_lost", "receive", "send", "upstream")

    def __init__(
        self,
        upstream: UpstreamSocket,
        receive: Receive,
        send: Send,
        *,
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self.upstream = upstream
        self.receive = receive
        self.send = send
        self.on_lost = on_lost
        self.client_open = True
        self.cut = False  # the relay cut the upstream itself: not the replica's fault

    async def run(self) -> None:
        # the client's side runs in the handler's own task, the upstream's in
        # one more: a task per direction cost the gateway 2.4 KiB a socket
        loop = asyncio.get_running_loop()
        downstream = asyncio.create_task(self.upstream_to_client())
        waiting = True
        try:
            async with asyncio.timeout(None) as limit:

                def grace(_: object) -> None:
                    if waiting:  # the upstream's side ended first
                        limit.reschedule(loop.time() + RELAY_GRACE_SECONDS)

                downstream.add_done_callback(grace)
                try:
                    await self.client_to_upstream()
                finally:
                    waiting = False
                    downstream.remove_done_callback(grace)
        except TimeoutError:
            self.cut = True  # the client's side outlived the grace
        finally:
            if not downstream.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(downstream), RELAY_GRACE_SECONDS)
            if self.cut or not downstream.done():
                self.cut = True
                self.upstream.abort()
            downstream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await downstream

    async def client_to_upstream(self) -> None:
        upstream = self.upstream
        while True:
            message = await self.receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                try:
                    if text is not None:
                        await upstream.send_text(text)
                    else:
                        await upstream.send_bytes(message.get("bytes") or b"")
                except ConnectionError:
                    pass  # the upstream is closing; its close frame is on its way
            elif kind == "websocket.disconnect":
                self.client_open = False
                if not upstream.closed:
                    reason = str(message.get("reason") or "").encode()[:123]
                    await upstream.close(wire_close_code(int(message.get("code", 1000))), reason)
                return

    async def upstream_to_client(self) -> None:
        upstream = self.upstream
        while True:
            message = await upstream.receive()
            try:
                if isinstance(message, str):
                    try:
                        await self.send({"type": "websocket.send", "text": message})
                    finally:
                        upstream.relayed()
                elif isinstance(message, bytes):
                    try:
                        await self.send({"type": "websocket.send", "bytes": message})
                    finally:
                        upstream.relayed()
                elif message.lost:
                    # an upstream that vanished without a close frame: "bad gateway"
                    if not self.cut:
                        self.on_lost()
                    await self.close_client(WS_BAD_GATEWAY, "")
                    return
                else:
                    # its close frame (echoed already), or the close the relay sent:
                    # the client gets the same code
                    code = wire_close_code(message.code)
                    await self.close_client(code, message.reason)
                    await upstream.close(code)
                    return
            except (OSError, RuntimeError):
                # the client is gone (OSError), or it closed and the server has
                # answered its close frame before client_to_upstream read the
                # disconnect (RuntimeError: nothing may be sent after a close);
                # either way the disconnect reaches client_to_upstream
                self.client_open = False
                return

    async def close_client(self, code: int, reason: str) -> None:
        if self.client_open:
            self.client_open = False
            await self.send({"type": "websocket.close", "code": code, "reason": reason[:123]})

    async def shut_down(self) -> None:
        """The gateway is stopping: 1012 tells the client to reconnect elsewhere."""
        await self.close_client(WS_SERVICE_RESTART, "gateway restarting")
        if not self.upstream.closed:
            await self.upstream.close(code=WS_GOING_AWAY)
