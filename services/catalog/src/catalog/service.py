"""Catalog's SQL and rules. Every write commits here; failures are domain errors."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from pydantic import ValidationError
from sqlalchemy import (
    ColumnElement,
    Executable,
    Integer,
    Numeric,
    Row,
    RowMapping,
    Select,
    Table,
    any_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from catalog.connections import DriverConnections, ReadConnections
from catalog.errors import (
    CategorySlugTaken,
    DatabaseUnavailable,
    IdempotencyKeyReused,
    ProductNameTaken,
    ProductNotFound,
    StaleVersion,
    unknown_category,
)
from catalog.models import Category, IdempotencyRecord, Product
from catalog.paging import Cursor, Pagination, ProductFilters, Sort
from catalog.schemas import (
    PRODUCT_PAGE_JSON,
    CategoryIn,
    CategoryOut,
    ProductIn,
    ProductOut,
    ProductRecord,
    check_sale_price,
    price_with_tax,
)
from kit.batching import BatchedReads, SharedReads
from kit.db import delete_in_batches
from kit.errors import InvalidInput, ServiceUnavailable

logger = logging.getLogger("catalog.service")

PRODUCT_NAME_CONSTRAINT = "uq_products_category_id_name"
CATEGORY_SLUG_CONSTRAINT = "uq_categories_slug"
NO_CATEGORY = 0  # stands for NULL where (category, name) pairs are compared

_PRODUCT_COLUMNS = (
    Product.id,
    Product.name,
    Product.price,
    Product.tags,
    Product.version,
    Product.created_at,
    Product.updated_at,
)
_SORT_COLUMNS = {"name": Product.name, "price": Product.price, "created_at": Product.created_at}


def _product_query() -> Select[*tuple[Any, ...]]:
    """Products with their category in one statement (a LEFT JOIN, never a query per row)."""
    return select(
        *_PRODUCT_COLUMNS,
        Category.id.label("category_id"),
        Category.slug.label("category_slug"),
        Category.name.label("category_name"),
    ).outerjoin(Category, Product.category_id == Category.id)


def _product_out(row: Mapping[Any, Any], category: CategoryOut | None = None) -> ProductOut:
    """Rows come from the database, already valid: build without re-validating."""
    if category is None and row.get("category_id") is not None:
        category = CategoryOut.model_construct(
            id=row["category_id"], slug=row["category_slug"], name=row["category_name"]
        )
    return ProductOut.model_construct(
        id=row["id"],
        name=row["name"],
        price=row["price"],
        tags=row["tags"],
        category=category,
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _product_record(row: Mapping[str, Any]) -> ProductRecord:
    """What `_product_out` builds, as a plain dict (see schemas.ProductRecord)."""
    category_id = row["category_id"]
    return {
        "name": row["name"],
        "price": row["price"],
        "tags": row["tags"],
        "id": row["id"],
        "category": None
        if category_id is None
        else {"id": category_id, "slug": row["category_slug"], "name": row["category_name"]},
        "version": row["version"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "price_with_tax": price_with_tax(row["price"]),
    }


def _violated_constraint(error: IntegrityError) -> str | None:
    cause = getattr(error.orig, "__cause__", None)
    name = getattr(cause, "constraint_name", None)
    return name if isinstance(name, str) else None


# --- categories -------------------------------------------------------------------------


async def create_category(*, session: AsyncSession, data: CategoryIn) -> CategoryOut:
    statement = (
        insert(Category)
        .values(slug=data.slug, name=data.name)
        .returning(Category.id, Category.slug, Category.name)
    )
    try:
        row = (await session.execute(statement)).one()
        await session.commit()
    except IntegrityError as error:
        await session.rollback()
        if _violated_constraint(error) == CATEGORY_SLUG_CONSTRAINT:
            raise CategorySlugTaken from error
        raise
    return CategoryOut(id=row.id, slug=row.slug, name=row.name)


async def _read(reads: ReadConnections, statement: Executable) -> Sequence[RowMapping]:
    """Runs a read; a connection found dead (a database restart) makes SQLAlchemy
    recycle the pool, and the read is tried once more on a fresh connection."""
    for attempt in range(2):
        try:
            async with reads() as connection:
                return (await connection.execute(statement)).mappings().all()
        except DBAPIError as error:
            if attempt or not error.connection_invalidated:
                raise
            logger.warning("database connection lost (%s); retrying on a new one", error)
    raise AssertionError("unreachable")


async def list_categories(*, reads: ReadConnections) -> list[CategoryOut]:
    rows = await _read(reads, select(Category.id, Category.slug, Category.name).order_by("slug"))
    return [CategoryOut(id=row["id"], slug=row["slug"], name=row["name"]) for row in rows]


async def _categories_by_slug(session: AsyncSession, slugs: set[str]) -> dict[str, CategoryOut]:
    if not slugs:
        return {}
    rows = await session.execute(
        select(Category.id, Category.slug, Category.name).where(Category.slug.in_(slugs))
    )
    return {row.slug: CategoryOut(id=row.id, slug=row.slug, name=row.name) for row in rows}


async def _category(
    session: AsyncSession, slug: str | None, *, loc: Sequence[str | int]
) -> CategoryOut | None:
    if slug is None:
        return None
    found = await _categories_by_slug(session, {slug})
    if slug not in found:
        raise InvalidInput("Unknown category", errors=[unknown_category(loc)])
    return found[slug]


# --- reads ------------------------------------------------------------------------------


# The hot read runs on the driver itself: SQL compiled once from the Core
# statement, prepared once per connection, no session, no result layer; and
# reads that arrive together share one statement (see kit.batching).
_PRODUCTS_BY_ID_SQL = str(
    _product_query()
    .where(Product.id == any_(bindparam("ids", type_=ARRAY(Product.id.type))))
    .compile(dialect=asyncpg_dialect.dialect())  # type: ignore[no-untyped-call]
)


def product_reads(connections: DriverConnections, *, max_in_flight: int) -> BatchedReads:
    """get-by-id's reads on `connections`, batched."""
    return BatchedReads(
        connections,
        _PRODUCTS_BY_ID_SQL,
        key="id",
        on_lost=lambda _error: DatabaseUnavailable(),
        max_in_flight=max_in_flight,
    )


