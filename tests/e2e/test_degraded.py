"""One dependency stopped for 30 s while clients keep working through the
gateway (the README's "dependency down" table): what needs it answers 503 with
`Retry-After`, everything else goes on, and nothing is lost once it is back.

Each test stops a dependency with `docker compose stop`, drives clients for the
whole outage, starts it again, and only then asserts, so a failure shows the
whole picture. The stack runs with REVOCATION_MAX_STALENESS_SECONDS=10
(compose.e2e.yaml), so the Redis outage shows both sides of that policy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx
from websockets.asyncio.client import ClientConnection

from kit_testing import TokenMinter

from .chat_client import ChatClient, assert_complete, wait_until
from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Stack
from .helpers import bearer, login, open_socket, receive_json, receive_of_type, register

OUTAGE_SECONDS = 30.0
# REVOCATION_MAX_STALENESS_SECONDS in compose.e2e.yaml
REVOCATION_STALENESS_SECONDS = 10.0
# one simulated client's pace: a request, then this long before the next
PACE_SECONDS = 0.25
# a 503 "at once" arrives well before the gateway's 10 s upstream timeout (504)
QUICK_ANSWER_SECONDS = 5.0
BACK_WITHIN_SECONDS = 10.0
RECOVERY_DEADLINE_SECONDS = 45.0


@dataclass(frozen=True)
class Answer:
    """One response, and when its request was sent, in seconds after the outage began."""

    at: float
    status: int
    retry_after: str | None
    detail: str

    @classmethod
    def of(cls, response: httpx.Response, at: float) -> Answer:
        detail = ""
        if response.status_code >= 400:
            with contextlib.suppress(ValueError):
                detail = str(response.json().get("detail", ""))
        return cls(at, response.status_code, response.headers.get("retry-after"), detail)

    @property
    def retry_hint(self) -> bool:
        return self.retry_after is not None and int(self.retry_after) >= 1


@dataclass(frozen=True)
class Outage:
    """When the dependency was asked to stop, when it had stopped, and until when
    clients keep working before it is started again (all `time.monotonic()`)."""

    stopping_at: float
    stopped_at: float
    seconds: float = OUTAGE_SECONDS

    @property
    def until(self) -> float:
        return self.stopped_at + self.seconds


@contextlib.asynccontextmanager
async def stopped(stack: Stack, service: str) -> AsyncIterator[Outage]:
    stopping_at = time.monotonic()
    await asyncio.to_thread(stack.compose_cmd, "stop", service)
    try:
        yield Outage(stopping_at, time.monotonic())
    finally:
        await asyncio.to_thread(stack.compose_cmd, "start", service)


async def keep_calling(
    call: Callable[[], Awaitable[httpx.Response]],
    outage: Outage,
    *,
    within: float = QUICK_ANSWER_SECONDS,
    pace: float = PACE_SECONDS,
) -> list[Answer]:
    """One client repeating `call` until the outage ends; every answer must come
    `within` seconds (no request hangs on the missing dependency)."""
    answers: list[Answer] = []
    while time.monotonic() < outage.until:
        sent = time.monotonic()
        async with asyncio.timeout(within):
            response = await call()
        answers.append(Answer.of(response, sent - outage.stopped_at))
        await asyncio.sleep(pace)  # the client's pace, not a wait for a condition
    return answers


async def until_answers(
    call: Callable[[], Awaitable[httpx.Response]],
    expected: int,
    *,
    within: float = RECOVERY_DEADLINE_SECONDS,
    what: str,
) -> httpx.Response:
    """Repeats `call` until it answers `expected`; only a 5xx may come meanwhile."""
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(httpx.TransportError):
            response = await call()
            if response.status_code == expected:
                return response
            assert response.status_code >= 500, (what, response.status_code, response.text)
        assert time.monotonic() < deadline, f"{what}: no {expected} within {within:g} s"
        await asyncio.sleep(PACE_SECONDS)  # retry interval while the dependency comes back


def letters() -> str:
    return "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:10])


async def create_product(client: httpx.AsyncClient, admin: dict[str, str]) -> httpx.Response:
    return await client.post(
        "/catalog/products", json={"name": f"Degraded {letters()}", "price": "4.5"}, headers=admin
    )


class Cast(NamedTuple):
    """Who and what an outage test works with, made while everything is up."""

    admin: dict[str, str]  # the admin's Authorization header
    user: dict[str, str]  # a registered user's email and password
    token: str  # the user's access token
    product: dict[str, Any]  # a product the admin created


async def cast(client: httpx.AsyncClient) -> Cast:
    admin = bearer((await login(client, ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    product = await create_product(client, admin)
    assert product.status_code == 201, product.text
    return Cast(admin, user, token, product.json())


async def resend_until_stored(
    socket: ClientConnection, text: str, client_id: str
) -> dict[str, Any]:
    """Sends a message until it is stored (the error frame says "try again": a
    client sends the same client_id again); returns its message frame."""
    while True:
        await socket.send(json.dumps({"type": "message", "text": text, "client_id": client_id}))
        frame = await receive_json(socket)
        while frame["type"] == "presence":
            frame = await receive_json(socket)
        if frame["type"] == "message":
            return frame
        await asyncio.sleep(PACE_SECONDS)  # before re-sending


def summary(answers: list[Answer]) -> list[tuple[float, int, str | None, str]]:
    return [(round(a.at, 1), a.status, a.retry_after, a.detail) for a in answers]


def unexpected(answers: list[Answer], expected: Callable[[Answer], bool]) -> list[Answer]:
    """The answers that are not as expected, for an assertion's message."""
    return [a for a in answers if not expected(a)]


