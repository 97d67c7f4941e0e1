"""What a list of products asks for: a page (its size, its order, and the
opaque cursor that continues the previous one) and filters.

Keyset pagination: a cursor is base64url JSON of `[sort, last sort key, last
id]`. Clients treat it as opaque; the server checks every part, so a forged or
stale cursor is a 422, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from catalog.schemas import CENT, PRICE_DIGITS
from kit.errors import InvalidInput
from kit.inputs import json_errors

PRICE_LIMIT = Decimal(10) ** (PRICE_DIGITS - 2)
"""The first price `NUMERIC(10, 2)` cannot hold."""


class Sort(enum.StrEnum):
    NAME = "name"
    NAME_DESC = "-name"
    PRICE = "price"
    PRICE_DESC = "-price"
    CREATED_AT = "created_at"
    CREATED_AT_DESC = "-created_at"

    @property
    def column(self) -> str:
        return self.value.removeprefix("-")

    @property
    def descending(self) -> bool:
        return self.value.startswith("-")


SortKey = str | Decimal | datetime


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the previous page ended: its last row's sort key and id."""

    sort: Sort
    key: SortKey
    id: uuid.UUID

    def encode(self) -> str:
        key = self.key.isoformat() if isinstance(self.key, datetime) else str(self.key)
        raw = json.dumps([self.sort.value, key, str(self.id)], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str, *, sort: Sort) -> Cursor:
        try:
            padded = token + "=" * (-len(token) % 4)
            decoded = json.loads(base64.urlsafe_b64decode(padded))
            if json_errors(decoded):  # a NUL or lone surrogate smuggled inside
                raise ValueError("the cursor holds text no sort key can")
            if not (
                isinstance(decoded, list)
                and len(decoded) == 3
                and all(isinstance(part, str) for part in decoded)
            ):
                raise ValueError("a cursor is three strings")
            sort_value, key, id_value = decoded
            cursor_sort = Sort(sort_value)
            cursor = cls(cursor_sort, _parse_key(cursor_sort, key), uuid.UUID(id_value))
        except (ValueError, TypeError, binascii.Error, InvalidOperation, OverflowError) as error:
            raise invalid_cursor("The cursor is not one this API issued") from error
        if cursor.sort is not sort:
            raise invalid_cursor(f"The cursor continues sort={cursor.sort}, not sort={sort}")
        return cursor


def _parse_key(sort: Sort, key: str) -> SortKey:
    """The sort key, only as its column could hold it (a price of cents under
    10^8, a moment PostgreSQL can compare); the query never sees another."""
    if sort.column == "price":
        price = Decimal(key)
        if not price.is_finite() or price != price.quantize(CENT) or abs(price) >= PRICE_LIMIT:
            raise ValueError("not a price the catalog stores")
        return price
    if sort.column == "created_at":
        moment = datetime.fromisoformat(key)
        if moment.tzinfo is None:
            raise ValueError("created_at must carry its offset")
        moment.astimezone(UTC)  # OverflowError at the ends of the calendar
        return moment
    return key


def invalid_cursor(message: str) -> InvalidInput:
    return InvalidInput(
        "Invalid cursor",
        errors=[{"loc": ["query", "cursor"], "msg": message, "type": "invalid_cursor"}],
    )


@dataclass(frozen=True, slots=True)
class Pagination:
    limit: int
    sort: Sort
    cursor: Cursor | None


@dataclass(frozen=True, slots=True)
class ProductFilters:
    """The list's filters, each optional, combined with AND."""

    tags: list[str] = field(default_factory=list)
    category: str | None = None
    q: str | None = None
    min_price: Decimal | None = None
    max_price: Decimal | None = None
