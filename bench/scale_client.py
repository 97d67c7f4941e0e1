"""The load client of bench/scale_bench.py: thousands of chat sockets through
the gateway, from a container on the stack's own network.

It runs inside one of the project's images (the gateway's: Python, aiohttp,
websockets) so that no connection crosses Docker's userland proxy, and talks
to the orchestrator on the host in lines: it prints one JSON event per line on
stdout and, where a step needs the host (a replica to kill), reads one line
on stdin.

The client shares the cores with the stack it measures, so its sockets are
lean: each is an `asyncio.Protocol` that writes the upgrade request, checks
the answer and reads frames in `data_received`, handing every text frame to
the load there and then (no task woken, no queue per frame); pings are
answered on the spot. aiohttp only registers the users. Steps:

1. register and log in `--users` users;
2. open `--sockets` sockets, `--rooms` rooms of equal size, `--concurrency`
   handshakes in flight: rate, refusals;
3. hold them `--hold` seconds (pings on): drops;
4. one message in each room: delivery latency to every socket (p50/p99);
5. the orchestrator kills the chat replica holding the most sockets; every
   socket it held reconnects with jittered exponential backoff and `since`,
   while one message a second goes into every room; each socket must end with
   every id exactly once, and its resume time is counted from the kill. Where
   that time went is reported too: the jitter before the first attempt, then
   each successful attempt's TCP connect, its 101 and its `ready` (p50, p99,
   max), how many resumed in each second after the kill, and the frames the
   sockets read meanwhile, by type.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
from websockets.speedups import apply_mask

PASSWORD = "scale-bench-password"
BACKOFF_BASE = 0.25
BACKOFF_CAP = 4.0
CLOSE_WITHIN = 15.0
SETUP_ATTEMPTS = 5
PRESENCE_PREFIX = '{"type":"presence",'  # chat writes its frames compact, type first
HANDSHAKE_SECONDS = 30.0
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x8, 0x9, 0xA, 0x0


class Refused(Exception):
    """The upgrade was answered with another status than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, unfragmented frame, as a client must send it."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