def retry_later(answer: Answer) -> bool:
    return answer.status == 503 and answer.retry_hint


def revocations_unreachable(answer: Answer) -> bool:
    return retry_later(answer) and answer.detail == "Token revocation list is unreachable; retry"


# --- Redis ----------------------------------------------------------------------


async def connect_chat(stack: Stack, token: str, room: str, count: int) -> list[ChatClient]:
    clients = [ChatClient(stack.ws_url, room, token, name=f"c{index}") for index in range(count)]
    for chat in clients:
        await chat.connect()
    return clients


def texts(chat: ChatClient) -> set[str]:
    return {message["text"] for message in chat.messages}


def has(chat: ChatClient, text: str) -> Callable[[], bool]:
    return lambda: text in texts(chat)


def closes_of(chat: ChatClient, text: str) -> Callable[[], str]:
    return lambda: f"{text} on {chat.name} (nodes {chat.nodes}, close codes {chat.close_codes})"


async def talk_while_redis_is_down(
    pair: tuple[ChatClient, ChatClient], elsewhere: ChatClient, sent: set[str], outage: Outage
) -> int:
    """The two sockets on one replica keep talking, round after round, for the
    whole outage; the socket on another replica keeps sending. Returns the rounds."""
    rounds = 0
    while time.monotonic() < outage.until - 3:
        for sender, receiver in (pair, pair[::-1]):
            text = f"down-{sender.name}-{rounds}"
            sent.add(text)
            await sender.send(text)
            # same replica: stored, then delivered without the bus
            await wait_until(has(receiver, text), within=10, what=closes_of(receiver, text))
        text = f"down-{elsewhere.name}-{rounds}"
        sent.add(text)
        await elsewhere.send(text)
        await wait_until(has(elsewhere, text), within=10, what=closes_of(elsewhere, text))
        rounds += 1
        await asyncio.sleep(2)  # the next round, later in the outage
    return rounds