async def get_product(*, reads: BatchedReads, product_id: uuid.UUID) -> ProductOut:
    record = await reads.fetch(product_id)
    if record is None:
        raise ProductNotFound
    return _product_out(record)


# The list's conditions, each on a named parameter, so a list's SQL depends
# only on which filters it has: compiled once per shape, prepared once per
# connection, run on the driver like get-by-id.
_CONDITIONS: dict[str, ColumnElement[bool]] = {
    "tags": Product.tags.contains(bindparam("tags", type_=Product.tags.type)),
    "category": Category.slug == bindparam("category", type_=Category.slug.type),
    "pattern": Product.name.ilike(bindparam("pattern", type_=Product.name.type), escape="\\"),
    "min_price": Product.price >= bindparam("min_price", type_=Numeric()),
    "max_price": Product.price <= bindparam("max_price", type_=Numeric()),
}
"""A price bound is cast to NUMERIC without the column's precision: cast to
`NUMERIC(10, 2)` it would be rounded (a `min_price` of 19.994 would take in
19.99) and one beyond the column would fail the cast, where it only matches
nothing or everything."""


def _filter_values(filters: ProductFilters) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if filters.tags:
        values["tags"] = tuple(filters.tags)
    if filters.category is not None:
        values["category"] = filters.category
    if filters.q is not None:
        escaped = filters.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        values["pattern"] = f"%{escaped}%"
    if filters.min_price is not None:
        values["min_price"] = filters.min_price
    if filters.max_price is not None:
        values["max_price"] = filters.max_price
    return values


