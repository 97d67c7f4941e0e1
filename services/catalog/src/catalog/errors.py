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
        super().__init__(
            "Import by API key is disabled: no key is configured; use a machine client's "
            "access token with the catalog:import scope"
        )


class MissingImportScope(Forbidden):
    """RFC 6750 section 3.1: a valid token without the scope the import needs."""

    def __init__(self, scope: str) -> None:
        super().__init__(
            f"Importing needs a token with the {scope!r} scope",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            error="insufficient_scope",
            error_description=f"Importing needs a token with the {scope!r} scope",
        )


def unknown_category(loc: Sequence[str | int]) -> dict[str, Any]:
    return {"loc": list(loc), "msg": "No category with this slug", "type": "unknown_category"}


class DatabaseUnavailable(ServiceUnavailable):
    def __init__(self) -> None:
        super().__init__("The database is unreachable; retry", headers={"Retry-After": "1"})
