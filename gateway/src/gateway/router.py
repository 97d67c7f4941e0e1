"""The merged OpenAPI document (its Swagger UI page is in `webapp`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.openapi import MergedOpenApi


def docs_router(openapi: MergedOpenApi) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi_document() -> dict[str, Any]:
        return await openapi.document()

    return router
