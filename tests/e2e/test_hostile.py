"""Hostile input through the gateway: generated requests for every operation
of the merged OpenAPI document, oversized bodies and oversized frames.
Nothing may answer 5xx, and every answer must match the documented schema."""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .conftest import Stack
from .helpers import login, open_socket, receive_json, receive_of_type, register

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
EXAMPLES_PER_OPERATION = 12


@pytest.fixture(scope="module")
def user_headers(stack: Stack) -> dict[str, str]:
    with httpx.Client(base_url=stack.base_url, timeout=20) as http:
        email = f"fuzz-{uuid.uuid4().hex[:10]}@example.com"
        password = "a-long-password"
        registered = http.post(
            "/auth/register",
            json={"email": email, "password": password, "display_name": "Fuzz"},
        )
        assert registered.status_code == 201, registered.text
        tokens = http.post("/auth/token", data={"username": email, "password": password})
        return {"Authorization": f"Bearer {tokens.json()['access_token']}"}


def test_generated_requests_get_no_server_error(stack: Stack, user_headers: dict[str, str]) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    # Logging out would revoke the token the rest of the run uses; it has its own tests.
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the merged document must parse whole
        if result.ok().label != "POST /auth/logout":
            operations.append(result.ok())
    assert len(operations) >= 15
    failures: dict[str, str] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def probe(case: Any) -> None:
            case.call_and_validate(
                base_url=stack.base_url, headers=user_headers, checks=CHECKS, timeout=20
            )

        try:
            probe()
        except Exception as error:  # noqa: BLE001 - every operation's failure is collected
            failures[operation.label] = str(error)[:2000]

    assert failures == {}


async def close_code(socket: ClientConnection) -> int | None:
    """Reads until the server closes the socket; returns the close code it sent."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await receive_json(socket)
    return socket.close_code


async def test_oversized_body_is_refused_cleanly(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/auth/register",
        content=b'{"email": "' + b"a" * (4 * 1024 * 1024) + b'"}',
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_oversized_and_malformed_frames_are_refused(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    token = (await login(client, user["email"], user["password"]))["access_token"]
    socket = await open_socket(stack.ws_url, "hostile", token)
    try:
        assert (await receive_json(socket))["type"] == "ready"
        await socket.send("this is not json")
        assert (await receive_of_type(socket, "error"))["detail"]
        await socket.send(json.dumps({"type": "message", "text": "x" * 4001}))
        assert (await receive_of_type(socket, "error"))["detail"]
        await socket.send(json.dumps({"type": "message", "text": "y" * 65_536}))
        assert (await receive_of_type(socket, "error"))["detail"]
        await socket.send(json.dumps({"type": "message", "text": "still open"}))
        assert (await receive_of_type(socket, "message"))["text"] == "still open"

        await socket.send("x" * (2 * 1024 * 1024))
        assert await close_code(socket) == 1009
    finally:
        await socket.close()
