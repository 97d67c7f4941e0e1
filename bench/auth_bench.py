"""Auth benchmark: what authentication costs a request, and what a login costs.

Starts PostgreSQL and Redis (Testcontainers, reached on their container
addresses when this host can, as services reach them under compose) and the
auth app under uvicorn (httptools + uvloop) on loopback, then measures,
interleaved over a few rounds with a closed-loop keep-alive client:

- a trivial public endpoint vs the same endpoint behind a Bearer token (kit's
  `CurrentPrincipal`: ES256 verification and the Redis revocation check),
  both added to the auth app for this run only: the cost of authentication;
- `GET /healthz` and the JWKS (public) vs `GET /auth/users/me` (Bearer plus
  one PostgreSQL read);

and reports rps, p50 and p99 and the ratios authenticated / public (goal
>= 0.8x), and /auth/users/me against /healthz (goal >= 0.5x). Then the p50 of a full login (`POST /auth/token`: throttle check,
argon2id verification at OWASP parameters, refresh-token insert, signing)
against one bare argon2id verification, the p50 of an unknown email's refusal,
and the per-call cost of kit's `TokenVerifier.verify` alone.

The server and the load client are pinned to different cores when
`taskset` is available. Usage:
    uv run python bench/auth_bench.py --json /tmp/auth.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvloop
from argon2 import PasswordHasher
from fastapi import FastAPI
from infra import pinned, postgres_server, redis_server
from redis.asyncio import Redis

from auth.main import create_app
from kit.deps import CurrentPrincipal
from kit.security import TokenVerifier
from kit.settings import DEFAULT_JWT_ISSUER
from kit_testing import (
    free_port,
    migrate,
    wait_for_redis,
)

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
AUTH_DIR = ROOT / "services" / "auth"
CONNECTIONS = 32
SECONDS_PER_RUN = 3.0
WARMUP_SECONDS = 1.0
ROUNDS = 3
LOGINS = 30
EMAIL, PASSWORD = "bench@example.com", "bench password 1"


# --- infrastructure ------------------------------------------------------------


def bench_app() -> FastAPI:
    """The auth app plus a trivial public and a trivial authenticated route."""
    app = create_app()

    @app.get("/bench/public")
    async def public() -> dict[str, Any]:
        return {"user_id": "anonymous", "roles": []}

    @app.get("/bench/whoami")
    async def whoami(principal: CurrentPrincipal) -> dict[str, Any]:
        return {"user_id": principal.user_id, "roles": sorted(principal.roles)}

    return app


@contextlib.asynccontextmanager
async def auth_server(database_url: str, redis_url: str) -> AsyncIterator[str]:
    port = free_port()
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "ADMIN_EMAIL": "admin@example.com",
        "ADMIN_PASSWORD": "admin password 1",
        "LOG_LEVEL": "WARNING",
        # the login loop must not trip the throttle
        "LOGIN_FAILURES_PER_CLIENT": "1000000",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "auth_bench:bench_app",
        "--factory",
        "--app-dir",
        str(BENCH_DIR),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    process = await asyncio.create_subprocess_exec(
        *pinned(command, 1), cwd=AUTH_DIR, env=environment
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                if process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("auth did not become ready")
                await asyncio.sleep(0.1)
        yield base
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 15)


# --- a small closed-loop HTTP/1.1 keep-alive load client ----------------------------


async def _connection(
    host: str, port: int, request: bytes, stop_at: float, latencies: list[float]
) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    errors = 0
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if b" 200 " not in status_line:
                errors += 1
    finally:
        writer.close()
    return errors


async def load(base: str, path: str, headers: dict[str, str], seconds: float) -> dict[str, Any]:
    url = httpx.URL(base)
    host, port = url.host, url.port or 80
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode()
    latencies: list[float] = []
    started = time.perf_counter()
    stop_at = started + seconds
    errors = await asyncio.gather(
        *(_connection(host, port, request, stop_at, latencies) for _ in range(CONNECTIONS))
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "requests": len(latencies),
        "errors": sum(errors),
    }


# --- the measurements ----------------------------------------------------------------


async def throughput(base: str, token: str) -> dict[str, Any]:
    bearer = {"Authorization": f"Bearer {token}"}
    targets = {
        "public trivial": ("/bench/public", {}),
        "bearer trivial": ("/bench/whoami", bearer),
        "public /healthz": ("/healthz", {}),
        "public JWKS": ("/auth/.well-known/jwks.json", {}),
        "bearer /auth/users/me": ("/auth/users/me", bearer),
    }
    for path, headers in targets.values():
        await load(base, path, headers, WARMUP_SECONDS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for _ in range(ROUNDS):  # interleaved, so drift hits every target alike
        for name, (path, headers) in targets.items():
            runs[name].append(await load(base, path, headers, SECONDS_PER_RUN))
    return {
        name: {
            "rps": statistics.median(run["rps"] for run in results),
            "p50_ms": statistics.median(run["p50_ms"] for run in results),
            "p99_ms": statistics.median(run["p99_ms"] for run in results),
            "errors": sum(run["errors"] for run in results),
        }
        for name, results in runs.items()
    }


async def login_cost(base: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=base) as client:
        durations = []
        for _ in range(LOGINS):
            started = time.perf_counter()
            response = await client.post(
                "/auth/token", data={"username": EMAIL, "password": PASSWORD}
            )
            durations.append(time.perf_counter() - started)
            response.raise_for_status()
        unknown = []
        for index in range(LOGINS):
            started = time.perf_counter()
            response = await client.post(
                "/auth/token", data={"username": f"nobody{index}@example.com", "password": "x"}
            )
            unknown.append(time.perf_counter() - started)
            assert response.status_code == 400, response.text  # invalid_grant
    hasher = PasswordHasher(memory_cost=19_456, time_cost=2, parallelism=1)
    hashed = hasher.hash(PASSWORD)
    verifies = []
    for _ in range(LOGINS):
        started = time.perf_counter()
        hasher.verify(hashed, PASSWORD)
        verifies.append(time.perf_counter() - started)
    return {
        "login_p50_ms": 1000 * statistics.median(durations),
        "unknown_email_401_p50_ms": 1000 * statistics.median(unknown),
        "argon2_verify_p50_ms": 1000 * statistics.median(verifies),
    }


async def verify_cost(base: str, token: str, redis_url: str) -> dict[str, float]:
    """kit's verifier alone, in this process, against the live JWKS and Redis."""
    from kit.security import JwksKeySource

    async with httpx.AsyncClient() as http:
        redis = Redis.from_url(redis_url)
        try:
            keys = JwksKeySource(
                f"{base}/auth/.well-known/jwks.json", http=http, algorithms=["ES256"]
            )
            verifier = TokenVerifier(
                keys=keys,
                issuer=DEFAULT_JWT_ISSUER,
                audience="bazaar",
                algorithms=["ES256"],
                redis=None,
            )
            with_redis = TokenVerifier(
                keys=keys,
                issuer=DEFAULT_JWT_ISSUER,
                audience="bazaar",
                algorithms=["ES256"],
                redis=redis,
            )
            await verifier.verify(token)
            calls = 2000
            started = time.perf_counter()
            for _ in range(calls):
                await verifier.verify(token)
            signature_only = (time.perf_counter() - started) / calls
            started = time.perf_counter()
            for _ in range(calls):
                await with_redis.verify(token)
            with_revocation = (time.perf_counter() - started) / calls
        finally:
            await redis.aclose()
    return {
        "verify_us": 1e6 * signature_only,
        "verify_with_redis_check_us": 1e6 * with_revocation,
    }


