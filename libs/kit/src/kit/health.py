"""`/healthz` (the process answers) and `/readyz` (its dependencies answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kit.errors import problem_response

ReadinessCheck = Callable[[Request], Awaitable[None]]
CHECK_TIMEOUT_SECONDS = 2.0


async def _run_check(check: ReadinessCheck, request: Request) -> str:
    try:
        await asyncio.wait_for(check(request), CHECK_TIMEOUT_SECONDS)
    except Exception as error:  # noqa: BLE001 - a probe reports any failure, it never raises
        return f"failed: {type(error).__name__}: {error}"[:200]
    return "ok"


def health_router(checks: Mapping[str, ReadinessCheck]) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Every dependency answers", response_model=None)
    async def readyz(request: Request) -> dict[str, Any] | JSONResponse:
        names = list(checks)
        results = await asyncio.gather(*(_run_check(checks[name], request) for name in names))
        outcome = dict(zip(names, results, strict=True))
        if all(result == "ok" for result in results):
            return {"status": "ok", "checks": outcome}
        return problem_response(
            status=503,
            title="Service unavailable",
            slug="not-ready",
            detail="A dependency is not reachable",
            checks=outcome,
        )

    return router


async def check_redis(request: Request) -> None:
    await request.state.redis.ping()
