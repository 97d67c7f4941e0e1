"""Hostile input, refused in one place: every request of every service, and
whatever a service parses by hand (cursors, chat frames).

PostgreSQL cannot store a NUL character, UTF-8 cannot encode a lone
surrogate, a BIGINT holds 64 bits and a btree entry about 2.7 kB; left to the
database, each of these used to surface as a 500, or as a 503 taken for an
outage. So before any route of any service runs, `screen_request` (a
dependency `kit.app.assemble` gives every route) refuses them with a 422
naming where each was, the same problem as any other validation error:

- a NUL character or a lone surrogate in any path, query, header, cookie or
  form value, and in any JSON string or object key;
- a path, query, header, cookie or form value longer than
  `MAX_PARAMETER_CHARS`, a JSON string or key longer than `MAX_JSON_STRING_CHARS`
  (a field's own, tighter `max_length` still applies after this);
- an integer outside the signed 64-bit range: any JSON number, and any path,
  query, header or cookie parameter a route declares as `int`;
- a JSON number that is not finite (`NaN`, `Infinity`, `1e999`), and JSON
  nested deeper than `MAX_JSON_DEPTH`.

Nothing here depends on how a route declared its fields, so a new route or a
new field is covered without being told. `json_errors` is the same check for
JSON a service parses itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, get_args

from fastapi import Depends, FastAPI, params
from fastapi.dependencies.utils import get_flat_params
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from starlette.requests import HTTPConnection, Request
from starlette.routing import Route

MAX_PARAMETER_CHARS = 8192
MAX_JSON_STRING_CHARS = 65_536
MAX_JSON_DEPTH = 32
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_SURROGATE = re.compile("[\ud800-\udfff]")
# what pydantic reads as an integer from text: "+12", " 1_000 ", "7.0"
_INTEGER_TEXT = re.compile(r"\s*([+-]?)([0-9_]+)(?:\.0*)?\s*")

Loc = tuple[str | int, ...]


def error(loc: Iterable[str | int], kind: str, message: str) -> dict[str, Any]:
    """One entry of a 422's `errors`, in pydantic's shape."""
    return {"loc": tuple(loc), "msg": message, "type": kind}


_TOO_DEEP = ("json_too_deep", f"JSON must not nest deeper than {MAX_JSON_DEPTH} levels")


def too_deep(loc: Iterable[str | int]) -> dict[str, Any]:
    """The error of JSON nested too deep; also for a text nested so deep that
    the parser itself gave up (`json.loads` raises RecursionError, not a
    ValueError, at about a thousand levels: far inside any size limit)."""
    return error(loc, *_TOO_DEEP)


def text_error(value: str, *, max_chars: int) -> tuple[str, str] | None:
    """`(type, message)` when the text is one no field here accepts, else None."""
    if len(value) > max_chars:
        return "string_too_long", f"String should have at most {max_chars} characters"
    if "\x00" in value:
        return "string_nul", "String must not contain NUL characters"
    if _SURROGATE.search(value):
        return "string_surrogate", "String must be valid Unicode (no lone surrogates)"
    return None


def integer_error(value: int) -> tuple[str, str] | None:
    if INT64_MIN <= value <= INT64_MAX:
        return None
    return "int_out_of_range", "Integer must fit in 64 bits (-2^63 .. 2^63-1)"


def integer_text_error(text: str) -> tuple[str, str] | None:
    """For a parameter declared `int`: refuses text that would parse to an
    integer beyond 64 bits. Text that is no integer at all is left to pydantic."""
    match = _INTEGER_TEXT.fullmatch(text)
    if match is None:
        return None
    digits = match.group(2).replace("_", "").lstrip("0")
    if len(digits) > 19:  # before int(): Python refuses to parse over 4300 digits
        return integer_error(INT64_MAX + 1)
    return integer_error(int(match.group(1) + (digits or "0")))


def json_errors(value: Any, loc: Loc = ("body",)) -> list[dict[str, Any]]:
    """Every string, key and number of a parsed JSON document that breaks a
    rule above, each located under `loc`. Iterative: depth is bounded here,
    not by the interpreter's stack."""
    found: list[dict[str, Any]] = []
    pending: list[tuple[Any, Loc]] = [(value, loc)]
    base = len(loc)
    while pending:
        item, where = pending.pop()
        if isinstance(item, str):
            problem = text_error(item, max_chars=MAX_JSON_STRING_CHARS)
        elif isinstance(item, bool) or item is None:
            problem = None
        elif isinstance(item, int):
            problem = integer_error(item)
        elif isinstance(item, float):
            problem = _float_error(item)
        elif len(where) - base >= MAX_JSON_DEPTH:
            problem = _TOO_DEEP
        elif isinstance(item, dict):
            problem = None
            for key, member in item.items():
                key_problem = text_error(str(key), max_chars=MAX_JSON_STRING_CHARS)
                if key_problem is not None:
                    found.append(error((*where, "<key>"), *key_problem))
                else:
                    pending.append((member, (*where, key)))
        elif isinstance(item, list):
            problem = None
            pending.extend((member, (*where, index)) for index, member in enumerate(item))
        else:
            problem = None
        if problem is not None:
            found.append(error(where, *problem))
    return found


