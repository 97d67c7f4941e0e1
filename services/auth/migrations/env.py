"""Alembic environment: kit runs it against auth's metadata."""

from __future__ import annotations

from auth import models  # noqa: F401 - registers every table on the metadata
from auth.db import Base
from kit.migrations import run_migrations

run_migrations(Base.metadata)