async def measure(database_url: str, redis_url: str) -> dict[str, Any]:
    await wait_for_redis(redis_url)
    await migrate(AUTH_DIR, database_url)
    async with auth_server(database_url, redis_url) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            registered = await client.post(
                "/auth/register",
                json={"email": EMAIL, "password": PASSWORD, "display_name": "Bench"},
            )
            registered.raise_for_status()
            token_response = await client.post(
                "/auth/token", data={"username": EMAIL, "password": PASSWORD}
            )
            token_response.raise_for_status()
            token = token_response.json()["access_token"]
        figures: dict[str, Any] = {"throughput": await throughput(base, token)}
        figures["login"] = await login_cost(base)
        figures["verifier"] = await verify_cost(base, token, redis_url)
    throughput_figures = figures["throughput"]
    authed = throughput_figures["bearer /auth/users/me"]["rps"]
    figures["ratios"] = {
        "bearer_vs_public_trivial": throughput_figures["bearer trivial"]["rps"]
        / throughput_figures["public trivial"]["rps"],
        "me_vs_healthz": authed / throughput_figures["public /healthz"]["rps"],
        "me_vs_jwks": authed / throughput_figures["public JWKS"]["rps"],
        "login_vs_argon2_verify": figures["login"]["login_p50_ms"]
        / figures["login"]["argon2_verify_p50_ms"],
        "unknown_email_vs_login": figures["login"]["unknown_email_401_p50_ms"]
        / figures["login"]["login_p50_ms"],
    }
    figures["goals"] = {
        "me_vs_healthz": ME_GOAL,
        "me_vs_healthz_met": figures["ratios"]["me_vs_healthz"] >= ME_GOAL,
    }
    figures["setup"] = {
        "server": "uvicorn httptools+uvloop, 1 process, pinned to core 1",
        "database": database_url.split("@", 1)[1],
        "client": f"asyncio closed loop, {CONNECTIONS} keep-alive connections, core 0",
        "seconds_per_run": SECONDS_PER_RUN,
        "rounds": ROUNDS,
    }
    return figures


