"""Dependencies routes read like prose: the session, paging, filters, the import key."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader, APIKeyQuery
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from catalog.config import Settings
from catalog.errors import ImportDisabled
from catalog.paging import Cursor, Sort
from catalog.schemas import Slug, Tag
from kit.db import session_dependency
from kit.errors import InvalidInput, Unauthenticated

PAGE_DEFAULT = 20
PAGE_MAX = 100

SessionDep = Annotated[AsyncSession, Depends(session_dependency)]


ReadConnections = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
"""Opens a connection for reads; the lifespan picks the implementation."""


def engine_connections(engine: AsyncEngine) -> ReadConnections:
    """Pooled connections outside any session: reads pay one round trip each."""
    return engine.connect


def session_connections(sessionmaker: async_sessionmaker[AsyncSession]) -> ReadConnections:
    """The connection under a session from `sessionmaker` (tests: their transaction)."""

    @contextlib.asynccontextmanager
    async def connection() -> AsyncIterator[AsyncConnection]:
        async with sessionmaker() as session:
            yield await session.connection()

    return connection


async def read_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    reads: ReadConnections = request.state.reads
    async with reads() as connection:
        yield connection


ReadConnectionDep = Annotated[AsyncConnection, Depends(read_connection)]


def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


@dataclass(frozen=True, slots=True)
class Pagination:
    limit: int
    sort: Sort
    cursor: Cursor | None


def pagination(
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


class ProductFilters:
    """A class dependency: the list's filters, each optional and combined with AND."""

    def __init__(
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
    ) -> None:
        if min_price is not None and max_price is not None and min_price > max_price:
            raise InvalidInput(
                "min_price is above max_price",
                errors=[
                    {
                        "loc": ["query", "min_price"],
                        "msg": "min_price must not exceed max_price",
                        "type": "range_inverted",
                    }
                ],
            )
        self.tags = list(dict.fromkeys(tag or []))
        self.category = category
        self.q = q
        self.min_price = min_price
        self.max_price = max_price


FiltersDep = Annotated[ProductFilters, Depends()]

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The catalog import key"
)
api_key_query = APIKeyQuery(
    name="api_key", auto_error=False, description="The catalog import key (query form)"
)


async def require_import_key(
    settings: SettingsDep,
    from_header: Annotated[str | None, Security(api_key_header)],
    from_query: Annotated[str | None, Security(api_key_query)],
) -> None:
    """Admits machine imports carrying the configured API key."""
    expected = settings.catalog_api_key
    if expected is None:
        raise ImportDisabled
    presented = from_header or from_query
    if not presented:
        raise Unauthenticated("An API key is required (X-API-Key)", scheme="APIKey")
    # compare_digest: the time taken does not reveal how much of the key matched
    if not secrets.compare_digest(presented.encode(), expected.get_secret_value().encode()):
        raise Unauthenticated("Wrong API key", scheme="APIKey")
