from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from chat import endpoint, service
from chat.connection import Connection
from kit.context import request_id_var
from kit.security import revoked_token_key, revoked_user_key
from kit_testing import Service, TokenMinter, wait_for_postgres

from .factories import (
    ChatClient,
    Node,
    chat,
    chat_uri,
    eventually,
    has_text,
    joined_sockets,
    start_node,
    unique_room,
)


async def test_ready_frame_names_room_last_id_and_node(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    async with chat(cluster[0], room, minter.token(user_id="alice", name="Alice")) as client:
        assert client.ready == {"type": "ready", "room": room, "last_id": 0, "node": "node-a"}
        await client.say("hello")
        (message,) = await client.messages(1)
    assert message["id"] == 1
    assert message["room"] == room
    assert message["user"] == {"id": "alice", "display_name": "Alice"}
    assert message["text"] == "hello"
    assert message["client_id"] is None
    assert message["sent_at"].endswith("+00:00")
    async with chat(cluster[1], room, minter.token()) as late:
        assert late.ready == {"type": "ready", "room": room, "last_id": 1, "node": "node-b"}


async def test_every_receiver_gets_every_message_once_in_order(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    per_sender = 25
    async with (
        chat(cluster[0], room, minter.token(user_id="s0")) as s0,
        chat(cluster[1], room, minter.token(user_id="s1")) as s1,
        chat(cluster[2], room, minter.token(user_id="s2")) as s2,
        chat(cluster[0], room, minter.token()) as r0,
        chat(cluster[1], room, minter.token()) as r1,
        chat(cluster[2], room, minter.token()) as r2,
    ):
        senders = [s0, s1, s2]

        async def send_all(index: int, sender: ChatClient) -> None:
            for seq in range(per_sender):
                await sender.say(f"{index}:{seq}")

        await asyncio.gather(*(send_all(i, s) for i, s in enumerate(senders)))
        total = per_sender * len(senders)
        received = await asyncio.gather(
            *(client.messages(total) for client in [*senders, r0, r1, r2])
        )
    expected_texts = {f"{i}:{seq}" for i in range(3) for seq in range(per_sender)}
    for frames in received:
        assert [frame["id"] for frame in frames] == list(range(1, total + 1))
        assert {frame["text"] for frame in frames} == expected_texts
        for index in range(3):
            own = [f["text"] for f in frames if f["text"].startswith(f"{index}:")]
            assert own == [f"{index}:{seq}" for seq in range(per_sender)]
    assert received[0] == received[-1]


async def test_resume_with_since_has_no_gap_and_no_duplicate(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    total = 60
    async with chat(cluster[0], room, minter.token(user_id="writer")) as writer:

        async def write() -> None:
            for seq in range(total):
                await writer.say(f"m{seq}")
                await writer.recv_until(has_text(f"m{seq}"))

        async with chat(cluster[1], room, minter.token(user_id="reader")) as first:
            sending = asyncio.create_task(write())
            before = await first.messages(10)
        last_seen = before[-1]["id"]
        # reconnect elsewhere while messages keep coming
        async with chat(cluster[2], room, minter.token(user_id="reader"), since=last_seen) as again:
            after = await again.messages(total - last_seen)
        await sending
    ids = [frame["id"] for frame in before + after]
    assert ids == list(range(1, total + 1))
    assert [frame["text"] for frame in before + after] == [f"m{seq}" for seq in range(total)]


async def test_since_zero_replays_the_whole_room_then_goes_live(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    async with chat(cluster[0], room, minter.token()) as writer:
        for seq in range(3):
            await writer.say(f"old{seq}")
        await writer.messages(3)
        async with chat(cluster[1], room, minter.token(), since=0) as reader:
            assert reader.ready["last_id"] == 3
            replayed = await reader.messages(3)
            await writer.say("new")
            (live,) = await reader.messages(1)
    assert [frame["id"] for frame in [*replayed, live]] == [1, 2, 3, 4]
    assert live["text"] == "new"


async def test_repeated_client_id_is_stored_once(cluster: list[Node], minter: TokenMinter) -> None:
    room = unique_room()
    token = minter.token(user_id="dup")
    async with (
        chat(cluster[0], room, token) as sender,
        chat(cluster[1], room, minter.token()) as other,
    ):
        await sender.say("once", client_id="c-1")
        (first,) = await sender.messages(1)
        await sender.say("once again", client_id="c-1")
        (repeat,) = await sender.messages(1)
        await sender.say("next", client_id="c-2")
        (nxt,) = await sender.messages(1)
        seen_by_other = await other.messages(2)
    assert repeat == first
    assert first["text"] == "once"
    assert first["client_id"] == "c-1"
    assert nxt["id"] == first["id"] + 1
    assert [frame["id"] for frame in seen_by_other] == [first["id"], nxt["id"]]


async def test_same_client_id_from_another_user_is_a_new_message(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    async with (
        chat(cluster[0], room, minter.token(user_id="u1")) as one,
        chat(cluster[0], room, minter.token(user_id="u2")) as two,
    ):
        await one.say("a", client_id="same")
        await one.messages(1)
        await two.say("b", client_id="same")
        frames = await two.messages(2)
    assert [frame["id"] for frame in frames] == [1, 2]


@pytest.mark.parametrize(
    ("frame", "detail"),
    [
        ("not json", "Frame is not valid JSON"),
        ("[1, 2]", "Frame must be a JSON object"),
        ('{"type": "shout"}', "Unknown frame type; expected message or auth"),
        ('{"type": "message"}', "text must be a string of 1..4000 characters"),
        ('{"type": "message", "text": ""}', "text must be a string of 1..4000 characters"),
        ('{"type": "message", "text": 5}', "text must be a string of 1..4000 characters"),
        (
            json.dumps({"type": "message", "text": "x" * 4001}),
            "text must be a string of 1..4000 characters",
        ),
        (
            '{"type": "message", "text": "hi", "client_id": 7}',
            "client_id must be a string of 1..64 characters",
        ),
        (json.dumps({"type": "message", "text": "x" * 70_000}), "Frame too large (max 65536)"),
        ('{"type": "auth"}', "auth needs a token"),
        ('{"type": "auth", "token": "nope"}', "Token refused: Malformed token"),
        # a header whose alg is a list ({"alg": []}), which no set of algorithms holds
        (
            '{"type": "auth", "token": "eyJhbGciOltdfQ.e30.eA"}',
            "Token refused: Token algorithm is not allowed",
        ),
    ],
)
async def test_bad_frame_gets_an_error_and_the_socket_stays_open(
    cluster: list[Node], minter: TokenMinter, frame: str, detail: str
) -> None:
    room = unique_room()
    async with chat(cluster[0], room, minter.token()) as client:
        await client.ws.send(frame)
        error = await client.recv_type("error")
        await client.say("x" * 4000)
        (message,) = await client.messages(1)
    assert error == {"type": "error", "detail": detail}
    assert message["id"] == 1
    assert len(message["text"]) == 4000


@pytest.mark.parametrize(
    ("frame", "loc", "kind"),
    [
        ('{"type": "message", "text": "a\\u0000b"}', ["text"], "string_nul"),
        ('{"type": "message", "text": "a\\ud800b"}', ["text"], "string_surrogate"),
        ('{"type": "message", "text": "hi", "client_id": "\\u0000"}', ["client_id"], "string_nul"),
        ('{"type": "message", "text": "hi", "n": 1e999}', ["n"], "number_not_finite"),
        ('{"type": "auth", "token": "x\\u0000"}', ["token"], "string_nul"),
    ],
)
async def test_text_the_database_cannot_take_gets_an_error_naming_the_field(
    cluster: list[Node], minter: TokenMinter, frame: str, loc: list[str], kind: str
) -> None:
    room = unique_room()
    async with chat(cluster[0], room, minter.token()) as client:
        await client.ws.send(frame)
        error = await client.recv_type("error")
        await client.say("still open")
        (message,) = await client.messages(1)
    assert error["errors"] == [{"loc": loc, "msg": error["errors"][0]["msg"], "type": kind}]
    assert error["detail"] == f"Invalid frame: {'.'.join(loc)}"
    assert message["text"] == "still open"


async def test_a_frame_nested_past_the_parser_gets_json_too_deep(
    cluster: list[Node], minter: TokenMinter
) -> None:
    """json.loads gives up at about a thousand levels with a RecursionError,
    far inside the frame's size limit: the same error as 33 levels."""
    nested = '{"type": "message", "text": "hi", "n": ' + "[" * 5000 + "]" * 5000 + "}"
    async with chat(cluster[0], unique_room(), minter.token()) as client:
        await client.ws.send(nested)
        error = await client.recv_type("error")
        await client.say("still open")
        (message,) = await client.messages(1)
    assert error["detail"] == "Invalid frame"
    assert [(e["loc"], e["type"]) for e in error["errors"]] == [([], "json_too_deep")]
    assert message["text"] == "still open"


async def test_binary_frame_gets_an_error(cluster: list[Node], minter: TokenMinter) -> None:
    async with chat(cluster[0], unique_room(), minter.token()) as client:
        await client.ws.send(b"\x00\x01")
        error = await client.recv_type("error")
    assert error == {"type": "error", "detail": "Binary frames are not supported; send JSON text"}


async def assert_refused(node: Node, headers: dict[str, str], room: str = "lobby") -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(chat_uri(node, room), additional_headers=headers):
            pass
    assert refused.value.response.status_code == 403


async def test_missing_token_is_refused_before_any_frame(cluster: list[Node]) -> None:
    await assert_refused(cluster[0], {})


async def test_token_in_the_query_string_is_not_accepted(
    cluster: list[Node], minter: TokenMinter
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(chat_uri(cluster[0], "lobby") + "?token=" + minter.token()):
            pass
    assert refused.value.response.status_code == 403


async def test_invalid_token_is_refused(cluster: list[Node], minter: TokenMinter) -> None:
    await assert_refused(cluster[0], {"Authorization": "Bearer not-a-jwt"})
    stranger = TokenMinter()  # signed by a key the service does not know
    await assert_refused(cluster[0], {"Authorization": f"Bearer {stranger.token()}"})


async def test_expired_token_is_refused(cluster: list[Node], minter: TokenMinter) -> None:
    await assert_refused(cluster[0], {"Authorization": f"Bearer {minter.token(lifetime=-60)}"})


async def test_revoked_token_is_refused(
    cluster: list[Node], minter: TokenMinter, redis_url: str
) -> None:
    token = minter.token(jti="revoked-jti-1")
    async with chat(cluster[0], unique_room(), token) as client:  # accepted before revocation
        assert client.ready["type"] == "ready"
    redis = Redis.from_url(redis_url)
    try:
        await redis.set(revoked_token_key("revoked-jti-1"), "1", ex=60)
    finally:
        await redis.aclose()
    # written by another client, the revocation reaches the node as a keyspace
    # event: the node refuses the token once its mirror has read it
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 5
    while await accepted(cluster[0], headers):
        assert time.monotonic() < deadline, "the revoked token is still accepted"
    await assert_refused(cluster[0], headers)


async def accepted(node: Node, headers: dict[str, str]) -> bool:
    try:
        async with connect(chat_uri(node, "lobby"), additional_headers=headers):
            return True
    except InvalidStatus:
        return False


@pytest.mark.parametrize(
    "room",
    [
        "bad.room",
        "lobby%0A",  # a room pattern's `$` would take the final newline
        "x" * 65,
        "lobby?since=abc",
        "lobby?since=-1",
        "lobby?since=%C2%B2",  # "²": a digit to isdigit(), not to int()
    ],
)
async def test_invalid_room_or_since_is_refused(
    cluster: list[Node], minter: TokenMinter, room: str
) -> None:
    await assert_refused(cluster[0], {"Authorization": f"Bearer {minter.token()}"}, room)


async def test_bearer_subprotocol_is_answered_without_echoing_the_token(
    cluster: list[Node], minter: TokenMinter
) -> None:
    token = minter.token()
    async with connect(chat_uri(cluster[0], unique_room()), subprotocols=["bearer", token]) as ws:  # type: ignore[list-item]
        ready = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert ws.subprotocol == "bearer"
        assert ws.response is not None
        assert token not in str(ws.response.headers)
    assert ready["type"] == "ready"


async def test_token_expiry_closes_the_socket_unless_renewed(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    async with (
        # tokens of whole seconds: one of 5 lives 4 to 5 s, time for the renewal
        chat(cluster[0], room, minter.token(user_id="brief", lifetime=5)) as expiring,
        chat(cluster[1], room, minter.token(user_id="kept", lifetime=5)) as renewed,
    ):
        await renewed.send({"type": "auth", "token": minter.token(user_id="kept")})
        ack = await renewed.recv_type("auth")
        await renewed.send({"type": "auth", "token": minter.token(user_id="someone-else")})
        refused = await renewed.recv_type("error")
        closed = await expiring.close_frame(within=10)
        assert closed == (4001, "token expired")
        await renewed.say("still here")
        (message,) = await renewed.messages(1)
    assert ack["type"] == "auth"
    assert refused == {"type": "error", "detail": "Token refused: it is for another user"}
    assert message["text"] == "still here"


async def test_history_and_presence_need_a_token(cluster: list[Node]) -> None:
    async with httpx.AsyncClient(base_url=cluster[0].url) as http:
        response = await http.get("/chat/rooms/lobby/messages")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Not authenticated"


async def test_concurrent_repeats_on_two_replicas_are_stored_once(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    async with (
        chat(cluster[0], room, minter.token(user_id="twin")) as left,
        chat(cluster[1], room, minter.token(user_id="twin")) as right,
        chat(cluster[2], room, minter.token()) as watcher,
    ):
        await asyncio.gather(
            left.say("same", client_id="race-1"), right.say("same", client_id="race-1")
        )
        from_left = await left.recv_until(has_text("same"))
        from_right = await right.recv_until(has_text("same"))
        await left.say("after")
        watched = await watcher.messages(2)
    assert from_left["id"] == from_right["id"] == 1
    assert [(frame["id"], frame["text"]) for frame in watched] == [(1, "same"), (2, "after")]


async def test_since_beyond_the_newest_id_replays_nothing(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    async with chat(cluster[0], room, minter.token(), since=10) as client:
        assert client.ready["last_id"] == 0
        for seq in range(11):
            await client.say(f"n{seq}")
        (first,) = await client.messages(1)
    assert first["id"] == 11
    assert first["text"] == "n10"


async def test_database_outage_answers_with_an_error_and_keeps_the_socket(
    cluster: list[Node], minter: TokenMinter, postgres_service: Service
) -> None:
    room = unique_room()
    async with chat(cluster[0], room, minter.token(user_id="patient")) as client:
        await asyncio.to_thread(postgres_service.stop)
        try:
            await client.say("lost?", client_id="retry-1")
            error = await client.recv_type("error", within=20)
        finally:
            await asyncio.to_thread(postgres_service.start)
            await wait_for_postgres(
                f"postgresql://test:test@127.0.0.1:{postgres_service.port}/test"
            )
        await client.say("lost?", client_id="retry-1")
        frame = await client.recv_until(lambda f: f["type"] in ("message", "error"))
    assert error == {"type": "error", "detail": "Message not stored; try again"}
    assert frame["id"] == 1
    assert frame["client_id"] == "retry-1"


async def test_a_frozen_database_answers_with_an_error_in_time_and_a_retry_stores_once(
    settings_for: Any, minter: TokenMinter, postgres_service: Service
) -> None:
    """PostgreSQL takes connections and answers nothing (cut off, or stuck):
    the sender hears the error within the command timeout rather than when
    the database comes back, keeps its socket, and the same frame sent again
    stores the message once."""
    room = unique_room()
    settings = settings_for(
        "node-frozen", database_statement_timeout_seconds=0.5, database_command_timeout_seconds=1
    )
    async with (
        start_node(settings, minter) as node,
        chat(node, room, minter.token(user_id="patient")) as client,
    ):
        async with postgres_service.frozen():
            await client.say("lost?", client_id="frozen-1")
            error = await client.recv_type("error", within=10)
        await client.say("lost?", client_id="frozen-1")
        frame = await client.recv_until(lambda f: f["type"] in ("message", "error"))
        await client.say("and then")
        (then,) = await client.messages(1)
    assert error == {"type": "error", "detail": "Message not stored; try again"}
    assert (frame["type"], frame["id"], frame["client_id"]) == ("message", 1, "frozen-1")
    assert then["id"] == 2


async def test_connections_lost_with_a_database_restart_cost_no_message(
    cluster: list[Node], minter: TokenMinter, database_url: str
) -> None:
    """Pooled connections are not pinged before use: one the database dropped is
    found when it is used, and the message is stored (or the read made) again on
    a fresh one."""
    room = unique_room()
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    async with chat(cluster[0], room, minter.token(user_id="steady")) as client:
        await client.say("before", client_id="before-1")
        await client.messages(1)
        admin = await asyncpg.connect(dsn)
        try:
            # what a restart does to every connection the replica holds
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        # joining reads the room's last id on another replica's dropped connections
        async with chat(cluster[1], room, minter.token(user_id="late")) as late:
            await client.say("with an id", client_id="after-1")
            await client.say("without an id")
            frames = await client.messages(2)
            heard = await late.messages(2)
    assert [(f["id"], f["text"]) for f in frames] == [(2, "with an id"), (3, "without an id")]
    assert [f["id"] for f in heard] == [2, 3]
    assert not [f for f in client.seen + late.seen if f["type"] == "error"]


async def test_revoking_a_token_closes_its_open_socket(
    cluster: list[Node], minter: TokenMinter, redis_url: str
) -> None:
    room = unique_room()
    now = int(time.time())
    by_token = minter.token(user_id="leaver", jti="jti-open-1")
    by_user = minter.token(user_id="everywhere", iat=now - 10)
    redis = Redis.from_url(redis_url)
    try:
        async with (
            chat(cluster[0], room, by_token) as one,
            chat(cluster[1], room, by_user) as two,
            chat(cluster[2], room, minter.token(user_id="stays")) as three,
        ):
            await redis.set(revoked_token_key("jti-open-1"), "1", ex=60)
            await redis.set(revoked_user_key("everywhere"), str(now), ex=60)
            closed = await asyncio.gather(one.close_frame(), two.close_frame())
            await three.say("still open")
            (message,) = await three.messages(1)
    finally:
        await redis.aclose()
    assert list(closed) == [(4003, "token revoked"), (4003, "token revoked")]
    assert message["text"] == "still open"


async def test_a_revoked_socket_whose_close_waits_posts_nothing(
    cluster: list[Node], minter: TokenMinter, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its close frame queued behind frames the client does not read, a
    revoked socket is still open: what it sends meanwhile is not taken."""
    room, jti = unique_room(), f"jti-{uuid.uuid4().hex[:8]}"
    node = cluster[0]
    redis = Redis.from_url(redis_url)
    stuck = asyncio.Event()
    joined = joined_sockets(monkeypatch)

    async def never_written(text: str) -> None:
        await stuck.wait()

    try:
        async with chat(node, room, minter.token(user_id="watcher")) as watcher:
            async with chat(node, room, minter.token(user_id="leaver", jti=jti)) as leaver:
                ((connection, hub),) = [(c, h) for c, h in joined if c.jti == jti]
                # the client stopped reading: nothing more reaches its socket
                monkeypatch.setattr(connection._frames, "write_frame", lambda frame: False)
                monkeypatch.setattr(connection.websocket, "send_text", never_written)
                await watcher.say("queued for the leaver")
                await redis.set(revoked_token_key(jti), "1", ex=60)

                async def closing() -> bool:
                    return connection.close_code is not None

                await eventually(closing)
                await leaver.say("after the logout")
                # every frame it sent is handled once its socket is gone
                leaver.ws.transport.abort()

                async def gone() -> bool:
                    return connection not in hub.connections()

                await eventually(gone)
            await watcher.say("marker")
            texts = [frame["text"] for frame in await watcher.messages(2)]
    finally:
        stuck.set()
        await redis.aclose()
    assert connection.close_code == 4003
    assert texts == ["queued for the leaver", "marker"]


async def revocation_reads(redis_url: str, key: str, reads: int) -> list[list[str]]:
    """The first `reads` MGETs (Redis MONITOR) that read `key`, as their key lists."""
    client = Redis.from_url(redis_url, decode_responses=True)
    seen: list[list[str]] = []
    try:
        async with client.monitor() as monitor:
            async for command in monitor.listen():
                words = str(command.get("command", "")).split()
                if words and words[0].upper() == "MGET" and key in words[1:]:
                    seen.append(words[1:])
                    if len(seen) == reads:
                        return seen
    finally:
        await client.aclose()
    return seen


async def test_the_revocation_check_reads_each_token_once_whatever_its_sockets(
    cluster: list[Node], minter: TokenMinter, redis_url: str
) -> None:
    room = unique_room()
    jti = f"jti-shared-{uuid.uuid4().hex[:8]}"
    shared = minter.token(user_id="tabs", jti=jti)
    async with (
        chat(cluster[0], room, shared),
        chat(cluster[0], room, shared),
        chat(cluster[0], room, shared),
        chat(cluster[0], room, minter.token(user_id="tabs")),
    ):
        reads = await asyncio.wait_for(revocation_reads(redis_url, revoked_token_key(jti), 2), 20)
    # three sockets, one token: its keys are read once per check, beside the other token's
    for keys in reads:
        assert keys.count(revoked_token_key(jti)) == 1, keys
        assert keys.count(revoked_user_key("tabs")) == 2, keys


class AccessLines(logging.Handler):
    """The access logger's records, with the request id current when each was written."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = dict(getattr(record, "fields", {}))
        self.lines.append({**fields, "request_id": request_id_var.get()})

    async def wait_for(self, event: str, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while True:
            for line in self.lines:
                if line.get("event") == event and line["request_id"] == request_id:
                    return line
            assert time.monotonic() < deadline, f"no access line {event} for {request_id}"
            await asyncio.sleep(0.02)


async def test_a_socket_keeps_its_request_id_and_access_lines(
    cluster: list[Node], minter: TokenMinter
) -> None:
    """The socket path skips the HTTP middleware, not the layers a socket needs."""
    access = logging.getLogger("access")
    handler, level = AccessLines(), access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    request_id = f"socket-{uuid.uuid4().hex}"
    headers = {
        "Authorization": f"Bearer {minter.token(user_id='logged')}",
        "X-Request-ID": request_id,
    }
    try:
        async with connect(chat_uri(cluster[0], unique_room()), additional_headers=headers) as ws:
            assert ws.response is not None
            assert ws.response.headers["x-request-id"] == request_id
            assert json.loads(await ws.recv())["type"] == "ready"
            opened = await handler.wait_for("open", request_id)
        closed = await handler.wait_for("close", request_id)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert opened["route"] == closed["route"] == "/chat/ws/{room}"
    assert opened["status"] == 101
    assert opened["user_id"] == closed["user_id"] == "logged"
    assert closed["closed_by"] == "client"
    assert closed["close_code"] == 1000


async def test_resume_reads_postgresql_only_for_what_the_replica_no_longer_holds(
    cluster: list[Node], minter: TokenMinter, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = unique_room()
    async with chat(cluster[0], room, minter.token(user_id="writer")) as writer:
        for seq in range(3):
            await writer.say(f"old{seq}")
        await writer.messages(3)
        replay_reads: list[int] = []

        class Counted:
            """chat.service as the sockets' replays see it, their reads counted
            (a feed's own catch-up, on the heartbeat, is not a replay)."""

            def __getattr__(self, name: str) -> Any:
                return getattr(service, name)

            async def messages_after(self, **arguments: Any) -> Any:
                replay_reads.append(arguments["after"])
                return await service.messages_after(**arguments)

        monkeypatch.setattr(endpoint, "service", Counted())
        async with (
            # saw everything: nothing to send
            chat(cluster[1], room, minter.token(), since=3) as current,
            # node-a delivered 1..3 itself: the two missed come from its memory
            chat(cluster[0], room, minter.token(), since=1) as behind_here,
            # node-c's feed started at 3: id 3 is read from PostgreSQL
            chat(cluster[2], room, minter.token(), since=2) as behind_there,
        ):
            assert {current.ready["last_id"], behind_here.ready["last_id"]} == {3}
            assert behind_there.ready["last_id"] == 3
            missed_here = await behind_here.messages(2)
            (missed_there,) = await behind_there.messages(1)
            await writer.say("new")
            (live,) = await current.messages(1)
            (live_here,) = await behind_here.messages(1)
            (live_there,) = await behind_there.messages(1)
    assert replay_reads == [2]  # only the socket behind on node-c read stored messages
    assert [frame["id"] for frame in missed_here] == [2, 3]
    assert [frame["text"] for frame in missed_here] == ["old1", "old2"]
    assert missed_there["id"] == 3
    assert live["id"] == live_here["id"] == live_there["id"] == 4


async def test_an_open_socket_keeps_none_of_its_handshake_headers(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    async with chat(cluster[0], room, minter.token(user_id="holder")) as client:
        await client.say("hello")
        (echoed,) = await client.messages(1)
        # the socket still speaks for its user, but its bearer token and the
        # rest of the upgrade's headers are gone from the server's memory
        (held,) = [
            conn for conn in gc.get_objects() if type(conn) is Connection and conn.room == room
        ]
        assert held.user_id == "holder"
        assert held.websocket.scope["headers"] == []
        assert held.websocket.headers.get("authorization") is None
    assert echoed["user"]["id"] == "holder"
