"""Hostile input through the gateway: generated requests for every operation
of the merged OpenAPI document, oversized bodies and oversized frames.
Nothing may answer 5xx, and every answer must match the documented schema."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .conftest import Stack
from .helpers import login, open_socket, receive_json, register

merged = schemathesis.pytest.from_fixture("merged_schema")


@pytest.fixture(scope="module")
def merged_schema(stack: Stack) -> Any:
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    # Logging out would revoke the token the rest of the run uses; it has its own tests.
    return schema.exclude(method="POST", path="/auth/logout")


@pytest.fixture(scope="module")
def user_headers(stack: Stack) -> dict[str, str]:
    import asyncio

    async def token() -> str:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=20) as http:
            user = await register(http)
            return str((await login(http, user["email"], user["password"]))["access_token"])

    return {"Authorization": f"Bearer {asyncio.run(token())}"}


@merged.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_generated_requests_get_no_server_error(
    case: Any, stack: Stack, user_headers: dict[str, str]
) -> None:
    case.call_and_validate(
        base_url=stack.base_url,
        headers=user_headers,
        checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
        timeout=20,
    )


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
        assert (await receive_json(socket))["type"] == "error"
        await socket.send(json.dumps({"type": "message", "text": "x" * 4001}))
        assert (await receive_json(socket))["type"] == "error"
        await socket.send(json.dumps({"type": "message", "text": "still open"}))
        frame = await receive_json(socket)
        while frame["type"] != "message":
            frame = await receive_json(socket)
        assert frame["text"] == "still open"

        await socket.send("x" * (2 * 1024 * 1024))
        assert await close_code(socket) in (1009, 1008)
    finally:
        await socket.close()
