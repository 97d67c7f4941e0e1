from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from kit.app import assemble
from kit.logs import JsonFormatter, RequestIdFilter
from kit.observe import remember_user
from kit.settings import ServiceSettings
from kit_testing import serve


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RequestIdFilter())
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[dict[str, Any]] = []
        self.written = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))
        self.written.set()


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    access = logging.getLogger("access")
    access.addHandler(handler)
    try:
        yield handler
    finally:
        access.removeHandler(handler)


def logged_app(**settings: Any) -> FastAPI:
    app = FastAPI()
    assemble(app, ServiceSettings(log_level="INFO", _env_file=None, **settings), readiness={})

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id, "padding": "x" * 100}

    @app.get("/bug")
    async def bug() -> None:
        raise ValueError("a bug")

    @app.websocket("/ws/{room}")
    async def socket(websocket: WebSocket, room: str) -> None:
        if room == "closed":
            await websocket.close(1008)
            return
        remember_user(websocket.scope, "user-9")
        await websocket.accept()
        text = await websocket.receive_text()
        if text == "bye":
            await websocket.close(4001, "done")
            return
        await websocket.receive_text()

    return app


def client(**settings: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=logged_app(**settings), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_one_line_per_request_with_the_route_template_status_and_bytes(
    lines: Lines,
) -> None:
    async with client() as http:
        response = await http.get("/items/17?api_key=secret", headers={"X-Request-ID": "req-5"})
    (line,) = lines.lines
    assert line["level"] == "INFO"
    assert line["logger"] == "access"
    assert line["msg"] == "GET /items/{item_id} 200"
    assert line["route"] == "/items/{item_id}"
    assert line["path"] == "/items/17"
    assert "secret" not in json.dumps(line)
    assert line["status"] == 200
    assert line["bytes"] == len(response.content)
    assert line["request_id"] == "req-5"
    assert line["user_id"] is None
    assert line["duration_ms"] >= 0
    assert line["trace_id"] is None  # tracing is off in this test process's app


async def test_an_unhandled_error_is_logged_as_500_and_unknown_routes_by_no_template(
    lines: Lines,
) -> None:
    async with client() as http:
        assert (await http.get("/bug")).status_code == 500
        assert (await http.get("/nowhere/42")).status_code == 404
    by_path = {line["path"]: line for line in lines.lines}
    assert by_path["/bug"]["status"] == 500
    assert by_path["/nowhere/42"]["route"] == "unmatched"
    assert by_path["/nowhere/42"]["status"] == 404


async def test_probes_and_scrapes_log_at_debug_only(lines: Lines) -> None:
    access = logging.getLogger("access")
    async with client() as http:
        await http.get("/healthz")  # the app's level is INFO: not logged
        access.setLevel(logging.DEBUG)
        try:
            await http.get("/healthz")
            await http.get("/metrics")
        finally:
            access.setLevel(logging.NOTSET)
    assert [(line["path"], line["level"]) for line in lines.lines] == [
        ("/healthz", "DEBUG"),
        ("/metrics", "DEBUG"),
    ]


async def until_lines(lines: Lines, count: int) -> list[dict[str, Any]]:
    """The first `count` lines, once written (a close is logged as the handler returns)."""
    async with asyncio.timeout(10):
        while len(lines.lines) < count:
            lines.written.clear()
            await lines.written.wait()
    return lines.lines[:count]


async def test_websocket_sessions_are_logged_at_open_and_close_with_code_and_user(
    lines: Lines,
) -> None:
    async with serve(logged_app()) as base:
        url = base.replace("http://", "ws://") + "/ws/lobby"
        async with connect(url) as socket:
            await socket.send("bye")
            with pytest.raises(ConnectionClosed):
                await socket.recv()
        await until_lines(lines, 2)
        async with connect(url) as socket:
            await socket.send("hello")
        opened, by_server, opened_again, by_client = await until_lines(lines, 4)
    assert opened["event"] == "open"
    assert opened["status"] == 101
    assert opened["route"] == "/ws/{room}"
    assert opened["user_id"] == "user-9"
    assert by_server["event"] == "close"
    assert by_server["close_code"] == 4001
    assert by_server["closed_by"] == "server"
    assert by_server["duration_ms"] >= 0
    assert opened_again["event"] == "open"
    assert by_client["close_code"] == 1000
    assert by_client["closed_by"] == "client"


async def test_a_refused_websocket_is_one_line(lines: Lines) -> None:
    async with serve(logged_app()) as base:
        with pytest.raises(InvalidStatus):
            await connect(base.replace("http://", "ws://") + "/ws/closed")
        (line,) = await until_lines(lines, 1)
    assert line["event"] == "refused"
    assert line["status"] == 403
    assert line["close_code"] == 1008


async def test_access_log_off_drops_the_access_lines_alone(lines: Lines) -> None:
    try:
        async with client(access_log=False) as http:
            assert (await http.get("/items/17")).status_code == 200
        app = logged_app(access_log=False)
        async with (
            serve(app) as base,
            connect(base.replace("http://", "ws://") + "/ws/lobby") as socket,
        ):
            await socket.send("bye")
            with pytest.raises(ConnectionClosed):
                await socket.recv()
        assert lines.lines == []
        assert logging.getLogger("catalog").isEnabledFor(logging.INFO)
        assert logging.getLogger("access").isEnabledFor(logging.WARNING)
    finally:
        logged_app()  # on again, as every other test has it
    async with client() as http:
        await http.get("/items/17")
    assert [line["route"] for line in lines.lines] == ["/items/{item_id}"]
