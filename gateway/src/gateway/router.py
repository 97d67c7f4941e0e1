"""The merged OpenAPI document (its Swagger UI page is in `webapp`), and the
root well-known path RFC 8414 gives auth's metadata."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import RedirectResponse

from gateway.openapi import MergedOpenApi


def docs_router(openapi: MergedOpenApi) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi_document() -> dict[str, Any]:
        return await openapi.document()

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