class Conn(asyncio.Protocol):
    """One WebSocket, read in `data_received`: the first text frame (chat's
    `ready`) resolves `ready`; after `attach`, every text frame goes to the
    callback at once; frames in between wait in `held`."""

    __slots__ = (
        "_buffer",
        "_fragments",
        "_key",
        "_request",
        "closed",
        "done",
        "handshake",
        "held",
        "on_text",
        "ready",
        "transport",
    )

    def __init__(self, request: bytes, key: str) -> None:
        loop = asyncio.get_running_loop()
        self._request = request
        self._key = key
        self._buffer = bytearray()
        self._fragments: list[bytes] | None = None
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.ready: asyncio.Future[str] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.held: list[str] = []
        self.on_text: Callable[[str], None] | None = None
        self.closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # `ready` is awaited only once the handshake succeeded
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError("closed"))
        elif self.handshake.exception() is None and not self.ready.done():
            self.ready.set_exception(ConnectionError("closed"))
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self.handshake.done():
            head, found, rest = self._buffer.partition(b"\r\n\r\n")
            if not found:
                return
            self._answer(bytes(head))
            if not self.handshake.done() or self.handshake.exception() is not None:
                return
            self._buffer = rest
        self._frames()

    def _answer(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            self.handshake.set_exception(ConnectionError("not an HTTP answer"))
            self.abort()
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self._key.encode() + WS_GUID).digest()).decode()
        if status != 101:
            self.handshake.set_exception(Refused(status))
        elif headers.get("sec-websocket-accept") != accept:
            self.handshake.set_exception(ConnectionError("bad Sec-WebSocket-Accept"))
        else:
            self.handshake.set_result(None)
            return
        self.abort()

    def _frames(self) -> None:
        buffer = self._buffer
        at, size = 0, len(buffer)
        while size - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            length, start = second & 0x7F, at + 2
            if length == 126:
                if size - start < 2:
                    break
                length, start = int.from_bytes(buffer[start : start + 2], "big"), start + 2
            elif length == 127:
                if size - start < 8:
                    break
                length, start = int.from_bytes(buffer[start : start + 8], "big"), start + 8
            if second & 0x80 or size - start < length:  # servers never mask
                if second & 0x80:
                    self.abort()
                    return
                break
            at = start + length
            self._frame(first, bytes(buffer[start:at]))
            if self.transport is None:
                return
        del buffer[:at]

    def _frame(self, first: int, payload: bytes) -> None:
        opcode = first & 0x0F
        if opcode in (TEXT, CONTINUATION):
            parts = [payload] if self._fragments is None else [*self._fragments, payload]
            if not first & 0x80:
                self._fragments = parts
                return
            self._fragments = None
            self._text(b"".join(parts).decode())
        elif opcode == PING:
            self.write(client_frame(PONG, payload))
        elif opcode == CLOSE:
            # the close handshake: echo the code (unless this side began it) and
            # end the connection; the socket is over as of this frame
            if not self.closed:
                self.write(client_frame(CLOSE, payload[:2]))
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
        elif opcode != PONG:
            self.abort()  # binary: chat never sends it

    def _text(self, text: str) -> None:
        if not self.ready.done():
            self.ready.set_result(text)
        elif self.on_text is not None:
            self.on_text(text)
        else:
            self.held.append(text)

    def attach(self, on_text: Callable[[str], None]) -> None:
        """Every text frame after `ready` goes to `on_text`, those held first."""
        self.on_text = on_text
        held, self.held = self.held, []
        for text in held:
            on_text(text)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_str(self, text: str) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("closed")
        self.transport.write(client_frame(TEXT, text.encode()))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    async def close(self) -> None:
        """Sends a close frame, then waits (at most 5 s) for the server to end the connection."""
        if not self.closed:
            self.closed = True
            self.write(client_frame(CLOSE, (1000).to_bytes(2, "big")))
        try:
            await asyncio.wait_for(asyncio.shield(self.done), 5.0)
        except TimeoutError:
            self.abort()


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def spread(values: list[float], unit: str, digits: int) -> dict[str, float]:
    """p50, p99 and max of durations in seconds, in `unit` ("s" or "ms")."""
    scale = 1000 if unit == "ms" else 1
    return {
        f"p50_{unit}": round(scale * percentile(values, 0.5), digits),
        f"p99_{unit}": round(scale * percentile(values, 0.99), digits),
        f"max_{unit}": round(scale * max(values, default=float("nan")), digits),
    }


