"""Readiness: required checks decide it, optional ones only report."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI, Request

from kit.errors import install_problem_handlers
from kit.health import Degraded, ReadinessCheck, health_router

Client = Callable[[dict[str, ReadinessCheck], dict[str, ReadinessCheck]], httpx.AsyncClient]


async def passes(request: Request) -> None:
    return None


async def fails(request: Request) -> None:
    raise ConnectionRefusedError("connection refused")


async def degraded(request: Request) -> None:
    raise Degraded("counted per process")


async def hangs(request: Request) -> None:
    await asyncio.Event().wait()


@pytest.fixture
async def client_for() -> AsyncIterator[Client]:
    clients: list[httpx.AsyncClient] = []

    def make(
        checks: dict[str, ReadinessCheck], optional: dict[str, ReadinessCheck]
    ) -> httpx.AsyncClient:
        app = FastAPI()
        install_problem_handlers(app)
        app.include_router(health_router(checks, optional=optional))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://svc")
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def test_ready_when_every_check_passes(client_for: Client) -> None:
    response = await client_for({"database": passes}, {"keys": passes}).get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok"},
        "optional": {"keys": "ok"},
    }


async def test_a_failing_optional_check_leaves_the_service_ready_but_degraded(
    client_for: Client,
) -> None:
    client = client_for({"database": passes}, {"redis": fails, "rate_limits": degraded})
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "degraded",
        "checks": {"database": "ok"},
        "optional": {
            "redis": "failed: ConnectionRefusedError: connection refused",
            "rate_limits": "counted per process",
        },
    }


async def test_a_failing_required_check_is_a_503_problem_with_retry_after(
    client_for: Client,
) -> None:
    response = await client_for({"database": fails}, {"keys": passes}).get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    problem = response.json()
    assert problem["type"] == "urn:problem-type:not-ready"
    assert problem["checks"] == {"database": "failed: ConnectionRefusedError: connection refused"}
    assert problem["optional"] == {"keys": "ok"}


async def test_no_required_check_means_ready_and_a_hanging_optional_one_is_cut_short(
    client_for: Client,
) -> None:
    client = client_for({}, {"redis": hangs})
    async with asyncio.timeout(5):  # the probe answers instead of hanging with the check
        response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "degraded",
        "checks": {},
        "optional": {"redis": "failed: TimeoutError"},
    }