async def test_redis_stopped_reads_chat_and_logins_go_on_and_nothing_is_lost(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    stack = healthy_stack
    admin, user, token, product = await cast(client)
    product_path = f"/catalog/products/{product['id']}"

    clients = await connect_chat(stack, token, f"redis-down-{letters()}", 4)
    readers = [asyncio.create_task(chat.run()) for chat in clients]
    try:
        by_node: dict[str, list[ChatClient]] = {}
        for chat in clients:
            by_node.setdefault(chat.node, []).append(chat)
        pair = next(group for group in by_node.values() if len(group) >= 2)[:2]
        elsewhere = next(chat for chat in clients if chat.node != pair[0].node)
        sent = {"before"}
        await clients[0].send("before")
        await wait_until(lambda: all("before" in texts(c) for c in clients), what="before")

        async with stopped(stack, "redis") as outage:
            public, listed, me, writes, logins, rounds = await asyncio.gather(
                keep_calling(lambda: client.get(product_path), outage),
                keep_calling(lambda: client.get("/catalog/products?limit=5"), outage),
                keep_calling(lambda: client.get("/auth/users/me", headers=bearer(token)), outage),
                keep_calling(lambda: create_product(client, admin), outage, pace=1.0),
                keep_calling(
                    lambda: client.post(
                        "/auth/token",
                        data={"username": user["email"], "password": user["password"]},
                    ),
                    outage,
                    pace=1.0,
                ),
                talk_while_redis_is_down((pair[0], pair[1]), elsewhere, sent, outage),
            )

        # back: the revocation list answers again, and the bus fills every gap
        await until_answers(
            lambda: client.get("/auth/users/me", headers=bearer(token)), 200, what="me after"
        )
        after = await until_answers(
            lambda: client.post(
                "/auth/token", data={"username": user["email"], "password": user["password"]}
            ),
            200,
            what="login after",
        )
        await clients[1].send("after")
        sent.add("after")
        await wait_until(
            lambda: all(sent <= texts(c) for c in clients),
            within=RECOVERY_DEADLINE_SECONDS,
            what=lambda: f"everything everywhere: {[(c.name, sent - texts(c)) for c in clients]}",
        )
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(chat.close() for chat in clients), return_exceptions=True)

    # public reads never depend on Redis
    assert not (wrong := unexpected(public + listed, lambda a: a.status == 200)), summary(wrong)
    # authenticated requests: served from each process's last copy of the
    # revocation list for REVOCATION_MAX_STALENESS_SECONDS, then 503 + Retry-After
    served_window = REVOCATION_STALENESS_SECONDS - (outage.stopped_at - outage.stopping_at) - 1
    for answers, ok in ((me, 200), (writes, 201)):
        early = [a for a in answers if a.at < served_window]
        late = [a for a in answers if a.at > REVOCATION_STALENESS_SECONDS + 1]
        assert early, summary(answers)
        assert late, summary(answers)
        assert not (wrong := [a for a in early if a.status != ok]), summary(wrong)
        assert not (wrong := unexpected(late, revocations_unreachable)), summary(wrong)
        assert {a.status for a in answers} <= {ok, 503}, summary(answers)
    # chat: the two sockets on one replica talked for the whole outage, no socket
    # closed, and every message reached every client once, in order, after it
    assert rounds >= 3
    assert all(chat.close_codes == [] for chat in clients), [c.close_codes for c in clients]
    assert_complete(clients, sent)
    assert after.json()["access_token"]
    # logins go on under the per-replica login throttle (auth README)
    assert not (wrong := unexpected(logins, lambda a: a.status == 200)), summary(wrong)


# --- auth -----------------------------------------------------------------------


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout


def new_container(stack: Stack, service: str, before: set[str]) -> str:
    (started,) = [row["ID"] for row in stack.containers(service) if row["ID"] not in before]
    return started


_POST_PRODUCT = """
import json, os, sys, urllib.error, urllib.request
request = urllib.request.Request(
    "http://127.0.0.1:8000/catalog/products",
    data=json.dumps({"name": os.environ["NAME"], "price": "1"}).encode(),
    headers={"authorization": os.environ["AUTHORIZATION"], "content-type": "application/json"},
)
try:
    print(urllib.request.urlopen(request, timeout=10).status)
except urllib.error.HTTPError as error:
    print(error.code, error.read().decode())
"""


async def write_on_replica(container: str, admin: dict[str, str]) -> str:
    """A catalog write sent straight to one replica, from inside its container."""
    return await asyncio.to_thread(
        docker,
        "exec",
        "-e",
        f"AUTHORIZATION={admin['Authorization']}",
        "-e",
        f"NAME=Late Replica {letters()}",
        container,
        "python",
        "-c",
        _POST_PRODUCT,
    )


async def chat_on_node(stack: Stack, token: str, node: str) -> dict[str, object]:
    """Connects through the gateway until a socket lands on `node`, says something
    there and returns the echo (the new replica verified the token itself)."""
    deadline = time.monotonic() + RECOVERY_DEADLINE_SECONDS
    room = f"late-{letters()}"
    while True:
        with contextlib.suppress(OSError, TimeoutError):
            socket = await open_socket(stack.ws_url, room, token)
            try:
                ready = await receive_json(socket)
                if ready["node"] == node:
                    await socket.send(
                        json.dumps({"type": "message", "text": "from a late replica"})
                    )
                    return await receive_of_type(socket, "message")
            finally:
                await socket.close()
        assert time.monotonic() < deadline, f"no socket reached the new chat replica {node}"
        await asyncio.sleep(PACE_SECONDS)  # the gateway picks the new replica up by DNS


