"""Catalog's settings: kit's shared ones plus its database, import key and limits."""

from __future__ import annotations

from pydantic import Field, PostgresDsn, SecretStr

from kit.settings import DatabaseSettings, VerifiedWritesSettings, is_weak_secret


class Settings(DatabaseSettings, VerifiedWritesSettings):
    service_name: str = "catalog"
    database_url: PostgresDsn = PostgresDsn("postgresql+asyncpg://catalog@postgres:5432/catalog")

    # get-by-id's own asyncpg pool (see main.py), besides the ORM's
    # (DATABASE_POOL_SIZE)
    point_read_pool_size: int = Field(default=5, ge=1)

    # The key machine imports present in `X-API-Key` (the header only); unset
    # switches `POST /catalog/products:import` off (403).
    catalog_api_key: SecretStr | None = None

    idempotency_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    # How often a replica deletes expired idempotency keys.
    idempotency_purge_interval_seconds: float = Field(default=600.0, gt=0)

    def weak_production_secrets(self) -> list[str]:
        weak = super().weak_production_secrets()
        # unset switches import off; a set key must not be a guessable one
        key = self.catalog_api_key
        if key is not None and is_weak_secret(key.get_secret_value()):
            weak.append("CATALOG_API_KEY")
        return weak
