"""Catalog's HTTP surface: parse, call the service, shape the response."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Response, Security, status
from fastapi.responses import JSONResponse

from catalog import service
from catalog.conditional import etag_for, if_match_versions, none_match
from catalog.deps import (
    FiltersDep,
    ListReadsDep,
    PaginationDep,
    PointReadsDep,
    ReadsDep,
    SessionDep,
    SettingsDep,
    require_import_key,
)
from catalog.models import IDEMPOTENCY_KEY_MAX
from catalog.schemas import (
    CategoryIn,
    CategoryOut,
    ImportResult,
    ProductIn,
    ProductOut,
    ProductPage,
    ProductPatch,
)
from kit.deps import AdminWriter
from kit.errors import PreconditionRequired

IMPORT_MAX = 1000
JSON = "application/json"

router = APIRouter(prefix="/catalog", tags=["catalog"])

IfMatch = Annotated[
    str | None, Header(alias="If-Match", description='The product\'s ETag, e.g. `"3"`')
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX,
        description="Retrying with the same key and body returns the first response",
    ),
]


def product_location(product_id: object) -> str:
    return f"/catalog/products/{product_id}"


def product_headers(body: dict[str, Any]) -> dict[str, str]:
    return {"Location": product_location(body["id"]), "ETag": etag_for(int(body["version"]))}


def required_if_match(if_match: str | None) -> frozenset[int] | None:
    if if_match is None:
        raise PreconditionRequired("Send If-Match with the product's current ETag")
    return if_match_versions(if_match)


# The hottest routes come first: Starlette tries routes in order.
@router.get(
    "/products/{product_id}",
    response_model=ProductOut,
    summary="One product, with its ETag",
    responses={304: {"description": "Not modified (If-None-Match matched)"}},
)
async def get_product(
    product_id: uuid.UUID,
    point_reads: PointReadsDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    product = await service.get_product(reads=point_reads, product_id=product_id)
    etag = etag_for(product.version)
    if if_none_match is not None and none_match(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return Response(product.model_dump_json(), media_type=JSON, headers={"ETag": etag})


@router.get("/products", response_model=ProductPage, summary="A page of products")
async def list_products(reads: ListReadsDep, page: PaginationDep, filters: FiltersDep) -> Response:
    body = await service.list_products(reads=reads, filters=filters, page=page)
    return Response(body, media_type=JSON)


@router.post(
    "/categories",
    status_code=status.HTTP_201_CREATED,
    summary="Create a category (admin)",
)
async def create_category(
    data: CategoryIn, session: SessionDep, _admin: AdminWriter
) -> CategoryOut:
    return await service.create_category(session=session, data=data)


@router.get("/categories", summary="Every category, by slug")
async def list_categories(reads: ReadsDep) -> list[CategoryOut]:
    return await service.list_categories(reads=reads)


@router.post(
    "/products",
    status_code=status.HTTP_201_CREATED,
    response_model=ProductOut,
    summary="Create a product (admin)",
)
async def create_product(
    data: ProductIn,
    session: SessionDep,
    settings: SettingsDep,
    admin: AdminWriter,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    if idempotency_key is None:
        product = await service.create_product(session=session, data=data)
        body = product.model_dump(mode="json")
        return JSONResponse(body, status_code=201, headers=product_headers(body))
    stored = await service.create_product_once(
        session=session,
        data=data,
        owner=admin.user_id,
        key=idempotency_key,
        ttl_seconds=settings.idempotency_ttl_seconds,
    )
    headers = product_headers(stored.body)
    if stored.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(stored.body, status_code=stored.status_code, headers=headers)


@router.post(
    "/products:import",
    status_code=status.HTTP_201_CREATED,
    summary="Import products, all or nothing (machine client token or API key)",
    dependencies=[Security(require_import_key)],
)
async def import_products(
    items: Annotated[list[ProductIn], Body(min_length=1, max_length=IMPORT_MAX)],
    session: SessionDep,
) -> ImportResult:
    ids = await service.import_products(session=session, items=items)
    return ImportResult(count=len(ids), ids=ids)


@router.patch(
    "/products/{product_id}",
    response_model=ProductOut,
    summary="Change the fields sent (admin, If-Match required)",
)
async def update_product(
    product_id: uuid.UUID,
    patch: ProductPatch,
    session: SessionDep,
    _admin: AdminWriter,
    if_match: IfMatch = None,
) -> Response:
    expected = required_if_match(if_match)
    product = await service.update_product(
        session=session, product_id=product_id, changes=patch.changes(), expected_versions=expected
    )
    headers = {"ETag": etag_for(product.version)}
    return Response(product.model_dump_json(), media_type=JSON, headers=headers)


@router.delete(
    "/products/{product_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a product (admin; If-Match optional)",
)
async def delete_product(
    product_id: uuid.UUID, session: SessionDep, _admin: AdminWriter, if_match: IfMatch = None
) -> Response:
    expected = None if if_match is None else if_match_versions(if_match)
    await service.delete_product(session=session, product_id=product_id, expected_versions=expected)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
