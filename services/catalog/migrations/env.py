"""Alembic environment: kit runs it against catalog's metadata."""

from __future__ import annotations

from catalog import models  # noqa: F401 - registers every table on the metadata
from catalog.db import Base
from kit.migrations import run_migrations

run_migrations(Base.metadata)