def _after(sort: Sort) -> ColumnElement[bool]:
    """Rows strictly after the cursor in the sort order: a row comparison the
    (sort key, id) index answers directly."""
    column = _SORT_COLUMNS[sort.column]
    position = tuple_(column, Product.id)
    key_type = Numeric() if sort.column == "price" else column.type  # as a price bound
    bound = tuple_(
        bindparam("after_key", type_=key_type), bindparam("after_id", type_=Product.id.type)
    )
    return position < bound if sort.descending else position > bound


@functools.cache
def _list_sql(sort: Sort, conditions: tuple[str, ...], after: bool) -> tuple[str, tuple[str, ...]]:
    """The SQL of a list of this shape, and its parameters' names in order."""
    column = _SORT_COLUMNS[sort.column]
    order = (column.desc(), Product.id.desc()) if sort.descending else (column, Product.id)
    query = _product_query().order_by(*order).limit(bindparam("limit", type_=Integer))
    for name in conditions:
        query = query.where(_CONDITIONS[name])
    if after:
        query = query.where(_after(sort))
    compiled = query.compile(dialect=asyncpg_dialect.dialect())  # type: ignore[no-untyped-call]
    return str(compiled), tuple(compiled.positiontup or ())


def list_reads(connections: DriverConnections) -> SharedReads:
    """The list's reads on `connections`: identical ones waiting together share one."""
    return SharedReads(connections, on_lost=lambda _error: DatabaseUnavailable())


async def list_products(*, reads: SharedReads, filters: ProductFilters, page: Pagination) -> bytes:
    """A page of products, serialised (a `ProductPage`): concurrent identical
    lists share one read and one serialisation (see kit.batching.SharedReads)."""
    values = _filter_values(filters)
    values["limit"] = page.limit + 1
    if page.cursor is not None:
        values["after_key"], values["after_id"] = page.cursor.key, page.cursor.id
    conditions = tuple(name for name in _CONDITIONS if name in values)
    sql, names = _list_sql(page.sort, conditions, page.cursor is not None)
    arguments = tuple(values[name] for name in names)
    return await reads.fetch(sql, arguments, functools.partial(_page_json, page))


def _page_json(page: Pagination, rows: list[Any]) -> bytes:
    items = [_product_record(row) for row in rows[: page.limit]]
    next_cursor = None
    if len(rows) > page.limit:
        last = rows[page.limit - 1]
        next_cursor = Cursor(page.sort, last[page.sort.column], last["id"]).encode()
    return PRODUCT_PAGE_JSON.dump_json({"items": items, "next_cursor": next_cursor})


# --- writes -----------------------------------------------------------------------------


async def _insert_product(session: AsyncSession, data: ProductIn) -> ProductOut:
    category = await _category(session, data.category, loc=("body", "category"))
    statement = (
        insert(Product)
        .values(
            id=uuid.uuid4(),
            name=data.name,
            price=data.price,
            tags=data.tags,
            category_id=None if category is None else category.id,
        )
        .returning(*_PRODUCT_COLUMNS)
    )
    row = (await session.execute(statement)).one()
    return _product_out(row._mapping, category)


def _name_conflict(error: IntegrityError) -> Exception:
    if _violated_constraint(error) == PRODUCT_NAME_CONSTRAINT:
        return ProductNameTaken()
    return error


@contextlib.asynccontextmanager
async def _committed(session: AsyncSession) -> AsyncIterator[None]:
    """Commits what the block wrote; on any error undoes it, a product name
    already taken in its category becoming ProductNameTaken."""
    try:
        yield
        await session.commit()
    except IntegrityError as error:
        await session.rollback()
        raise _name_conflict(error) from error
    except BaseException:
        await session.rollback()
        raise


async def create_product(*, session: AsyncSession, data: ProductIn) -> ProductOut:
    async with _committed(session):
        product = await _insert_product(session, data)
    return product


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]
    replayed: bool


