"""`/healthz` (the process answers) and `/readyz` (it can serve its core traffic).

Readiness has two kinds of checks:

- `checks`: what the service's core traffic cannot do without (catalog's
  database, chat's database and bus). One failing makes `/readyz` a 503
  problem, and load balancers and the gateway stop sending traffic here.
- `optional`: what only some requests need (Redis for revocations, auth for
  new keys). Reported, never failing readiness: those requests answer 503
  with `Retry-After` themselves, and everything else keeps being served. The
  status then reads `degraded`. Optional checks only read state the process
  already holds, so a frozen dependency never slows the probe down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kit.errors import problem_response
from kit.security import JwksKeySource

ReadinessCheck = Callable[[Request], Awaitable[None]]
CHECK_TIMEOUT_SECONDS = 2.0
OPTIONAL_CHECK_TIMEOUT_SECONDS = 0.5


class Degraded(Exception):
    """Raised by a check to report a degraded state in its own words."""


async def _run_check(check: ReadinessCheck, request: Request, within: float) -> str:
    try:
        await asyncio.wait_for(check(request), within)
    except Degraded as state:
        return str(state)[:200]
    except Exception as error:  # noqa: BLE001 - a probe reports any failure, it never raises
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return f"failed: {reason}"[:200]
    return "ok"


async def _run_all(
    checks: Mapping[str, ReadinessCheck], request: Request, within: float
) -> dict[str, str]:
    names = list(checks)
    results = await asyncio.gather(*(_run_check(checks[name], request, within) for name in names))
    return dict(zip(names, results, strict=True))


def health_router(
    checks: Mapping[str, ReadinessCheck],
    *,
    optional: Mapping[str, ReadinessCheck] | None = None,
) -> APIRouter:
    router = APIRouter(tags=["health"])
    optional = dict(optional or {})

    @router.get("/healthz", summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="The service can serve its core traffic", response_model=None)
    async def readyz(request: Request) -> dict[str, Any] | JSONResponse:
        required, extra = await asyncio.gather(
            _run_all(checks, request, CHECK_TIMEOUT_SECONDS),
            _run_all(optional, request, OPTIONAL_CHECK_TIMEOUT_SECONDS),
        )
        body: dict[str, Any] = {"checks": required}
        if extra:
            body["optional"] = extra
        if all(result == "ok" for result in required.values()):
            degraded = any(result != "ok" for result in extra.values())
            return {"status": "degraded" if degraded else "ok", **body}
        return problem_response(
            status=503,
            title="Service unavailable",
            slug="not-ready",
            detail="A dependency of this service's core traffic is not reachable",
            headers={"Retry-After": "1"},
            **body,
        )

    return router


async def check_redis(request: Request) -> None:
    await request.state.redis.ping()


async def check_keys(request: Request) -> None:
    """The key set: fetched from auth on schedule, or what is wrong (optional)."""
    keys = request.state.verifier.keys
    if isinstance(keys, JwksKeySource) and not keys.answered:
        raise Degraded(keys.describe())


async def check_revocations(request: Request) -> None:
    """How revocations are being answered (optional): fine while Redis answers."""
    status: str = await request.state.verifier.revocations_status()
    if not status.startswith("ok"):
        raise Degraded(status)


VERIFIER_CHECKS: Mapping[str, ReadinessCheck] = {
    "keys": check_keys,
    "revocations": check_revocations,
}
"""The optional checks of every service that verifies tokens with auth's JWKS."""