class Sock:
    """One chat socket; reconnects with `since` after a drop when asked to."""

    __slots__ = (
        "closed_at",
        "dropped",
        "duplicates",
        "gaps",
        "index",
        "last_id",
        "node",
        "nodes",
        "resumed_at",
        "room",
        "token",
        "ws",
    )

    def __init__(self, index: int, room: str, token: str) -> None:
        self.index = index
        self.room = room
        self.token = token
        self.ws: Conn | None = None
        self.node = ""
        self.nodes: list[str] = []
        self.last_id = 0
        self.dropped = 0
        self.duplicates = 0
        self.gaps = 0
        self.closed_at = 0.0
        self.resumed_at = 0.0


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = args.url.rstrip("/")
        url = urlsplit(self.base)
        self.host_header = url.netloc
        self.port = url.port or 80
        self.address = url.hostname or "gateway"
        self.session: aiohttp.ClientSession
        self.socks: list[Sock] = []
        self.tokens: list[str] = []
        self.reconnecting = False
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.expecting: dict[str, int] = {}
        self.readers: list[asyncio.Task[None]] = []
        self.room_last: dict[str, int] = {}
        self.refusals: dict[str, int] = {}
        self.frames: dict[str, int] = {}  # frames read, by type
        # where each resume's time went, in seconds: from the drop to its
        # first attempt, then each successful attempt's TCP connect, the
        # 101 after it, and the `ready` frame after the 101
        self.phases: dict[str, list[float]] = {
            "first_attempt": [],
            "tcp": [],
            "upgrade": [],
            "ready": [],
        }

    # -- set-up ---------------------------------------------------------------

    async def users(self) -> None:
        async def post(path: str, ok: tuple[int, ...], **body: Any) -> dict[str, Any]:
            """A 5xx (auth slow to hash on a busy machine: 504) costs a retry;
            a registration that went through before its answer was lost is a 409."""
            for attempt in range(SETUP_ATTEMPTS):
                async with self.session.post(f"{self.base}{path}", **body) as response:
                    if response.status in ok:
                        answer: dict[str, Any] = await response.json(content_type=None)
                        return answer
                    text = await response.text()
                    if response.status < 500 or attempt == SETUP_ATTEMPTS - 1:
                        raise AssertionError(f"{path}: {response.status} {text}")
                await asyncio.sleep(1.0 + attempt)
            raise AssertionError(f"{path}: no answer")

        async def one(number: int) -> str:
            email = f"scale-{uuid.uuid4().hex[:12]}@example.com"
            body = {"email": email, "password": PASSWORD, "display_name": f"Load {number}"}
            await post("/auth/register", (201, 409), json=body)
            form = {"username": email, "password": PASSWORD}
            answer = await post("/auth/token", (200,), data=form)
            token: str = answer["access_token"]
            return token

        limit = asyncio.Semaphore(8)

        async def bounded(number: int) -> str:
            async with limit:
                return await one(number)

        self.tokens = list(await asyncio.gather(*(bounded(n) for n in range(self.args.users))))

    # -- sockets --------------------------------------------------------------

    def upgrade_request(self, sock: Sock, since: int | None) -> tuple[bytes, str]:
        query = "" if since is None else f"?since={since}"
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /chat/ws/{sock.room}{query} HTTP/1.1\r\n"
            f"Host: {self.host_header}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            # offered as every browser does; the gateway declines it by default
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            f"Authorization: Bearer {sock.token}\r\n\r\n"
        )
        return request.encode(), key

    async def connect(self, sock: Sock, *, since: int | None) -> bool:
        request, key = self.upgrade_request(sock, since)
        loop = asyncio.get_running_loop()
        ws: Conn | None = None
        began = time.monotonic()
        try:
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                _, ws = await loop.create_connection(
                    lambda: Conn(request, key), self.address, self.port
                )
                connected = time.monotonic()
                await ws.handshake
                upgraded = time.monotonic()
        except Refused as error:
            self.refusals[str(error.status)] = self.refusals.get(str(error.status), 0) + 1
            return False
        except (OSError, TimeoutError) as error:
            if ws is not None:
                ws.abort()
            name = type(error).__name__
            self.refusals[name] = self.refusals.get(name, 0) + 1
            return False
        try:
            ready = json.loads(await asyncio.wait_for(ws.ready, 30))
        except (TimeoutError, TypeError, ValueError, ConnectionError):
            self.refusals["no ready"] = self.refusals.get("no ready", 0) + 1
            await ws.close()
            return False
        if not isinstance(ready, dict) or ready.get("type") != "ready":
            self.refusals["closed"] = self.refusals.get("closed", 0) + 1
            await ws.close()
            return False
        if since is not None:
            self.phases["tcp"].append(connected - began)
            self.phases["upgrade"].append(upgraded - connected)
            self.phases["ready"].append(time.monotonic() - upgraded)
        sock.ws = ws
        sock.node = ready["node"]
        sock.nodes.append(sock.node)
        if since is None:
            sock.last_id = ready["last_id"]
        ws.attach(lambda text: self.on_text(sock, text))
        return True

    async def open_all(self) -> None:
        args = self.args
        rooms = [f"scale-{uuid.uuid4().hex[:6]}-{n}" for n in range(args.rooms)]
        for index in range(args.sockets):
            # socket i is in room i % rooms; its user steps once per pass over
            # the rooms, so a room's members are distinct users (as many as
            # there are users) and each user has a socket in every room
            token = self.tokens[(index // args.rooms) % len(self.tokens)]
            self.socks.append(Sock(index, rooms[index % args.rooms], token))
        queue: asyncio.Queue[Sock] = asyncio.Queue()
        for sock in self.socks:
            queue.put_nowait(sock)
        opened = 0

        async def opener() -> None:
            nonlocal opened
            while not queue.empty():
                sock = queue.get_nowait()
                if await self.connect(sock, since=None):
                    opened += 1
                    self.readers.append(asyncio.create_task(self.read(sock)))

        started = time.monotonic()
        await asyncio.gather(*(opener() for _ in range(args.concurrency)))
        elapsed = time.monotonic() - started
        nodes: dict[str, int] = {}
        for sock in self.socks:
            if sock.ws is not None:
                nodes[sock.node] = nodes.get(sock.node, 0) + 1
        emit(
            "opened",
            asked=args.sockets,
            held=opened,
            refused=args.sockets - opened,
            refusals=self.refusals,
            seconds=round(elapsed, 2),
            per_second=round(opened / elapsed, 1),
            nodes=nodes,
            frames=dict(self.frames),
        )

    def on_text(self, sock: Sock, text: str) -> None:
        """One text frame of the socket, as it arrives."""
        if sock.ws is None or sock.ws.closed:
            return  # after the close frame: the socket is over
        if text.startswith(PRESENCE_PREFIX):
            # counted, not decoded: the client shares the cores with
            # the stack, and only messages are checked
            self.frames["presence"] = self.frames.get("presence", 0) + 1
            return
        data = json.loads(text)
        kind = data.get("type")
        self.frames[kind] = self.frames.get(kind, 0) + 1
        if kind != "message":
            return
        message_id = data["id"]
        if message_id <= sock.last_id:
            sock.duplicates += 1
            return
        if message_id != sock.last_id + 1:
            sock.gaps += 1
        sock.last_id = message_id
        client_id = data.get("client_id") or ""
        sent = self.sent_at.get(client_id)
        if sent is not None:
            self.latencies.append(time.monotonic() - sent)

    async def read(self, sock: Sock) -> None:
        """Waits for the socket to end (its frames are read by `on_text` as they
        come); on a drop, reconnects (backoff with full jitter) with `since`."""
        while True:
            ws = sock.ws
            assert ws is not None
            await ws.done
            sock.dropped += 1
            sock.closed_at = sock.closed_at or time.time()
            sock.ws = None
            if not self.reconnecting:
                return
            attempt = 0
            # full jitter from the first attempt: thousands of sockets dropped at
            # once must not come back in one instant
            await asyncio.sleep(random.uniform(0, BACKOFF_BASE * 4))
            self.phases["first_attempt"].append(time.time() - sock.closed_at)
            while not await self.connect(sock, since=sock.last_id):
                attempt += 1
                await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
            # back on a replica with `since`: the replay of what it missed follows
            sock.resumed_at = time.time()

    # -- steps ----------------------------------------------------------------

    async def hold(self) -> None:
        started = time.monotonic()
        await asyncio.sleep(self.args.hold)
        open_now = sum(sock.ws is not None and not sock.ws.closed for sock in self.socks)
        emit(
            "held",
            seconds=round(time.monotonic() - started, 1),
            open=open_now,
            drops=sum(sock.dropped for sock in self.socks),
        )

    async def say_in_every_room(self, avoid: str = "") -> int:
        # one sender per room, each room's a different user where there are
        # enough: a hundred people saying one thing each, not one person
        # saying a hundred (which the per-user message limit refuses)
        chosen: dict[str, Sock] = {}
        speaking: set[str] = set()
        spare: dict[str, Sock] = {}
        for sock in self.socks:
            if sock.ws is None or sock.ws.closed or sock.node == avoid:
                continue
            spare.setdefault(sock.room, sock)
            if sock.room not in chosen and sock.token not in speaking:
                chosen[sock.room] = sock
                speaking.add(sock.token)
        for room, sock in spare.items():
            chosen.setdefault(room, sock)
        sent = 0
        for sock in chosen.values():
            client_id = uuid.uuid4().hex
            self.sent_at[client_id] = time.monotonic()
            assert sock.ws is not None
            with contextlib.suppress(ConnectionError):
                frame = {"type": "message", "text": "scale", "client_id": client_id}
                sock.ws.send_str(json.dumps(frame))
                sent += 1
        return sent

    async def wait_all_reach(self, within: float) -> bool:
        """Waits until every socket has its room's newest id (as senders see it)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            newest: dict[str, int] = {}
            for sock in self.socks:
                newest[sock.room] = max(newest.get(sock.room, 0), sock.last_id)
            self.room_last.update(newest)
            if all(sock.last_id >= newest[sock.room] for sock in self.socks):
                return True
            await asyncio.sleep(0.05)
        return False

    async def broadcast(self) -> None:
        """`--broadcasts` rounds, one message per room each, a second apart; the
        figures pool every round's deliveries and list each round's p99."""
        latencies: list[float] = []
        rounds: list[dict[str, float]] = []
        sent = expected = got = 0
        for number in range(self.args.broadcasts):
            if number:
                await asyncio.sleep(1.0)
            self.latencies = []
            before = {sock.index: sock.last_id for sock in self.socks}
            sent += await self.say_in_every_room()
            live = sum(sock.ws is not None for sock in self.socks)
            expected += live
            deadline = time.monotonic() + 30
            while len(self.latencies) < live and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            got += sum(sock.last_id > before[sock.index] for sock in self.socks)
            latencies += self.latencies
            rounds.append(spread(self.latencies, "ms", 1))
        emit(
            "broadcast",
            messages=sent,
            expected=expected,
            delivered=len(latencies),
            sockets_reached=got,
            **spread(latencies, "ms", 1),
            rounds=rounds,
        )

    async def storm(self) -> None:
        nodes: dict[str, int] = {}
        for sock in self.socks:
            if sock.ws is not None:
                nodes[sock.node] = nodes.get(sock.node, 0) + 1
        victim = max(nodes, key=lambda node: nodes[node])
        await self.wait_all_reach(10)
        for sock in self.socks:
            sock.closed_at = sock.resumed_at = 0.0
            sock.dropped = 0
        self.reconnecting = True
        frames_before = dict(self.frames)
        emit("kill", node=victim, sockets=nodes[victim])
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        killed_at = float(line.split()[1])
        # messages keep coming into every room while the victim's sockets move
        for _ in range(self.args.storm_messages):
            await self.say_in_every_room(avoid=victim)
            await asyncio.sleep(1.0)
        caught_up = await self.wait_all_reach(self.args.resume_within * 2)
        moved = [sock for sock in self.socks if sock.dropped]
        resume = [sock.resumed_at - killed_at for sock in moved if sock.resumed_at]
        # when each moved socket saw its drop, from the kill: what the rest of
        # the resume time is made of (reconnecting) shows against it
        noticed = [sock.closed_at - killed_at for sock in moved if sock.closed_at]
        emit(
            "storm",
            victim=victim,
            moved=len(moved),
            resumed=len(resume),
            within_goal=sum(seconds <= self.args.resume_within for seconds in resume),
            **spread(resume, "s", 2),
            dropped_p50_s=round(percentile(noticed, 0.5), 2),
            dropped_max_s=round(max(noticed, default=float("nan")), 2),
            still_on_victim=sum(sock.node == victim for sock in self.socks if sock.ws),
            caught_up=caught_up,
            lost=sum(sock.gaps for sock in self.socks),
            doubled=sum(sock.duplicates for sock in self.socks),
            refusals=self.refusals,
            # frames the sockets read from the kill on, by type
            frames={kind: n - frames_before.get(kind, 0) for kind, n in self.frames.items()},
            # how many resumed in each second after the kill: the rate over time
            resumed_by_second=[
                sum(second <= seconds < second + 1 for seconds in resume)
                for second in range(int(max(resume, default=0)) + 1)
            ],
            phases={name: spread(values, "s", 3) for name, values in self.phases.items() if values},
        )

    async def close(self) -> None:
        self.reconnecting = False
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        # a socket whose close handshake never completes must not keep the run
        # open: whatever has not closed within the bound is left to the exit
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(
                    *(sock.ws.close() for sock in self.socks if sock.ws is not None),
                    return_exceptions=True,
                ),
                CLOSE_WITHIN,
            )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://gateway:8000")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--hold", type=float, default=300.0)
    parser.add_argument("--broadcasts", type=int, default=1)
    parser.add_argument("--storm-messages", type=int, default=5)
    parser.add_argument("--resume-within", type=float, default=15.0)
    args = parser.parse_args()
    load = Load(args)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        load.session = session
        await load.users()
        # resolved once: the sockets connect to the address, not the name
        infos = await asyncio.get_running_loop().getaddrinfo(
            load.address, load.port, type=socket.SOCK_STREAM
        )
        load.address = infos[0][4][0]
        emit("registered", users=len(load.tokens))
        await load.open_all()
        await load.hold()
        await load.broadcast()
        await load.storm()
        await load.close()
    emit("done")


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
