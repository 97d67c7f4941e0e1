"""Hostile input through the gateway: generated requests for every operation
of the merged OpenAPI document, valid and invalid, NUL bytes included, plus
oversized bodies and frames. Nothing may answer 5xx, and every answer must
match the documented schema and content type.

The generated run is randomised: its seed is printed, and `FUZZ_SEED=<seed>`
replays it. It is bounded in time (`FUZZ_BUDGET_SECONDS`), and split over a
few processes (`fuzzing.py`), since it mostly waits for answers.

Schemathesis's `negative_data_rejection` check is not used: it cannot always
tell that a mutated query value is valid again once written on the wire
(`tag=false` is the string "false", a fine tag), so it fails good answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.core.result import Ok
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .conftest import Stack
from .helpers import login, open_socket, receive_json, receive_of_type, register

FUZZER = Path(__file__).with_name("fuzzing.py")
EXAMPLES_PER_OPERATION = 100
PROCESSES = 3
# ~4,000 requests, about two minutes on this 2-core machine when it is busy;
# the bound fails a run that has slowed down pathologically instead of waiting on it
BUDGET_SECONDS = float(os.environ.get("FUZZ_BUDGET_SECONDS", "480"))


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


def fuzz_seed() -> int:
    chosen = os.environ.get("FUZZ_SEED")
    value = int(chosen) if chosen else random.SystemRandom().randrange(2**32)
    print(f"\ngenerated requests: seed {value} (replay with FUZZ_SEED={value})")  # noqa: T201
    return value


async def fuzz(job: dict[str, object]) -> dict[str, dict[str, object]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(FUZZER),
        json.dumps(job),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(BUDGET_SECONDS + 60):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, err.decode(errors="replace")[-3000:]
    result: dict[str, dict[str, object]] = json.loads(out)
    return result


def warnings_logged(stack: Stack, last: int = 40) -> list[str]:
    """The services' last WARNING and ERROR lines: what a 5xx's cause logged."""
    marks = ('"WARNING"', '"ERROR"', "WARNING:", "ERROR:")  # kit's JSON lines, uvicorn's own
    lines = [line for line in stack.service_logs() if any(mark in line for mark in marks)]
    return lines[-last:]


async def test_generated_requests_get_no_server_error(
    stack: Stack, user_headers: dict[str, str]
) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    labels = []
    for loaded in schema.get_all_operations():
        assert isinstance(loaded, Ok), loaded  # the merged document must parse whole
        # logging out would revoke the token the rest of the run uses; it has its own tests
        if loaded.ok().label != "POST /auth/logout":
            labels.append(loaded.ok().label)
    assert len(labels) >= 15
    job = {
        "base_url": stack.base_url,
        "headers": user_headers,
        "seed": fuzz_seed(),
        "examples": EXAMPLES_PER_OPERATION,
        "deadline": time.time() + BUDGET_SECONDS,
    }
    shares = [labels[index::PROCESSES] for index in range(PROCESSES)]
    results = await asyncio.gather(*(fuzz({**job, "labels": share}) for share in shares))
    examples: dict[str, object] = {}
    failures: dict[str, object] = {}
    for result in results:
        examples.update(result["examples"])
        failures.update(result["failures"])

    print(f"examples per operation and mode: {examples}")  # noqa: T201
    assert failures == {}, (failures, warnings_logged(stack))
    assert len(examples) == 2 * len(labels)
    for label in labels:
        positive, negative = examples[f"{label} (positive)"], examples[f"{label} (negative)"]
        assert isinstance(positive, int)
        assert isinstance(negative, int)
        if positive > 1:  # an operation with input to vary
            assert min(positive, negative) >= EXAMPLES_PER_OPERATION, (label, positive, negative)


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
        await socket.send(json.dumps({"type": "message", "text": "nul \u0000 inside"}))
        nul = await receive_of_type(socket, "error")
        assert nul["errors"][0]["loc"] == ["text"]
        await socket.send(json.dumps({"type": "message", "text": "still open"}))
        assert (await receive_of_type(socket, "message"))["text"] == "still open"

        # The server may close the socket before the whole frame is written;
        # then the send itself ends with the close.
        with contextlib.suppress(ConnectionClosed):
            await socket.send("x" * (2 * 1024 * 1024))
        assert await close_code(socket) == 1009
    finally:
        await socket.close()
