"""Auth's domain errors, on kit's status-mapped bases."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from redis.exceptions import RedisError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kit.errors import (
    Conflict,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    Unauthenticated,
    domain_error_response,
)

logger = logging.getLogger("auth.errors")


class EmailTaken(Conflict):
    def __init__(self) -> None:
        super().__init__("An account with this email already exists")


class InvalidCredentials(Unauthenticated):
    """One message for an unknown email, a wrong password and a disabled
    account, so the answer never tells which accounts exist."""

    def __init__(self) -> None:
        super().__init__("Incorrect email or password")


class InvalidRefreshToken(Unauthenticated):
    def __init__(self, detail: str = "Refresh token is invalid or expired") -> None:
        super().__init__(detail)


class UserNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("No such user")


class SelfLockout(Forbidden):
    def __init__(self) -> None:
        super().__init__("Admins cannot deactivate themselves or drop their own admin role")


_UNAVAILABLE = (OSError, OperationalError, InterfaceError, PoolTimeout, RedisError)


async def _on_dependency_down(request: Request, error: Exception) -> Response:
    logger.warning("dependency unavailable: %s: %s", type(error).__name__, error)
    return domain_error_response(
        ServiceUnavailable(
            "A backing service is unreachable; retry shortly", headers={"Retry-After": "1"}
        )
    )


def install_dependency_error_handlers(app: FastAPI) -> None:
    """PostgreSQL or Redis being down is a 503 to retry, not a 500 bug."""
    for error_class in _UNAVAILABLE:
        app.add_exception_handler(error_class, _on_dependency_down)