async def test_auth_stopped_valid_tokens_keep_working_even_on_replicas_started_meanwhile(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    stack = healthy_stack
    admin = bearer((await login(client, ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    forged = bearer(TokenMinter().token(roles=("admin",)))  # a key auth never published
    catalog_before = {row["ID"] for row in stack.containers("catalog")}
    chat_before = {row["ID"] for row in stack.containers("chat")}
    talker = ChatClient(stack.ws_url, f"auth-down-{letters()}", token, name="talker")
    await talker.connect()
    reader = asyncio.create_task(talker.run())

    async def scale_up_then_use_the_new_replicas() -> tuple[str, dict[str, object], Answer]:
        await asyncio.to_thread(
            stack.compose_cmd,
            "up",
            "--detach",
            "--wait",
            "--no-deps",
            # the running replicas stay as they are (--no-deps alone recreates them)
            "--no-recreate",
            "--scale",
            "catalog=3",
            "--scale",
            "chat=4",
            "catalog",
            "chat",
        )
        written = await write_on_replica(new_container(stack, "catalog", catalog_before), admin)
        echoed = await chat_on_node(stack, token, new_container(stack, "chat", chat_before))
        unknown = await client.get("/catalog/products?limit=1", headers=forged)
        return written, echoed, Answer.of(unknown, 0)

    async def keep_chatting(outage: Outage) -> int:
        said = 0
        while time.monotonic() < outage.until:
            text = f"auth-down-{said}"
            await talker.send(text)
            await wait_until(has(talker, text), within=10, what=closes_of(talker, text))
            said += 1
            await asyncio.sleep(1)  # the client's pace
        return said

    try:
        async with stopped(stack, "auth") as outage:
            writes, me, (written, echoed, unknown), said = await asyncio.gather(
                keep_calling(lambda: create_product(client, admin), outage, pace=0.5),
                keep_calling(lambda: client.get("/auth/users/me", headers=bearer(token)), outage),
                scale_up_then_use_the_new_replicas(),
                keep_chatting(outage),
            )
            late = time.monotonic() - outage.stopped_at
        # auth answers again: a key it never published is a 401 once more
        refused = await until_answers(
            lambda: client.get("/catalog/products?limit=1", headers=forged), 401, what="forged"
        )
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await talker.close()

    assert not (wrong := unexpected(writes, lambda a: a.status == 201)), summary(wrong)
    assert written.startswith("201"), written
    assert echoed["text"] == "from a late replica"
    assert said >= 5
    assert talker.close_codes == []
    assert late >= OUTAGE_SECONDS
    # a token naming a key that cannot be fetched right now is "retry", not "log out"
    assert unknown.status == 503, unknown
    assert unknown.retry_hint, unknown
    assert refused.json()["detail"] == "Token signed by an unknown key"
    # a stopped service: 503 with Retry-After at once, never a 502
    assert not (wrong := unexpected(me, retry_later)), summary(wrong)


# --- PostgreSQL -----------------------------------------------------------------


async def postgres_healthy(stack: Stack) -> float:
    """Waits until PostgreSQL's health check passes again; returns that moment."""
    deadline = time.monotonic() + RECOVERY_DEADLINE_SECONDS
    while stack.containers("postgres")[0].get("Health") != "healthy":
        assert time.monotonic() < deadline, "PostgreSQL did not come back"
        await asyncio.sleep(0.2)  # compose reports health at the check's interval
    return time.monotonic()


async def test_postgres_stopped_reads_answer_503_at_once_and_all_serves_soon_after(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    stack = healthy_stack
    admin, user, token, product = await cast(client)
    product_path = f"/catalog/products/{product['id']}"
    socket = await open_socket(stack.ws_url, f"pg-down-{letters()}", token)
    await receive_of_type(socket, "ready")
    try:
        async with stopped(stack, "postgres") as outage:
            reads, lists = await asyncio.gather(
                keep_calling(lambda: client.get(product_path), outage),
                keep_calling(lambda: client.get("/catalog/products?limit=5"), outage),
            )
            await socket.send(json.dumps({"type": "message", "text": "lost?", "client_id": "a1"}))
            refusal = await receive_of_type(socket, "error")
        back = await postgres_healthy(stack)

        async with asyncio.timeout(BACK_WITHIN_SECONDS):
            await asyncio.gather(
                until_answers(lambda: client.get(product_path), 200, what="read"),
                until_answers(lambda: create_product(client, admin), 201, what="write"),
                until_answers(
                    lambda: client.get("/auth/users/me", headers=bearer(token)), 200, what="me"
                ),
                until_answers(
                    lambda: client.post(
                        "/auth/token",
                        data={"username": user["email"], "password": user["password"]},
                    ),
                    200,
                    what="login",
                ),
                resend_until_stored(socket, "back", "a2"),
            )
        served_after = time.monotonic() - back
    finally:
        await socket.close()

    answers = reads + lists
    assert answers
    # every read answered at once (keep_calling's deadline) with a 503 to retry
    assert not (wrong := unexpected(answers, retry_later)), summary(wrong)
    assert refusal["detail"] == "Message not stored; try again"
    assert served_after < BACK_WITHIN_SECONDS
    # the replicas stay in the gateway's rotation: the 503 is the catalog's own
    database_down = "The database is unreachable; retry"
    assert not (wrong := unexpected(answers, lambda a: a.detail == database_down)), summary(wrong)


# A frozen PostgreSQL (cut off by the network, or stuck) takes connections and
# answers nothing, so its statement timeout cannot fire: the services' command
# timeout (DATABASE_COMMAND_TIMEOUT_SECONDS, 6 s) bounds every wait on it.
FROZEN_SECONDS = 20.0
# the command timeout with room for a busy machine, and still short of the
# gateway's 10 s route timeout: the 503 is the service's own, not a 504
FROZEN_ANSWER_SECONDS = 9.5


@contextlib.asynccontextmanager
async def frozen(stack: Stack, service: str) -> AsyncIterator[Outage]:
    """`service`'s container paused (`docker compose pause`) for the block."""
    pausing_at = time.monotonic()
    await asyncio.to_thread(stack.compose_cmd, "pause", service)
    try:
        yield Outage(pausing_at, time.monotonic(), FROZEN_SECONDS)
    finally:
        await asyncio.to_thread(stack.compose_cmd, "unpause", service)


async def test_postgres_frozen_every_wait_is_bounded_and_all_serves_once_it_answers(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    stack = healthy_stack
    admin, user, token, product = await cast(client)
    product_path = f"/catalog/products/{product['id']}"
    body = {"name": f"Frozen {letters()}", "price": "3.5"}
    once = {**admin, "Idempotency-Key": body["name"]}
    socket = await open_socket(stack.ws_url, f"pg-frozen-{letters()}", token)
    await receive_of_type(socket, "ready")
    try:
        async with frozen(stack, "postgres") as outage:
            calls = (
                lambda: client.get(product_path),
                lambda: client.get("/catalog/products?limit=5"),
                lambda: client.get("/auth/users/me", headers=bearer(token)),
                lambda: client.post("/catalog/products", json=body, headers=once),
            )
            answers = await asyncio.gather(
                *(keep_calling(call, outage, within=FROZEN_ANSWER_SECONDS) for call in calls)
            )
            await socket.send(json.dumps({"type": "message", "text": "lost?", "client_id": "f1"}))
            async with asyncio.timeout(FROZEN_ANSWER_SECONDS):
                refusal = await receive_of_type(socket, "error")

        async with asyncio.timeout(RECOVERY_DEADLINE_SECONDS):
            read, created, me = await asyncio.gather(
                until_answers(lambda: client.get(product_path), 200, what="read"),
                until_answers(
                    lambda: client.post("/catalog/products", json=body, headers=once),
                    201,
                    what="write",
                ),
                until_answers(
                    lambda: client.get("/auth/users/me", headers=bearer(token)), 200, what="me"
                ),
            )
            frame = await resend_until_stored(socket, "lost?", "f1")
        listed = await client.get("/catalog/products", params={"q": body["name"]})
        # Docker marks a paused container unhealthy at once, and healthy again
        # at its next check: the stack is left as it was found
        await postgres_healthy(stack)
    finally:
        await socket.close()

    everything = [answer for each in answers for answer in each]
    assert all(answers)
    # each one a 503 to retry, within the command timeout, never the gateway's 504
    assert not (wrong := unexpected(everything, retry_later)), summary(wrong)
    assert refusal["detail"] == "Message not stored; try again"
    assert read.json() == product
    assert me.json()["email"] == user["email"]
    # the create asked for during the freeze and after it: one product
    assert [item["id"] for item in listed.json()["items"]] == [created.json()["id"]]
    assert (frame["client_id"], frame["text"]) == ("f1", "lost?")
