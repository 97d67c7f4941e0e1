"""The web client and the docs page: served by the gateway itself, complete
offline (every file they load is the gateway's), with the page security
headers on the gateway's own responses and not on proxied ones."""

from __future__ import annotations

import re

import httpx
import pytest

from gateway.main import Gateway
from gateway.webapp import WEB_ROOT
from kit_testing import TokenMinter

from .conftest import gateway_settings, running_gateway

PAGES = ["/", "/login", "/signup", "/password/forgot", "/password/reset", "/rooms"]
PAGES += ["/rooms/lobby", "/products/new", "/products/6f1c56c4-3b5e-4a40-9a55-2f1f5d1c1e4b"]
SCRIPT_TAG = re.compile(r"<script\b([^>]*)>(.*?)</script>", re.DOTALL)
REFERENCE = re.compile(r"""(?:src|href)="([^"]+)\"""")
MODULE_IMPORT = re.compile(r"""^import .*? from "(\.[^"]+)";$""", re.MULTILINE)


@pytest.fixture
def edge(gateway: tuple[Gateway, httpx.AsyncClient]) -> httpx.AsyncClient:
    """A gateway whose catalog and chat pools are one fake upstream."""
    return gateway[1]


def policy(response: httpx.Response) -> dict[str, str]:
    directives = response.headers["content-security-policy"].split(";")
    return {name: value for name, _, value in (d.strip().partition(" ") for d in directives)}


@pytest.mark.parametrize("path", PAGES)
async def test_every_page_path_answers_the_client(edge: httpx.AsyncClient, path: str) -> None:
    response = await edge.get(path)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.text == (WEB_ROOT / "index.html").read_text()
    assert response.headers["cache-control"] == "no-cache"


async def test_pages_carry_the_security_headers(edge: httpx.AsyncClient) -> None:
    response = await edge.get("/")

    csp = policy(response)
    assert csp["script-src"] == "'self'"
    assert csp["style-src"] == "'self'"
    assert csp["default-src"] == "'self'"
    assert csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'"
    assert csp["object-src"] == "'none'"
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"


async def test_the_pages_run_no_inline_script_and_load_nothing_from_elsewhere(
    edge: httpx.AsyncClient,
) -> None:
    for path in ("/", "/docs"):
        html = (await edge.get(path)).text
        scripts = SCRIPT_TAG.findall(html)
        assert scripts
        for attributes, body in scripts:
            assert 'src="/' in attributes
            assert body.strip() == ""
        assert " style=" not in html
        for reference in REFERENCE.findall(html):
            if reference.startswith("#"):
                continue
            assert reference.startswith("/"), reference
            assert not reference.startswith("//"), reference
            loaded = await edge.get(reference)
            assert loaded.status_code == 200, reference


async def test_every_module_the_client_imports_is_served(edge: httpx.AsyncClient) -> None:
    pending = ["/assets/js/main.js"]
    seen: set[str] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        response = await edge.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "text/javascript; charset=utf-8"
        base = path.rsplit("/", 1)[0]
        for relative in MODULE_IMPORT.findall(response.text):
            parts = (base + "/" + relative).split("/")
            resolved: list[str] = []
            for part in parts:
                if part == "..":
                    resolved.pop()
                elif part != ".":
                    resolved.append(part)
            pending.append("/".join(resolved))
    assert {"/assets/js/chat-client.js", "/assets/js/session.js"} <= seen


async def test_files_are_revalidated_with_their_etag(edge: httpx.AsyncClient) -> None:
    first = await edge.get("/assets/app.css")
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("text/css")
    assert first.headers["cache-control"] == "no-cache"

    again = await edge.get("/assets/app.css", headers={"If-None-Match": first.headers["etag"]})

    assert again.status_code == 304


async def test_docs_use_swagger_ui_from_the_gateway(edge: httpx.AsyncClient) -> None:
    docs = await edge.get("/docs")
    bundle = await edge.get("/docs/assets/swagger-ui-bundle.js")
    css = await edge.get("/docs/assets/swagger-ui.css")
    init = await edge.get("/assets/js/docs.js")

    assert docs.status_code == 200
    assert '<script src="/docs/assets/swagger-ui-bundle.js"' in docs.text
    assert bundle.status_code == 200
    assert "SwaggerUIBundle" in bundle.text
    assert css.status_code == 200
    assert 'url: "/openapi.json"' in init.text
    # the password flow's form and tokens never go to localStorage
    assert "persistAuthorization: false" in init.text
    # Swagger UI sets style attributes; scripts stay the gateway's own
    csp = policy(docs)
    assert csp["style-src"] == "'self' 'unsafe-inline'"
    assert csp["script-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'"


async def test_unknown_paths_stay_problems(edge: httpx.AsyncClient) -> None:
    for path in ("/nowhere", "/assets/missing.js", "/products/1/edit", "/docs/assets/x.js"):
        response = await edge.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json", path
        assert response.headers["x-content-type-options"] == "nosniff"


async def test_proxied_responses_keep_their_own_headers(edge: httpx.AsyncClient) -> None:
    response = await edge.get("/catalog/echo")

    assert response.status_code == 200
    assert "content-security-policy" not in response.headers
    assert "x-frame-options" not in response.headers


async def test_page_writes_are_refused(redis_url: str, minter: TokenMinter) -> None:
    async with running_gateway(gateway_settings(redis_url), minter) as (_, client):
        response = await client.post("/login", data={"username": "a", "password": "b"})
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
