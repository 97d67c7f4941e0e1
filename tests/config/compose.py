"""`docker compose config` of the project, as the tests read it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def compose_services(*options: str) -> dict[str, dict[str, Any]]:
    """Every service as compose resolves it with these options (an env file,
    a profile), and nothing from the caller's environment."""
    clean = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    done = subprocess.run(
        ["docker", "compose", *options, "config", "--format", "json"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        check=True,
    )
    services: dict[str, dict[str, Any]] = json.loads(done.stdout)["services"]
    return services
