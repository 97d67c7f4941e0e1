"""Every service raises its own open-file limit: a container's soft limit
may be 1,024 whatever the platform could give it."""

from __future__ import annotations

import subprocess
import sys

LOWERED_THEN_ASSEMBLED = """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
from fastapi import FastAPI
from kit.app import assemble
from kit.settings import ServiceSettings
assemble(FastAPI(), ServiceSettings(_env_file=None), readiness={})
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
"""


def test_an_app_assembled_by_kit_raises_the_soft_limit_to_the_hard_one() -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOWERED_THEN_ASSEMBLED],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    soft, hard = (int(n) for n in result.stdout.split())
    assert hard > 256
    assert soft == hard
