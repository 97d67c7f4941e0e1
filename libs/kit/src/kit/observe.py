"""What the access log, the traces and the metrics say about one request: its
route template, and the user it was made for."""

from __future__ import annotations

from starlette.types import Scope

from kit.metrics import route_template

UNMATCHED = "unmatched"
ROUTE_TEMPLATE_KEY = "route_template"
"""Scope key an app that routes without Starlette (the gateway's proxy) sets."""
USER_ID_KEY = "user_id"
"""Key in `scope["state"]` (`request.state.user_id`) once a token was verified."""


def route_of(scope: Scope) -> str:
    """The route template (`/catalog/products/{product_id}`), never the raw path."""
    explicit = scope.get(ROUTE_TEMPLATE_KEY)
    if explicit is not None:
        return str(explicit)
    return route_template(scope)


def user_of(scope: Scope) -> str | None:
    state = scope.get("state")
    if not state:
        return None
    user_id = state.get(USER_ID_KEY)
    return None if user_id is None else str(user_id)


def remember_user(scope: Scope, user_id: str) -> None:
    """Records who a request is for, for its access log line."""
    scope.setdefault("state", {})[USER_ID_KEY] = user_id
