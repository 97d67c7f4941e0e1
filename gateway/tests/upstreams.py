"""A small real upstream service for the gateway's tests, run by uvicorn on a
loopback port. It serves the same paths under any service prefix, since the
gateway rewrites nothing."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from kit.middleware import BodySizeLimitMiddleware

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


class Upstream:
    """One fake replica; tests read what it saw and flip how it behaves."""

    def __init__(
        self, node: str, *, spec: dict[str, Any] | None = None, max_body_bytes: int = 2**30
    ) -> None:
        self.node = node
        self.spec = spec or {"openapi": "3.1.0", "info": {"title": node, "version": "1"}}
        self.hits = 0
        self.ready = True
        self.failing = False
        self.failing_status = 500
        self.failing_media_type = "application/json"
        self.first_chunk_seen = asyncio.Event()
        self.release_stream = asyncio.Event()
        self.stream_abandoned = asyncio.Event()
        self.ws_connects = 0
        self.ws_closed_with: int | None = None
        self.ws_closed = asyncio.Event()
        self.routes = Starlette(
            routes=[
                Route("/readyz", self.readyz),
                Route("/openapi.json", self.openapi),
                Route("/{service}/echo", self.echo, methods=ALL_METHODS),
                Route("/{service}/upload", self.upload, methods=["POST", "PUT"]),
                Route("/{service}/stream", self.stream),
                Route("/{service}/slow", self.slow),
                Route("/{service}/flaky", self.flaky, methods=ALL_METHODS),
                Route("/{service}/hop", self.hop),
                Route("/{service}/moved", self.moved),
                Route("/{service}/ids", self.ids),
                Route("/{service}/events", self.events),
                WebSocketRoute("/{service}/ws/{room}", self.websocket),
            ]
        )
        # refuses oversized bodies without reading them, as every service does
        self.app = BodySizeLimitMiddleware(self.routes, max_bytes=max_body_bytes)

    async def readyz(self, request: Request) -> Response:
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self.spec)

    async def echo(self, request: Request) -> Response:
        self.hits += 1
        body = await request.body()
        return JSONResponse(
            {
                "node": self.node,
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": [[k.decode(), v.decode()] for k, v in request.scope["headers"]],
                "body": body.decode(errors="replace"),
            }
        )

    async def upload(self, request: Request) -> Response:
        self.hits += 1
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            if chunk and not self.first_chunk_seen.is_set():
                self.first_chunk_seen.set()
            digest.update(chunk)
            size += len(chunk)
        return JSONResponse({"bytes": size, "sha256": digest.hexdigest()})

    async def stream(self, request: Request) -> Response:
        """One chunk, then the rest once the test releases it: proves nothing buffers."""
        self.hits += 1
        chunks = int(request.query_params.get("chunks", "4"))
        size = int(request.query_params.get("size", "1024"))

        async def body() -> AsyncIterator[bytes]:
            yield b"a" * size
            try:
                await self.release_stream.wait()
            except asyncio.CancelledError:
                self.stream_abandoned.set()
                raise
            for _ in range(chunks - 1):
                yield b"b" * size

        return StreamingResponse(body(), media_type="application/octet-stream")

    async def slow(self, request: Request) -> Response:
        self.hits += 1
        await asyncio.sleep(float(request.query_params.get("seconds", "1")))
        return JSONResponse({"node": self.node})

    async def flaky(self, request: Request) -> Response:
        self.hits += 1
        if self.failing:
            return JSONResponse(
                {"node": self.node},
                status_code=self.failing_status,
                media_type=self.failing_media_type,
            )
        return JSONResponse({"node": self.node})

    async def hop(self, request: Request) -> Response:
        self.hits += 1
        return Response(
            b"ok",
            headers={
                "Connection": "x-hop-secret",
                "X-Hop-Secret": "1",
                "Keep-Alive": "timeout=5",
                "X-End-To-End": "1",
            },
        )

    async def ids(self, request: Request) -> Response:
        """An answer with the headers every service adds, as the gateway does."""
        return Response(b"ok", headers={"X-Request-ID": "the-service-s", "X-Process-Time": "9"})

    async def events(self, request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for number in range(3):
                yield f"id: {number}\ndata: {'x' * 2000}\n\n".encode()

        return StreamingResponse(body(), media_type="text/event-stream")

    async def moved(self, request: Request) -> Response:
        self.hits += 1
        return Response(status_code=307, headers={"Location": "/catalog/echo"})

    async def websocket(self, websocket: WebSocket) -> None:
        self.ws_connects += 1
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol="bearer" if "bearer" in offered else None)
        await websocket.send_json(
            {
                "type": "ready",
                "node": self.node,
                "authorization": websocket.headers.get("authorization"),
                "query": websocket.url.query,
            }
        )
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    self.ws_closed_with = message.get("code")
                    return
                text = message.get("text")
                if text is not None and text.startswith("flood:"):
                    for number in range(int(text.removeprefix("flood:"))):
                        await websocket.send_text(f"frame {number}")
                        await asyncio.sleep(0)  # a send never waits: let the loop turn
                    continue
                if text is not None and text.startswith("close:"):
                    await websocket.close(code=int(text.removeprefix("close:")), reason="bye")
                    return
                if text is not None:
                    await websocket.send_text(f"echo:{text}")
                else:
                    await websocket.send_bytes(b"echo:" + (message.get("bytes") or b""))
        except WebSocketDisconnect as disconnect:
            self.ws_closed_with = disconnect.code
        finally:
            self.ws_closed.set()


def service_spec(service: str, *, item_field: str) -> dict[str, Any]:
    """An OpenAPI document shaped like FastAPI's, with names every service uses."""
    validation = {
        "properties": {"detail": {"items": {"type": "string"}, "type": "array"}},
        "title": "HTTPValidationError",
        "type": "object",
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": service, "version": "1"},
        "paths": {
            f"/{service}/items": {
                "get": {
                    "tags": ["items"],
                    "operationId": "list_items",
                    "security": [{"OAuth2PasswordBearer": []}],
                    "responses": {
                        "200": {
                            "description": "ok",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Item"}
                                }
                            },
                        },
                        "422": {
                            "description": "invalid",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/HTTPValidationError"}
                                }
                            },
                        },
                    },
                }
            },
            f"/{service}/only-{service}": {
                "post": {
                    "operationId": f"create_{service}",
                    "responses": {"201": {"description": "x"}},
                }
            },
            "/healthz": {
                "get": {"operationId": "healthz", "responses": {"200": {"description": "ok"}}}
            },
        },
        "components": {
            "schemas": {
                "Item": {"properties": {item_field: {"type": "string"}}, "type": "object"},
                "HTTPValidationError": validation,
            },
            "securitySchemes": {
                "OAuth2PasswordBearer": {
                    "type": "oauth2",
                    "flows": {"password": {"scopes": {}, "tokenUrl": "/auth/token"}},
                }
            },
        },
        "tags": [{"name": "items", "description": f"{service} items"}],
    }
