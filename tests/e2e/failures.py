"""Whether a test failed, for the fixtures that show the stack's state after
one (the compose suite and the swarm suite). Each suite's conftest.py imports
the hook, which is where pytest looks for it, and a fixture asks `failed()`
in its teardown."""

from __future__ import annotations

from collections.abc import Generator

import pytest

FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


def failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test that asked for the fixture failed in its own body."""
    item: pytest.Item = request.node
    return item.stash.get(FAILED, False)
