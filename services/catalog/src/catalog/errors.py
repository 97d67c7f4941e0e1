"""Catalog's domain errors; kit's handlers turn them into problem+json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kit.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    ServiceUnavailable,
)


class ProductNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("No product with this id")


class ProductNameTaken(Conflict):
    def __init__(
        self,
        detail: str = "A product with this name already exists in its category",
        *,
        errors: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        if errors:
            super().__init__(detail, errors=[dict(error) for error in errors])
        else:
            super().__init__(detail)


class CategorySlugTaken(Conflict):
    def __init__(self) -> None:
        super().__init__("A category with this slug already exists")


class StaleVersion(PreconditionFailed):
    def __init__(self) -> None:
        super().__init__("The product has changed since that ETag; fetch it again")


class IdempotencyKeyReused(InvalidInput):
    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was used with a different request body",
            errors=[
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": "Key already used with a different request body",
                    "type": "idempotency_key_reused",
                }
            ],
        )


class ImportDisabled(Forbidden):
    def __init__(self) -> None:
        super().__init__("Product import is disabled: no API key is configured")


def unknown_category(loc: Sequence[str | int]) -> dict[str, Any]:
    return {"loc": list(loc), "msg": "No category with this slug", "type": "unknown_category"}


class DatabaseUnavailable(ServiceUnavailable):
    def __init__(self) -> None:
        super().__init__("The database is unreachable; retry", headers={"Retry-After": "1"})
