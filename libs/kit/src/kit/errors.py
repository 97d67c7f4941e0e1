"""Domain errors and their one mapping to RFC 9457 problem+json responses.

Services raise the plain exceptions below; they never pick status codes.
`install_problem_handlers` turns each into the one error format every service
and the gateway share.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from kit.context import request_id_var

PROBLEM_JSON = "application/problem+json"
logger = logging.getLogger("kit.errors")


class DomainError(Exception):
    """Base of every error a service raises on purpose."""

    status: ClassVar[int] = 400
    title: ClassVar[str] = "Bad request"
    slug: ClassVar[str] = "bad-request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = dict(headers or {})
        self.extensions = extensions


class Unauthenticated(DomainError):
    status, title, slug = 401, "Not authenticated", "unauthenticated"

    def __init__(self, detail: str | None = None, *, scheme: str = "Bearer") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": scheme})


class Forbidden(DomainError):
    status, title, slug = 403, "Forbidden", "forbidden"


class NotFound(DomainError):
    status, title, slug = 404, "Not found", "not-found"


class Conflict(DomainError):
    status, title, slug = 409, "Conflict", "conflict"


class PayloadTooLarge(DomainError):
    status, title, slug = 413, "Payload too large", "payload-too-large"


class PreconditionFailed(DomainError):
    status, title, slug = 412, "Precondition failed", "precondition-failed"


class PreconditionRequired(DomainError):
    status, title, slug = 428, "Precondition required", "precondition-required"


class InvalidInput(DomainError):
    """Input that passed parsing but breaks a rule; `errors` names the fields."""

    status, title, slug = 422, "Validation failed", "validation-failed"

    def __init__(self, detail: str | None = None, *, errors: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(detail, errors=[dict(error) for error in errors])


class RateLimited(DomainError):
    status, title, slug = 429, "Too many requests", "rate-limited"

    def __init__(self, detail: str | None = None, *, retry_after: int) -> None:
        retry_after = max(1, retry_after)
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, retry_after=retry_after)


class BadGateway(DomainError):
    status, title, slug = 502, "Bad gateway", "bad-gateway"


class ServiceUnavailable(DomainError):
    """Cannot be served right now; always says when to retry (`Retry-After`, 1 s
    unless the raiser knows better)."""

    status, title, slug = 503, "Service unavailable", "service-unavailable"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail, headers={"Retry-After": "1", **(headers or {})}, **extensions)


class GatewayTimeout(DomainError):
    status, title, slug = 504, "Gateway timeout", "gateway-timeout"


def problem_type(slug: str) -> str:
    return f"urn:problem-type:{slug}"


def problem_body(
    *, status: int, title: str, slug: str, detail: str, **extensions: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": problem_type(slug),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request_id_var.get(),
    }
    body.update(extensions)
    return body


def problem_response(
    *,
    status: int,
    title: str,
    slug: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body = problem_body(status=status, title=title, slug=slug, detail=detail, **extensions)
    return JSONResponse(
        jsonable_encoder(body), status_code=status, headers=headers, media_type=PROBLEM_JSON
    )


def domain_error_response(error: DomainError) -> JSONResponse:
    return problem_response(
        status=error.status,
        title=error.title,
        slug=error.slug,
        detail=error.detail,
        headers=error.headers,
        **error.extensions,
    )


def validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's error list, cut down to what a client can act on (no echoed input)."""
    return [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in errors
    ]


def validation_problem(errors: Sequence[Any]) -> JSONResponse:
    cleaned = validation_errors(errors)
    fields = ", ".join(".".join(str(part) for part in error["loc"]) for error in cleaned)
    return problem_response(
        status=422,
        title=InvalidInput.title,
        slug=InvalidInput.slug,
        detail=f"Invalid input: {fields}" if fields else "Invalid input",
        errors=cleaned,
    )


_STATUS_SLUGS = {
    400: ("Bad request", "bad-request"),
    401: ("Not authenticated", "unauthenticated"),
    403: ("Forbidden", "forbidden"),
    404: ("Not found", "not-found"),
    405: ("Method not allowed", "method-not-allowed"),
    406: ("Not acceptable", "not-acceptable"),
    413: ("Payload too large", "payload-too-large"),
    415: ("Unsupported media type", "unsupported-media-type"),
}


async def _on_domain_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, DomainError)
    return domain_error_response(error)


async def _on_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError | WebSocketRequestValidationError)
    return validation_problem(error.errors())


