from __future__ import annotations

import asyncpg
import httpx
from fastapi import FastAPI

from kit.app import assemble
from kit.errors import NotFound, is_outage
from kit.settings import ServiceSettings


class AdminShutdownError(Exception):
    """Named like the driver's error for "terminating connection due to administrator command"."""


class WrappedDatabaseError(Exception):
    def __init__(self, orig: BaseException) -> None:
        super().__init__("wrapped")
        self.orig = orig


def error_app() -> FastAPI:
    app = FastAPI()
    assemble(app, ServiceSettings(), readiness={})

    @app.get("/missing")
    async def missing() -> None:
        raise NotFound("No such thing")

    @app.get("/refused")
    async def refused() -> None:
        raise ConnectionRefusedError("connect failed")

    @app.get("/restarting")
    async def restarting() -> None:
        raise WrappedDatabaseError(AdminShutdownError("terminating connection"))

    @app.get("/out-of-range")
    async def out_of_range() -> None:
        # what the server answers a statement run on asyncpg itself, as the
        # point reads are, with a value its column cannot hold
        raise asyncpg.exceptions.NumericValueOutOfRangeError("numeric field overflow")

    @app.get("/unencodable")
    async def unencodable() -> None:
        raise asyncpg.exceptions._base.DataError("invalid input for query argument $1")

    @app.get("/bug")
    async def bug() -> None:
        raise ValueError("a bug")

    return app


def client() -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=error_app(), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_domain_error_is_a_problem_naming_the_request() -> None:
    async with client() as http:
        response = await http.get("/missing", headers={"X-Request-ID": "req-1"})

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": "urn:problem-type:not-found",
        "title": "Not found",
        "status": 404,
        "detail": "No such thing",
        "instance": "req-1",
    }


async def test_lost_connections_answer_503_with_retry_after() -> None:
    async with client() as http:
        for path in ("/refused", "/restarting"):
            response = await http.get(path, headers={"X-Request-ID": "req-2"})

            assert response.status_code == 503, path
            assert response.headers["retry-after"] == "1"
            assert response.json()["instance"] == "req-2"


async def test_driver_errors_are_answered_inside_the_middleware_stack() -> None:
    async with client() as http:
        response = await http.get("/refused", headers={"X-Request-ID": "req-4"})

    assert response.status_code == 503
    assert response.headers["x-request-id"] == "req-4"
    assert float(response.headers["x-process-time"]) >= 0


async def test_a_value_the_driver_or_server_refuses_is_422_inside_the_middleware_stack() -> None:
    async with client() as http:
        for path in ("/out-of-range", "/unencodable"):
            response = await http.get(path, headers={"X-Request-ID": "req-5"})

            assert response.status_code == 422, path
            assert response.json()["errors"][0]["type"] == "value_refused"
            assert response.headers["x-request-id"] == "req-5"
            assert float(response.headers["x-process-time"]) >= 0
            assert "overflow" not in response.text


async def test_a_bug_is_a_500_that_reveals_nothing_but_the_request_id() -> None:
    async with client() as http:
        response = await http.get("/bug", headers={"X-Request-ID": "req-3"})

    assert response.status_code == 500
    assert response.json()["instance"] == "req-3"
    assert "a bug" not in response.text


def test_outage_detection_follows_wrapped_causes() -> None:
    assert is_outage(WrappedDatabaseError(AdminShutdownError()))
    assert is_outage(TimeoutError())
    # the driver's protocol out of step after the server dropped an idle connection
    assert is_outage(WrappedDatabaseError(asyncpg.exceptions.InternalClientError("state")))
    # PostgreSQL rolled the transaction back to untangle it from another: retry
    assert is_outage(WrappedDatabaseError(asyncpg.exceptions.DeadlockDetectedError("deadlock")))
    assert is_outage(WrappedDatabaseError(asyncpg.exceptions.SerializationError("serialize")))
    # the statement timeout (57014): cancelled, rolled back, worth a retry
    assert is_outage(WrappedDatabaseError(asyncpg.QueryCanceledError("statement timeout")))
    assert not is_outage(WrappedDatabaseError(ValueError()))
    assert not is_outage(KeyError("x"))
