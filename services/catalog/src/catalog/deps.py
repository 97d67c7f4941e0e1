"""Dependencies routes read like prose: each adapts a request to what the
service takes (the session, the read connections, a page, filters) or admits
it (the import credentials)."""

from __future__ import annotations

import secrets
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.openapi.models import OAuthFlowClientCredentials, OAuthFlows
from fastapi.security import APIKeyHeader, OAuth2
from sqlalchemy.ext.asyncio import AsyncSession

from catalog.config import Settings
from catalog.connections import ReadConnections
from catalog.errors import ImportDisabled, MissingImportScope
from catalog.paging import Cursor, Pagination, ProductFilters, Sort
from catalog.schemas import Slug, Tag
from kit.batching import BatchedReads, SharedReads
from kit.db import session_dependency
from kit.errors import InvalidInput, Unauthenticated
from kit.security import TokenVerifier, bearer_from_headers

PAGE_DEFAULT = 20
PAGE_MAX = 100

SessionDep = Annotated[AsyncSession, Depends(session_dependency)]


async def get_point_reads(request: Request) -> BatchedReads:
    point_reads: BatchedReads = request.state.point_reads
    return point_reads


PointReadsDep = Annotated[BatchedReads, Depends(get_point_reads)]


async def get_reads(request: Request) -> ReadConnections:
    """Async and not a generator: FastAPI runs plain `def` dependencies in a
    worker thread (a thread hop per request), and a generator adds an exit
    stack; the service opens and closes the connection around its statement."""
    reads: ReadConnections = request.state.reads
    return reads


ReadsDep = Annotated[ReadConnections, Depends(get_reads)]


async def get_list_reads(request: Request) -> SharedReads:
    list_reads: SharedReads = request.state.list_reads
    return list_reads


ListReadsDep = Annotated[SharedReads, Depends(get_list_reads)]


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def pagination(
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="Items per page")] = PAGE_DEFAULT,
    cursor: Annotated[
        str | None, Query(max_length=512, description="`next_cursor` of the previous page")
    ] = None,
    sort: Annotated[Sort, Query(description="Sort key; `-` for descending")] = Sort.CREATED_AT,
) -> Pagination:
    """A function dependency: the page size, the order and where the last page ended."""
    decoded = None if cursor is None else Cursor.decode(cursor, sort=sort)
    return Pagination(limit=limit, sort=sort, cursor=decoded)


PaginationDep = Annotated[Pagination, Depends(pagination)]


class FilterParser:
    """A class dependency: its instances parse the list's filter parameters.

    A callable instance with an async `__call__` rather than the class itself,
    whose `__init__` FastAPI would run in a worker thread on every request.
    """

    def __init__(self, *, max_tags: int = 8) -> None:
        self.max_tags = max_tags

    async def __call__(
        self,
        tag: Annotated[
            list[Tag] | None, Query(description="Repeat for products carrying every tag")
        ] = None,
        category: Annotated[Slug | None, Query(description="A category's slug")] = None,
        q: Annotated[
            str | None, Query(min_length=1, max_length=100, description="Name contains (any case)")
        ] = None,
        min_price: Annotated[Decimal | None, Query(ge=0, max_digits=12)] = None,
        max_price: Annotated[Decimal | None, Query(ge=0, max_digits=12)] = None,
    ) -> ProductFilters:
        tags = list(dict.fromkeys(tag or []))
        if len(tags) > self.max_tags:
            raise filter_error("tag", f"At most {self.max_tags} tags", "too_many_tags")
        if min_price is not None and max_price is not None and min_price > max_price:
            raise filter_error("min_price", "min_price must not exceed max_price", "range_inverted")
        return ProductFilters(tags, category, q, min_price, max_price)


def filter_error(parameter: str, message: str, kind: str) -> InvalidInput:
    return InvalidInput(
        message, errors=[{"loc": ["query", parameter], "msg": message, "type": kind}]
    )


FiltersDep = Annotated[ProductFilters, Depends(FilterParser())]

IMPORT_SCOPE = "catalog:import"

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The catalog import key"
)
# A machine client (auth's OAUTH_CLIENTS) with the catalog:import scope gets its
# token from auth's token endpoint with the client_credentials grant.
import_client = OAuth2(
    flows=OAuthFlows(
        clientCredentials=OAuthFlowClientCredentials(
            tokenUrl="/auth/token", scopes={IMPORT_SCOPE: "Import products"}
        )
    ),
    scheme_name="ImportClient",
    description="A machine client's access token (client_credentials grant) with the "
    f"{IMPORT_SCOPE} scope",
    auto_error=False,
)
_CHALLENGE = f'APIKey, Bearer scope="{IMPORT_SCOPE}"'


async def require_import_key(
    request: Request,
    settings: SettingsDep,
    presented: Annotated[str | None, Security(api_key_header)],
    authorization: Annotated[str | None, Security(import_client, scopes=[IMPORT_SCOPE])],
) -> None:
    """Admits machine imports: a bearer token with the catalog:import scope, or
    the configured API key, in the header only (a key in a query string ends up
    in access logs, proxies and history)."""
    token = bearer_from_headers(authorization)
    if token is not None:
        verifier: TokenVerifier = request.state.verifier
        await verifier.verify(token)  # signature, claims and revocation
        claims = await verifier.verified_claims(token)
        if IMPORT_SCOPE not in str(claims.get("scope", "")).split():
            raise MissingImportScope(IMPORT_SCOPE)
        return
    expected = settings.catalog_api_key
    if not presented:
        raise Unauthenticated(
            f"An API key (X-API-Key) or a bearer token with the {IMPORT_SCOPE} scope is required",
            scheme=_CHALLENGE,
        )
    if expected is None:
        raise ImportDisabled
    # compare_digest: the time taken does not reveal how much of the key matched
    if not secrets.compare_digest(presented.encode(), expected.get_secret_value().encode()):
        raise Unauthenticated("Wrong API key", scheme="APIKey")
