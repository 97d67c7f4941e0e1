"""Hostile input is a 422 naming the field, whatever route or field it reaches,
and a value the database refuses is a 422, never an outage or a bug."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import asyncpg
import httpx
import pytest
from fastapi import APIRouter, FastAPI, Form, Header, Query, WebSocket
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from kit.app import assemble
from kit.errors import is_data_error, is_outage
from kit.inputs import (
    MAX_JSON_DEPTH,
    MAX_PARAMETER_CHARS,
    integer_text_error,
    json_errors,
)
from kit.settings import ServiceSettings
from kit_testing import serve


class Item(BaseModel):
    name: str
    count: int = 0
    tags: list[str] = []
    extra: dict[str, Any] = {}


def screened_app(engine: AsyncEngine | None = None) -> FastAPI:
    app = FastAPI()
    assemble(app, ServiceSettings(), readiness={})

    @app.get("/things/{name}")
    async def things(
        name: str,
        q: str | None = None,
        after: Annotated[int, Query(ge=0)] = 0,
        pages: Annotated[list[int] | None, Query()] = None,
        x_cursor: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        return {"name": name, "q": q, "after": after}

    @app.post("/items")
    async def items(item: Item) -> dict[str, Any]:
        return item.model_dump()

    @app.post("/form")
    async def form(username: Annotated[str, Form()], password: Annotated[str, Form()]) -> str:
        return username

    @app.websocket("/ws/{room}")
    async def socket(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        await websocket.send_text(room)
        await websocket.close()

    if engine is not None:

        @app.get("/db/text")
        async def db_text(value: Annotated[str, Query()]) -> Any:
            # a route that forgot every check: kit's screen never sees this value
            async with engine.connect() as connection:
                return (await connection.execute(text("SELECT :v"), {"v": value})).scalar()

        @app.post("/db/raw")
        async def db_raw(body: dict[str, Any]) -> Any:
            # the value is decoded by hand, past the screen: the database refuses it
            value = json.loads(body["encoded"])
            async with engine.connect() as connection:
                return (await connection.execute(text("SELECT :v"), {"v": value})).scalar()

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=screened_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def assert_refused(response: httpx.Response, loc: list[Any], kind: str) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "urn:problem-type:validation-failed"
    assert {"loc": loc, "type": kind} in [
        {"loc": found["loc"], "type": found["type"]} for found in body["errors"]
    ], body


async def test_nul_in_a_query_path_or_header_is_refused(client: httpx.AsyncClient) -> None:
    assert_refused(
        await client.get("/things/a", params={"q": "\x00"}), ["query", "q"], "string_nul"
    )
    assert_refused(await client.get("/things/a%00b"), ["path", "name"], "string_nul")
    assert (await client.get("/things/ok", params={"q": "fine"})).status_code == 200


async def test_over_long_parameters_are_refused(client: httpx.AsyncClient) -> None:
    long = "x" * (MAX_PARAMETER_CHARS + 1)
    assert_refused(
        await client.get("/things/a", params={"q": long}), ["query", "q"], "string_too_long"
    )
    response = await client.get("/things/a", headers={"X-Cursor": long})
    assert_refused(response, ["header", "x-cursor"], "string_too_long")


async def test_integers_beyond_64_bits_are_refused_where_an_int_is_declared(
    client: httpx.AsyncClient,
) -> None:
    huge = "99999999999999999999"
    assert_refused(
        await client.get("/things/a", params={"after": huge}),
        ["query", "after"],
        "int_out_of_range",
    )
    response = await client.get("/things/a", params=[("pages", "1"), ("pages", f" {huge}.0 ")])
    assert_refused(response, ["query", "pages"], "int_out_of_range")
    # the same digits are fine text in a text field, and 2^63-1 is a fine int
    assert (await client.get("/things/a", params={"q": huge})).status_code == 200
    assert (await client.get("/things/a", params={"after": str(2**63 - 1)})).status_code == 200


async def test_json_bodies_are_screened_at_every_depth(client: httpx.AsyncClient) -> None:
    nul = await client.post("/items", json={"name": "a", "tags": ["ok", "b\x00"]})
    assert_refused(nul, ["body", "tags", 1], "string_nul")
    key = await client.post("/items", json={"name": "a", "extra": {"k\x00": 1}})
    assert_refused(key, ["body", "extra", "<key>"], "string_nul")
    big = await client.post("/items", json={"name": "a", "count": 2**64})
    assert_refused(big, ["body", "count"], "int_out_of_range")
    surrogate = await client.post(
        "/items",
        content=b'{"name": "\\ud800"}',
        headers={"content-type": "application/json"},
    )
    assert_refused(surrogate, ["body", "name"], "string_surrogate")
    nan = await client.post(
        "/items",
        content=b'{"name": "a", "count": NaN}',
        headers={"content-type": "application/json"},
    )
    assert_refused(nan, ["body", "count"], "number_not_finite")
    deep: Any = "bottom"
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = {"d": deep}
    nested = await client.post("/items", json={"name": "a", "extra": deep})
    assert nested.status_code == 422
    assert nested.json()["errors"][0]["type"] == "json_too_deep"
    fine = await client.post("/items", json={"name": "a", "count": 2**63 - 1, "tags": ["\t"]})
    assert fine.status_code == 200


async def test_form_fields_are_screened(client: httpx.AsyncClient) -> None:
    response = await client.post("/form", data={"username": "a\x00", "password": "p"})
    assert_refused(response, ["body", "username"], "string_nul")
    assert (await client.post("/form", data={"username": "a", "password": "p"})).status_code == 200


async def test_a_websocket_handshake_is_screened_too() -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async with serve(screened_app()) as base_url:
        ws_url = base_url.replace("http://", "ws://")
        async with connect(f"{ws_url}/ws/lobby") as socket:
            assert await socket.recv() == "lobby"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{ws_url}/ws/lob%00by"):
                pass
    assert refused.value.response.status_code == 422
    assert b"string_nul" in refused.value.response.body


async def test_routes_included_after_assembly_are_screened_and_earlier_ones_refused() -> None:
    router = APIRouter(prefix="/included")

    @router.get("/{name}")
    async def included(name: str) -> str:
        return name

    app = FastAPI()
    assemble(app, ServiceSettings(), readiness={})
    app.include_router(router)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        refused = await http.get("/included/a%00b")
    assert_refused(refused, ["path", "name"], "string_nul")

    late = FastAPI()
    late.include_router(router)
    with pytest.raises(RuntimeError, match="before any route is added"):
        assemble(late, ServiceSettings(), readiness={})


def test_integer_text_follows_what_pydantic_reads_as_an_integer() -> None:
    assert integer_text_error("9223372036854775807") is None
    assert integer_text_error("-9223372036854775808") is None
    assert integer_text_error("9223372036854775808") is not None
    assert integer_text_error("9_223_372_036_854_775_808") is not None
    assert integer_text_error("0" * 30 + "1") is None
    assert integer_text_error("9" * 5000) is not None
    assert integer_text_error("not a number") is None


def test_json_errors_locate_every_problem() -> None:
    found = json_errors({"a": ["\x00", 1.5, float("inf")], "b": {"c": -(2**63) - 1}}, ("frame",))
    assert sorted((tuple(e["loc"]), e["type"]) for e in found) == [
        (("frame", "a", 0), "string_nul"),
        (("frame", "a", 2), "number_not_finite"),
        (("frame", "b", "c"), "int_out_of_range"),
    ]


# -- what reaches the database anyway ------------------------------------------------


@pytest.fixture(scope="module")
async def engine(postgres_server_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"{postgres_server_url}/test")
    yield engine
    await engine.dispose()


@pytest.fixture
async def db_client(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=screened_app(engine), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


@pytest.mark.parametrize(
    "encoded",
    [
        json.dumps("\x00"),  # PostgreSQL: invalid byte sequence (22021)
        json.dumps("\ud800"),  # the driver: cannot encode as UTF-8
        json.dumps(2**70),  # the driver: value out of int64 range
    ],
)
async def test_a_value_the_database_refuses_is_a_422_not_an_outage(
    db_client: httpx.AsyncClient, encoded: str
) -> None:
    response = await db_client.post("/db/raw", json={"encoded": encoded})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["type"] == "value_refused"
    assert "retry-after" not in response.headers


async def test_the_screen_stops_what_would_reach_the_database(db_client: httpx.AsyncClient) -> None:
    response = await db_client.get("/db/text", params={"value": "\x00"})
    assert_refused(response, ["query", "value"], "string_nul")
    assert (await db_client.get("/db/text", params={"value": "fine"})).json() == "fine"


async def test_data_errors_are_recognised_raw_and_wrapped(
    engine: AsyncEngine, postgres_server_url: str
) -> None:
    dsn = postgres_server_url.replace("postgresql+asyncpg", "postgresql") + "/test"
    connection = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.PostgresError) as raw:
            await connection.fetchval("SELECT $1::text", "\x00")
        with pytest.raises(asyncpg.PostgresError) as too_big:
            await connection.execute(
                "CREATE TEMP TABLE t (v text PRIMARY KEY); INSERT INTO t "
                "SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400)"
            )
    finally:
        await connection.close()
    assert is_data_error(raw.value)
    assert not is_outage(raw.value)
    assert is_data_error(too_big.value)
    assert not is_outage(too_big.value)

    with pytest.raises(DBAPIError) as wrapped:
        async with engine.connect() as session:
            await session.execute(text("SELECT CAST(:v AS bigint)"), {"v": 2**70})
    assert is_data_error(wrapped.value)
    assert not is_outage(wrapped.value)