def request_fingerprint(data: ProductIn) -> str:
    """Of the validated body, so key order and spacing do not make two requests differ."""
    canonical = json.dumps(data.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def create_product_once(
    *, session: AsyncSession, data: ProductIn, owner: str, key: str, ttl_seconds: int
) -> StoredResponse:
    """Creates a product at most once per `(owner, key)` and replays the first response.

    Claiming the key and creating the product share one transaction: a
    concurrent request with the same key waits on the key's row and then
    replays what this one stored; if this one fails, the claim is undone and a
    retry runs afresh. Only successful responses are stored.
    """
    fingerprint = request_fingerprint(data)
    expires_at = datetime.now(UTC) + timedelta(seconds=ttl_seconds)
    claim = (
        pg_insert(IdempotencyRecord)
        .values(owner=owner, key=key, fingerprint=fingerprint, expires_at=expires_at)
        .on_conflict_do_update(
            index_elements=[IdempotencyRecord.owner, IdempotencyRecord.key],
            set_={
                "fingerprint": fingerprint,
                "status_code": None,
                "response_body": None,
                "created_at": func.now(),
                "expires_at": expires_at,
            },
            where=IdempotencyRecord.expires_at <= func.now(),
        )
        .returning(IdempotencyRecord.key)
    )
    async with _committed(session):
        claimed = (await session.execute(claim)).first() is not None
        if not claimed:
            return await _replay(session, owner=owner, key=key, fingerprint=fingerprint)
        product = await _insert_product(session, data)
        body = product.model_dump(mode="json")
        await session.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.owner == owner, IdempotencyRecord.key == key)
            .values(status_code=201, response_body=body)
        )
    return StoredResponse(status_code=201, body=body, replayed=False)


async def _replay(
    session: AsyncSession, *, owner: str, key: str, fingerprint: str
) -> StoredResponse:
    record = (
        await session.execute(
            select(
                IdempotencyRecord.fingerprint,
                IdempotencyRecord.status_code,
                IdempotencyRecord.response_body,
            ).where(IdempotencyRecord.owner == owner, IdempotencyRecord.key == key)
        )
    ).first()
    await session.rollback()
    if record is None or record.status_code is None or record.response_body is None:
        raise ServiceUnavailable("That Idempotency-Key is being processed; retry")
    if record.fingerprint != fingerprint:
        raise IdempotencyKeyReused
    return StoredResponse(status_code=record.status_code, body=record.response_body, replayed=True)


async def purge_expired_idempotency_keys(*, session: AsyncSession) -> int:
    """Deletes the keys past their expiry, in batches; returns how many."""
    table = cast(Table, IdempotencyRecord.__table__)
    return await delete_in_batches(session, table, table.c.expires_at <= func.now())


def _merged(row: Row[*tuple[Any, ...]], changes: dict[str, Any]) -> ProductIn:
    """The product after the patch: the stored fields as they are, the changes
    as `ProductPatch` checked them, and the rule that spans fields (a sale's
    price) checked on the whole. The stored fields are not validated again:
    they were valid when written, and the name's title-casing is not the same
    twice (`"Di̇yarbakir"` would become `"Di̇Yarbakir"`), so a patch of the
    price would change the name."""
    merged = ProductIn.model_construct(
        **{
            "name": row.name,
            "price": row.price,
            "tags": row.tags,
            "category": row.category_slug,
            **changes,
        }
    )
    try:
        check_sale_price(merged.tags, merged.price)
    except ValidationError as error:
        raise InvalidInput(
            "The patched product breaks a rule",
            errors=[
                {"loc": ["body", *item["loc"]], "msg": item["msg"], "type": item["type"]}
                for item in error.errors()
            ],
        ) from error
    return merged


def _check_version(version: int, expected: frozenset[int] | None) -> None:
    if expected is not None and version not in expected:
        raise StaleVersion


