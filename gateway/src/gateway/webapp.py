"""What the gateway serves itself for people: the web client at `/` and the
API docs at `/docs`, both working offline, and the security headers every
one of the gateway's own responses carries.

The web client is plain ES modules under `web/` (no build step): the gateway
answers the client's page paths with `web/index.html`, and the client routes
by `location.pathname`. Swagger UI's files come from the `swagger-ui-bundle-v2`
wheel, so `/docs` needs no CDN. Neither page runs an inline script, which lets
the Content-Security-Policy forbid them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, FastAPI
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

WEB_ROOT = Path(__file__).parent / "web"
# The client's own page paths (see web/assets/js/main.js); each answers the one
# HTML page. None starts with a proxied prefix (/auth, /catalog, /chat).
PAGE_PATHS = (
    "/",
    "/login",
    "/signup",
    "/password/forgot",
    "/password/reset",
    "/email/verify",
    "/products/new",
    "/products/{product_id}",
    "/rooms",
    "/rooms/{room}",
)
# Files are not fingerprinted (there is no build), so browsers revalidate them
# with their ETag on every use: a deploy is picked up at once, a 304 is cheap.
REVALIDATE = "no-cache"

_COMMON_POLICY = (
    "default-src 'self'",
    "script-src 'self'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
)
APP_POLICY = "; ".join((*_COMMON_POLICY, "style-src 'self'"))
# Swagger UI (React) sets style attributes on its elements; scripts stay 'self'.
DOCS_POLICY = "; ".join((*_COMMON_POLICY, "style-src 'self' 'unsafe-inline'"))


def content_security_policy(path: str) -> str:
    return DOCS_POLICY if path == "/docs" or path.startswith("/docs/") else APP_POLICY


class SecurityHeaders:
    """Adds the page security headers to every response of the wrapped app,
    unless the response set the header itself.

    `frame-ancestors 'none'` forbids framing (clickjacking); `X-Frame-Options`
    says the same to browsers without CSP level 2. `Referrer-Policy:
    no-referrer` keeps a reset token in the address bar out of any Referer.
    """

    def __init__(self, app: ASGIApp, *, policy: Callable[[str], str] = content_security_policy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [
            (b"content-security-policy", self.policy(scope["path"]).encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(header for header in extra if header[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RevalidatedFiles(StaticFiles):
    """Static files that browsers revalidate before each use."""

    def file_response(self, *args: object, **kwargs: object) -> Response:
        response = super().file_response(*args, **kwargs)  # type: ignore[arg-type]
        response.headers["Cache-Control"] = REVALIDATE
        return response


def install_web(api: FastAPI) -> None:
    """The client's pages and files (`/assets`), the docs page and Swagger UI's
    files (`/docs/assets`, from its wheel); none of them in the OpenAPI."""
    index = WEB_ROOT / "index.html"
    docs = WEB_ROOT / "docs.html"

    async def page() -> FileResponse:
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": REVALIDATE})

    async def swagger_ui() -> FileResponse:
        return FileResponse(docs, media_type="text/html", headers={"Cache-Control": REVALIDATE})

    router = APIRouter(include_in_schema=False)
    for path in PAGE_PATHS:
        router.add_api_route(path, page, methods=["GET", "HEAD"])
    router.add_api_route("/docs", swagger_ui, methods=["GET", "HEAD"])
    api.include_router(router)
    api.mount("/assets", RevalidatedFiles(directory=WEB_ROOT / "assets"), name="assets")
    swagger_files = RevalidatedFiles(directory=Path(str(swagger_ui_path)))
    api.mount("/docs/assets", swagger_files, name="docs-assets")
