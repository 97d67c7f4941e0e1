"""The declarative base, on kit's metadata with its constraint naming convention."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase

from kit.db import new_metadata


class Base(DeclarativeBase):
    metadata = new_metadata()