async def update_product(
    *,
    session: AsyncSession,
    product_id: uuid.UUID,
    changes: dict[str, Any],
    expected_versions: frozenset[int] | None,
) -> ProductOut:
    """Applies `changes` if the product is still at one of `expected_versions`
    (None: any), bumping its version; the UPDATE re-checks the version, so of two
    concurrent patches from the same ETag one gets 412."""
    row = (await session.execute(_product_query().where(Product.id == product_id))).first()
    if row is None:
        raise ProductNotFound
    _check_version(row.version, expected_versions)
    if not changes:
        await session.rollback()
        return _product_out(row._mapping)
    merged = _merged(row, changes)
    async with _committed(session):
        category = await _category(session, merged.category, loc=("body", "category"))
        statement = (
            update(Product)
            .where(Product.id == product_id, Product.version == row.version)
            .values(
                name=merged.name,
                price=merged.price,
                tags=merged.tags,
                category_id=None if category is None else category.id,
                version=Product.version + 1,
                updated_at=func.now(),
            )
            .returning(*_PRODUCT_COLUMNS)
        )
        updated = (await session.execute(statement)).first()
        if updated is None:
            raise StaleVersion
    return _product_out(updated._mapping, category)


async def delete_product(
    *, session: AsyncSession, product_id: uuid.UUID, expected_versions: frozenset[int] | None
) -> None:
    statement = delete(Product).where(Product.id == product_id)
    if expected_versions is not None:
        statement = statement.where(Product.version.in_(expected_versions))
    deleted = (await session.execute(statement.returning(Product.id))).first()
    if deleted is None:
        exists = await session.scalar(select(literal(1, Integer)).where(Product.id == product_id))
        await session.rollback()
        raise ProductNotFound if exists is None else StaleVersion
    await session.commit()


# --- import -----------------------------------------------------------------------------


def _clashes(
    items: Sequence[ProductIn], categories: dict[str, CategoryOut], taken: set[tuple[int, str]]
) -> list[dict[str, Any]]:
    """Rows whose (category, name) repeats an earlier row or an existing product."""
    errors: list[dict[str, Any]] = []
    seen: set[tuple[int, str]] = set()
    for index, item in enumerate(items):
        pair = (_category_key(item, categories), item.name)
        if pair in taken or pair in seen:
            message = "Name already used in this category" + (
                "" if pair in taken else " by an earlier row"
            )
            errors.append({"loc": ["body", index, "name"], "msg": message, "type": "duplicate"})
        seen.add(pair)
    return errors


def _category_key(item: ProductIn, categories: dict[str, CategoryOut]) -> int:
    return NO_CATEGORY if item.category is None else categories[item.category].id


async def import_products(*, session: AsyncSession, items: Sequence[ProductIn]) -> list[uuid.UUID]:
    """All or nothing: any unknown category or clashing name rejects the whole list."""
    slugs = {item.category for item in items if item.category is not None}
    categories = await _categories_by_slug(session, slugs)
    unknown = [
        unknown_category(("body", index, "category"))
        for index, item in enumerate(items)
        if item.category is not None and item.category not in categories
    ]
    if unknown:
        await session.rollback()
        raise InvalidInput("Import rejected: unknown categories", errors=unknown)
    pairs = {(_category_key(item, categories), item.name) for item in items}
    category_key = func.coalesce(Product.category_id, NO_CATEGORY)
    existing = await session.execute(
        select(category_key, Product.name).where(tuple_(category_key, Product.name).in_(pairs))
    )
    clashes = _clashes(items, categories, {(row[0], row[1]) for row in existing})
    if clashes:
        await session.rollback()
        raise ProductNameTaken("Import rejected: duplicate names", errors=clashes)
    ids = [uuid.uuid4() for _ in items]
    rows = [
        {
            "id": product_id,
            "name": item.name,
            "price": item.price,
            "tags": item.tags,
            "category_id": None if item.category is None else categories[item.category].id,
        }
        for product_id, item in zip(ids, items, strict=True)
    ]
    async with _committed(session):
        await session.execute(insert(Product), rows)
    return ids
