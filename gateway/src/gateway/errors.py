"""The gateway's own refusals, as problem+json for HTTP and for refused upgrades."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from kit.context import request_id_var
from kit.errors import DomainError, domain_error_response

WS_POLICY_VIOLATION = 1008
WS_TRY_AGAIN_LATER = 1013


def request_id(scope: Scope) -> str:
    """The id RequestIdMiddleware gave this request."""
    state = scope.get("state")
    found = state.get("request_id") if state else None
    return found or request_id_var.get() or ""


async def refuse(scope: Scope, receive: Receive, send: Send, error: DomainError) -> None:
    """Answers with the error before any upstream is involved.

    A refused WebSocket upgrade gets the same problem+json body when the server
    supports the ASGI denial-response extension, a close code otherwise.
    """
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get(
        "extensions", {}
    ):
        code = WS_POLICY_VIOLATION if error.status in (401, 403) else WS_TRY_AGAIN_LATER
        await send({"type": "websocket.close", "code": code, "reason": error.detail[:120]})
        return
    await domain_error_response(error)(scope, receive, send)