ME_GOAL = 0.5
"""`/auth/users/me` at least this share of /healthz's rps."""


def report(figures: dict[str, Any]) -> str:
    lines = [f"{'endpoint':<24} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"]
    for name, row in figures["throughput"].items():
        lines.append(
            f"{name:<24} {row['rps']:>8.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}"
            f" {row['errors']:>7}"
        )
    ratios, login, verifier = figures["ratios"], figures["login"], figures["verifier"]
    lines += [
        "",
        (
            f"bearer / public, same trivial route: {ratios['bearer_vs_public_trivial']:.2f}x"
            " (goal >= 0.8x)"
        ),
        (
            f"/auth/users/me (bearer + a PostgreSQL read): {ratios['me_vs_healthz']:.2f}x /healthz, "
            f"{ratios['me_vs_jwks']:.2f}x JWKS"
        ),
        (
            f"goal: /auth/users/me >= {ME_GOAL}x /healthz rps -> {ratios['me_vs_healthz']:.2f}x, "
            f"{'met' if figures['goals']['me_vs_healthz_met'] else 'NOT met'}"
        ),
        (
            f"login p50 {login['login_p50_ms']:.1f} ms vs one argon2id verify "
            f"{login['argon2_verify_p50_ms']:.1f} ms: {ratios['login_vs_argon2_verify']:.2f}x"
        ),
        (
            f"unknown-email 401 p50 {login['unknown_email_401_p50_ms']:.1f} ms: "
            f"{ratios['unknown_email_vs_login']:.2f}x a successful login"
        ),
        (
            f"kit TokenVerifier.verify: {verifier['verify_us']:.0f} us, "
            f"{verifier['verify_with_redis_check_us']:.0f} us with the Redis revocation check"
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    with postgres_server() as server, redis_server() as redis_url:
        database_url = f"{server}/auth"
        figures = uvloop.run(measure(database_url, redis_url))
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
