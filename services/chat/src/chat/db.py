"""Declarative base with the shared naming convention."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase

from kit.db import new_metadata


class Base(DeclarativeBase):
    metadata = new_metadata()


# This code's Alembic revisions, oldest first (test_migrations.py keeps them in
# step with migrations/versions): a replica is ready once the database is at
# the last one (kit.db.schema_check). Add each new revision here.
SCHEMA_REVISIONS = ("0001", "0002")
