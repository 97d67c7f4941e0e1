from __future__ import annotations

from chat import models  # noqa: F401 - registers the tables on the metadata
from chat.db import Base
from kit.migrations import run_migrations

run_migrations(Base.metadata)