async def _on_http_exception(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    title, slug = _STATUS_SLUGS.get(error.status_code, ("Error", f"http-{error.status_code}"))
    detail = error.detail if isinstance(error.detail, str) else title
    return problem_response(
        status=error.status_code, title=title, slug=slug, detail=detail, headers=error.headers
    )


# Exceptions (by class name, so kit needs neither driver) that mean "PostgreSQL
# or Redis is restarting or unreachable", that PostgreSQL rolled the
# transaction back to untangle it from another (a deadlock, a serialization
# failure: SQLSTATE class 40), or that it cancelled a statement that ran past
# the statement timeout (57014): a retry will do, nothing was written.
_OUTAGE_NAMES = frozenset(
    {
        "TransactionRollbackError",
        "QueryCanceledError",
        "InternalClientError",
        "AdminShutdownError",
        "CannotConnectNowError",
        "ConnectionDoesNotExistError",
        "PostgresConnectionError",
        "TooManyConnectionsError",
        "OperationalError",
        "InterfaceError",
        "ConnectionError",
        "TimeoutError",
        "BusyLoadingError",
    }
)
# SQLSTATE classes that mean "the database refused a value of this request":
# 22 data exception (a NUL byte, a number out of range, bad text for a type),
# 54 program limit exceeded (a value too large to index).
_DATA_SQLSTATE_CLASSES = ("22", "54")


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps (SQLAlchemy's `orig`, causes, contexts), at most nine."""
    found: list[BaseException] = []
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending and len(found) < 9:
        candidate = pending.pop()
        if candidate is None or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        found.append(candidate)
        pending += [getattr(candidate, "orig", None), candidate.__cause__, candidate.__context__]
    return found


def is_data_error(error: BaseException) -> bool:
    """Whether the database (or its driver, before sending) refused a value of
    the request: the client's input, not an outage and not a bug."""
    for candidate in _causes(error):
        sqlstate = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_DATA_SQLSTATE_CLASSES):
            return True
        # asyncpg's client-side DataError (a value it cannot encode, e.g. an
        # integer beyond 64 bits) subclasses InterfaceError, its server-side
        # one (sqlstate class 22) PostgresError: both are named DataError
        if any(cls.__name__ == "DataError" for cls in type(candidate).__mro__):
            return True
    return False


def is_outage(error: BaseException) -> bool:
    """Whether `error` (or what it wraps) is a lost or refused connection."""
    if is_data_error(error):
        return False
    for candidate in _causes(error):
        if getattr(candidate, "connection_invalidated", False) or isinstance(candidate, OSError):
            return True
        if any(cls.__name__ in _OUTAGE_NAMES for cls in type(candidate).__mro__):
            return True
    return False


def data_error_response(error: BaseException) -> JSONResponse:
    """A 422 for a value the database refused. The field cannot be named (the
    driver knows only a statement's argument number), and the database's own
    message may quote the input, so neither is echoed."""
    logger.warning("database refused a value: %s: %s", type(error).__name__, error)
    message = "A value is out of range, too long, or holds characters that cannot be stored"
    return problem_response(
        status=422,
        title=InvalidInput.title,
        slug=InvalidInput.slug,
        detail="Invalid input: a value the database cannot take",
        errors=[{"loc": ["request"], "msg": message, "type": "value_refused"}],
    )


def internal_error_response(error: BaseException) -> JSONResponse:
    """A logged 500 that reveals nothing of the failure but the request id."""
    logger.error("unhandled error", exc_info=error)
    return problem_response(
        status=500,
        title="Internal server error",
        slug="internal",
        detail="The server failed to handle this request; it has been logged.",
    )


def outage_response(error: BaseException) -> JSONResponse:
    logger.warning("dependency unavailable: %s: %s", type(error).__name__, error)
    return domain_error_response(
        ServiceUnavailable(
            "A dependency is briefly unavailable; retry", headers={"Retry-After": "1"}
        )
    )


def unexpected_error_response(error: BaseException) -> JSONResponse:
    """An exception no handler claimed: a refused value (422), a dependency
    outage (503), or a bug (500)."""
    if is_data_error(error):
        return data_error_response(error)
    if is_outage(error):
        return outage_response(error)
    return internal_error_response(error)


async def _on_unexpected(request: Request, error: Exception) -> JSONResponse:
    return unexpected_error_response(error)


def _dependency_error_classes() -> list[type[Exception]]:
    """The driver errors a lost PostgreSQL or Redis connection surfaces as.
    Handled inside the middleware stack, so the 503 still carries the
    request id and timing headers; imported only where the driver is installed."""
    classes: list[type[Exception]] = [OSError]
    with contextlib.suppress(ImportError):
        from redis.exceptions import RedisError

        classes.append(RedisError)
    with contextlib.suppress(ImportError):
        from sqlalchemy.exc import DBAPIError
        from sqlalchemy.exc import TimeoutError as PoolTimeout

        classes += [DBAPIError, PoolTimeout]
    with contextlib.suppress(ImportError):
        import asyncpg

        # PostgresError: whatever the server refuses on a statement run on
        # the driver itself (a value out of range: 422), not through SQLAlchemy
        classes += [asyncpg.PostgresError, asyncpg.InterfaceError]
    return classes


def _database_error_classes() -> list[type[Exception]]:
    """What a lost or refused PostgreSQL connection surfaces as on a request's
    own path: SQLAlchemy's DBAPIError, asyncpg's connection errors, a socket's."""
    classes: list[type[Exception]] = [OSError]
    with contextlib.suppress(ImportError):
        from sqlalchemy.exc import DBAPIError

        classes.append(DBAPIError)
    with contextlib.suppress(ImportError):
        import asyncpg

        classes.append(asyncpg.PostgresConnectionError)
    return classes


def _database_outage_handler(
    problem: Callable[[], DomainError],
) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def on_database_error(request: Request, error: Exception) -> JSONResponse:
        if is_outage(error):
            logger.warning("database unreachable: %s", error)
            return domain_error_response(problem())
        return unexpected_error_response(error)

    return on_database_error


def install_problem_handlers(
    app: FastAPI, *, database_outage: Callable[[], DomainError] | None = None
) -> None:
    """Every error as problem+json. `database_outage`: the problem an app whose
    requests need only its database answers when PostgreSQL is unreachable, in
    its own words, instead of "a dependency is briefly unavailable"."""
    app.add_exception_handler(DomainError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(WebSocketRequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
    for error_class in _dependency_error_classes():
        app.add_exception_handler(error_class, _on_unexpected)
    app.add_exception_handler(Exception, _on_unexpected)
    if database_outage is not None:
        on_database_error = _database_outage_handler(database_outage)
        for error_class in _database_error_classes():
            app.add_exception_handler(error_class, on_database_error)
