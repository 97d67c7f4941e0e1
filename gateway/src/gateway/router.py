"""The gateway's own documentation endpoints: the merged OpenAPI and Swagger UI."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

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