def _float_error(value: float) -> tuple[str, str] | None:
    if not math.isfinite(value):
        return "number_not_finite", "Number must be finite"
    if abs(value) > INT64_MAX:
        return "number_out_of_range", "Number must lie within -2^63 .. 2^63"
    return None


# -- the dependency every route gets --------------------------------------------


@dataclass(frozen=True, slots=True)
class _RoutePlan:
    """What a route declares that the screen needs, worked out once per route."""

    int_parameters: tuple[tuple[str, str], ...]  # (where: path/query/header/cookie, name)
    json_body: bool
    form_body: bool


# by id (routes are not hashable), keeping the route so an id is never reused
_plans: dict[int, tuple[object, _RoutePlan]] = {}
_NO_PLAN = _RoutePlan((), json_body=False, form_body=False)


def _declares_int(annotation: Any) -> bool:
    if isinstance(annotation, type):
        return issubclass(annotation, int) and not issubclass(annotation, bool | Enum)
    return any(_declares_int(argument) for argument in get_args(annotation))


def _request_name(field: Any) -> str:
    info = field.field_info
    name: str = field.alias or field.name
    if isinstance(info, params.Header) and info.convert_underscores and name == field.name:
        return name.replace("_", "-")
    return name


def _plan(route: object) -> _RoutePlan:
    cached = _plans.get(id(route))
    if cached is not None and cached[0] is route:
        return cached[1]
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return _NO_PLAN
    int_parameters = tuple(
        (field.field_info.in_.value, _request_name(field))
        for field in get_flat_params(dependant)
        if isinstance(field.field_info, params.Param) and _declares_int(field.field_info.annotation)
    )
    body_field = getattr(route, "body_field", None)
    form = body_field is not None and isinstance(body_field.field_info, params.Form)
    plan = _RoutePlan(int_parameters, json_body=body_field is not None and not form, form_body=form)
    _plans[id(route)] = (route, plan)
    return plan


def _parameter_errors(where: str, values: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for name, value in values:
        if not isinstance(value, str):  # a path convertor's int, say
            continue
        problem = text_error(value, max_chars=MAX_PARAMETER_CHARS)
        if problem is not None:
            found.append(error((where, name), *problem))
    return found


def _int_parameter_errors(connection: HTTPConnection, plan: _RoutePlan) -> list[dict[str, Any]]:
    found = []
    for where, name in plan.int_parameters:
        texts: list[Any]
        if where == "path":
            texts = [connection.path_params.get(name)]
        elif where == "query":
            texts = connection.query_params.getlist(name)
        elif where == "header":
            texts = connection.headers.getlist(name)
        else:
            texts = [connection.cookies.get(name)]
        for text in texts:
            problem = integer_text_error(text) if isinstance(text, str) else None
            if problem is not None:
                found.append(error((where, name), *problem))
    return found


def _is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").partition(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


async def _body_errors(request: Request, plan: _RoutePlan) -> list[dict[str, Any]]:
    """The body as the route will read it; FastAPI parsed it before any
    dependency ran, so these calls return its cached copies."""
    if plan.form_body:
        form = await request.form()
        return _parameter_errors(
            "body", ((name, value) for name, value in form.multi_items() if isinstance(value, str))
        )
    if plan.json_body and _is_json(request.headers.get("content-type")) and await request.body():
        return json_errors(await request.json())
    return []


async def screen_request(connection: HTTPConnection) -> None:
    """Refuses the request (422 naming each offending field) before its route runs.

    The path and query string are scanned raw first: decoding can only yield
    a NUL from a `%00` (or a NUL), never a lone surrogate (Starlette decodes
    with replacement), and never a longer value; the values are looked at one
    by one only when the scan finds something. This keeps the screen to a
    few microseconds a request."""
    scope = connection.scope
    found: list[dict[str, Any]] = []
    path: str = scope["path"]
    if "\x00" in path or len(path) > MAX_PARAMETER_CHARS:
        found += _parameter_errors("path", connection.path_params.items())
    raw_query: bytes = scope["query_string"]
    if b"%00" in raw_query or b"\x00" in raw_query or len(raw_query) > MAX_PARAMETER_CHARS:
        found += _parameter_errors("query", connection.query_params.multi_items())
    for name, value in scope["headers"]:
        if len(value) > MAX_PARAMETER_CHARS or b"\x00" in value:
            text = value.decode("latin-1")
            problem = text_error(text, max_chars=MAX_PARAMETER_CHARS)
            if problem is not None:
                found.append(error(("header", name.decode("latin-1")), *problem))
    plan = _plan(scope.get("route"))
    if plan.int_parameters:
        found += _int_parameter_errors(connection, plan)
    if isinstance(connection, Request) and (plan.json_body or plan.form_body):
        found += await _body_errors(connection, plan)
    if found:
        if scope["type"] == "websocket":
            raise WebSocketRequestValidationError(found)
        raise RequestValidationError(found)


def install_screening(app: FastAPI) -> None:
    """Every route added to `app` from now on is screened first (a router's
    dependencies go to each route as it is added, or included). Raises if a
    route came first: it would silently go unscreened."""
    early = [route for route in app.router.routes if type(route) is not Route]
    if early:
        raise RuntimeError(
            "the input screen must be installed (kit.app.assemble called) before any route "
            f"is added; found {[getattr(route, 'path', route) for route in early]}"
        )
    app.router.dependencies.append(Depends(screen_request))
