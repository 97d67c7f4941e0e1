"""The gateway's own documentation endpoints: the merged OpenAPI and Swagger UI,
and the root well-known path RFC 8414 gives auth's metadata."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse

from gateway.openapi import MergedOpenApi


def docs_router(openapi: MergedOpenApi, *, title: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi_document() -> dict[str, Any]:
        return await openapi.document()

    @router.get("/docs")
    async def swagger_ui() -> HTMLResponse:
        # Swagger UI's assets come from its CDN, in the browser
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{title} - docs",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    return router


def well_known_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/.well-known/oauth-authorization-server/auth")
    async def authorization_server_metadata() -> RedirectResponse:
        # RFC 8414 section 3.1 inserts the well-known segment before the issuer's
        # path (`/auth`); auth serves the document under its own prefix, as
        # OpenID Connect's `<issuer>/.well-known/...` form has it.
        return RedirectResponse(
            "/auth/.well-known/oauth-authorization-server",
            status_code=308,
            headers={"Cache-Control": "public, max-age=86400"},
        )

    return router
