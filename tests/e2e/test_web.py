"""The web client in a real Chromium, through the gateway of the compose stack.

One browser for the whole run; each test opens its own contexts (a context is
a separate person: its own cookies and storage). Every page visited is checked
with axe-core (no serious or critical violation) and for script errors and
Content-Security-Policy refusals. When a test fails, each of its pages leaves
a screenshot and its console log under tests/e2e/artifacts/<test>/.

The browser: `BROWSER_EXECUTABLE`, else `chromium` on the PATH (Debian's
package, which `make e2e` installs when it is missing), else Playwright's own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
from playwright.async_api import Error as PlaywrightError

from kit_testing import emailed_token

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, ROOT, Stack
from .failures import failed
from .helpers import bearer, login, register

ARTIFACTS = Path(__file__).parent / "artifacts"
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
# headless on a closed network: no GPU, no QUIC, and none of Chromium's own
# background connections (updates, sync), which this network refuses
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# how long an action or an expectation waits: a sign-up hashes a password
# twice with argon2id, and this machine is shared
WAIT_MS = 20_000
expect.set_options(timeout=WAIT_MS)


def browser_executable() -> str | None:
    """None lets Playwright use its own downloaded browser."""
    return (
        os.environ.get("BROWSER_EXECUTABLE")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=browser_executable(), args=BROWSER_ARGS
        )
        yield launched
        await launched.close()


@dataclass
class Tab:
    """One person's browser window, with what its page said."""

    name: str
    context: BrowserContext
    page: Page
    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def refusals(self) -> list[str]:
        return [line for line in self.console if "Content Security Policy" in line]


OpenTab = Callable[[str], Awaitable[Tab]]


@pytest.fixture
async def tabs(
    browser: Browser, stack: Stack, request: pytest.FixtureRequest
) -> AsyncIterator[OpenTab]:
    opened: list[Tab] = []

    async def open_tab(name: str) -> Tab:
        context = await browser.new_context(base_url=stack.base_url)
        # axe-core arrives through the browser's own channel, so the pages'
        # policy (no inline or foreign scripts) still holds for everything else
        await context.add_init_script(path=str(AXE))
        context.set_default_timeout(WAIT_MS)
        page = await context.new_page()
        tab = Tab(name, context, page)
        page.on("console", lambda message: tab.console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: tab.page_errors.append(str(error)))
        opened.append(tab)
        return tab

    try:
        yield open_tab
    finally:
        if failed(request):
            await save_artifacts(request.node.name, opened)
        for tab in opened:
            await tab.context.close()


async def save_artifacts(test: str, opened: list[Tab]) -> None:
    folder = ARTIFACTS / re.sub(r"[^\w.-]", "_", test)
    folder.mkdir(parents=True, exist_ok=True)
    for tab in opened:
        try:
            await tab.page.screenshot(path=str(folder / f"{tab.name}.png"), full_page=True)
        except PlaywrightError as error:  # the page may be gone; the log still helps
            tab.console.append(f"(no screenshot: {error})")
        lines = [
            f"url: {tab.page.url}",
            *tab.console,
            *map("page error: {}".format, tab.page_errors),
        ]
        (folder / f"{tab.name}.console.log").write_text("\n".join(lines) + "\n")
    print(f"screenshots and console logs in {folder}")  # noqa: T201 - shown with the failure


async def check_page(tab: Tab) -> None:
    """No serious or critical axe violation, no script error, no CSP refusal."""
    violations = await tab.page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ["violations"]})).violations
            .filter((v) => v.impact === "serious" || v.impact === "critical")
            .map((v) => ({id: v.id, impact: v.impact, nodes: v.nodes.map((n) => n.target)}))"""
    )
    assert violations == [], (tab.page.url, violations)
    assert tab.page_errors == [], tab.page_errors
    assert tab.refusals() == [], tab.refusals()


def unique_email() -> str:
    return f"web-{uuid.uuid4().hex[:10]}@example.com"


def letters(count: int = 8) -> str:
    return "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:count])


async def log_in(tab: Tab, email: str, password: str) -> None:
    page = tab.page
    await page.goto("/login")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("button", name="Log out")).to_be_visible()


def field_error(page: Page, name: str) -> Any:
    return page.locator(f"#field-{name}-error")


async def test_sign_up_log_in_and_out(tabs: OpenTab) -> None:
    tab = await tabs("person")
    page = tab.page
    email = unique_email()

    await page.goto("/signup")
    await check_page(tab)
    await page.get_by_label("Name").fill("Ada Web")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill("short")
    await page.get_by_role("button", name="Create account").click()
    # the 422 names the field: its message stands under it
    await expect(field_error(page, "password")).to_be_visible()
    await expect(page.get_by_label("Password")).to_have_attribute("aria-invalid", "true")
    await check_page(tab)

    await page.get_by_label("Password").fill("a long enough password")
    await page.get_by_role("button", name="Create account").click()
    await expect(page.get_by_text("Signed in as Ada Web")).to_be_visible()
    await expect(page).to_have_url(re.compile(r"/$"))

    # the refresh token is an HttpOnly cookie for the refresh path only
    [cookie] = [c for c in await tab.context.cookies() if c["name"] == "bazaar_refresh"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/auth/refresh"
    assert "bazaar_refresh" not in await page.evaluate("document.cookie")

    # a reload keeps the session (the access token lived only in memory)
    await page.reload()
    await expect(page.get_by_text("Signed in as Ada Web")).to_be_visible()

    await page.get_by_role("button", name="Log out").click()
    await expect(page.get_by_text("You are logged out.")).to_be_visible()
    await expect(page).to_have_url(re.compile(r"/login$"))
    assert [c for c in await tab.context.cookies() if c["name"] == "bazaar_refresh"] == []
    await check_page(tab)

    # a taken email is a 409: its message stands under the email field
    await page.goto("/signup")
    await page.get_by_label("Name").fill("Ada Again")
    await page.get_by_label("Email").fill(email.upper())
    await page.get_by_label("Password").fill("another long password")
    await page.get_by_role("button", name="Create account").click()
    await expect(field_error(page, "email")).to_be_visible()

    await page.goto("/login")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill("not the password")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.locator(".form-error")).to_be_visible()
    await check_page(tab)
    await log_in(tab, email, "a long enough password")
    await page.reload()
    await expect(page.get_by_text("Signed in as Ada Web")).to_be_visible()


async def test_catalog_search_filters_and_pages(tabs: OpenTab, client: httpx.AsyncClient) -> None:
    admin = bearer((await login(client, ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])
    tag = "web" + letters(6)
    for index in range(14):
        response = await client.post(
            "/catalog/products",
            json={"name": f"Item {letters(6)}", "price": f"{index + 1}.25", "tags": [tag]},
            headers=admin,
        )
        assert response.status_code == 201, response.text
    tab = await tabs("shopper")
    page = tab.page

    await page.goto("/")
    await check_page(tab)
    filters = page.get_by_role("search")
    await filters.get_by_label("Tags").fill(tag)
    await filters.get_by_label("Highest price").fill("13.25")
    await filters.get_by_label("Sort by").select_option("-price")
    await filters.get_by_role("button", name="Search").click()

    cards = page.locator("li.product")
    await expect(cards).to_have_count(12)
    await expect(page.get_by_text("Showing 12 products.")).to_be_visible()
    await page.get_by_role("button", name="Load more").click()
    await expect(cards).to_have_count(13)
    await expect(page.get_by_text("Showing 13 products, all there are.")).to_be_visible()
    await expect(page.get_by_role("button", name="Load more")).to_be_hidden()
    prices = await cards.locator(".price").all_inner_texts()
    assert prices == [f"{n}.25" for n in range(13, 0, -1)]
    assert "tag=" in page.url
    assert "max_price=13.25" in page.url

    # a bad filter is a 422 shown by the field it names
    await filters.get_by_label("Lowest price").fill("20")
    await filters.get_by_role("button", name="Search").click()
    await expect(
        page.locator(".filters .field-error:visible, .filters .form-error:visible")
    ).to_have_count(1)

    await page.goto(f"/?tag={tag}&sort=price")
    first = page.locator("li.product a").first
    await expect(first).to_have_text(re.compile(r"^Item "))
    name = await first.inner_text()
    await first.click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(name)
    await expect(page.locator('dd[data-field="price"]')).to_have_text("1.25")
    await expect(page.get_by_text("1.38")).to_be_visible()  # with tax
    await check_page(tab)


async def test_admin_creates_a_product_and_resolves_a_stale_edit(
    tabs: OpenTab, client: httpx.AsyncClient
) -> None:
    tab = await tabs("admin")
    page = tab.page
    await log_in(tab, ADMIN_EMAIL, ADMIN_PASSWORD)
    await page.get_by_role("link", name="New product").click()
    await expect(page).to_have_url(re.compile(r"/products/new$"))
    await check_page(tab)

    await page.get_by_label("Name").fill("R2D2")
    await page.get_by_label("Price").fill("-1")
    await page.get_by_role("button", name="Create product").click()
    await expect(field_error(page, "name")).to_contain_text("digits")
    await expect(field_error(page, "price")).to_be_visible()
    await check_page(tab)

    name = f"Lamp {letters()}"
    await page.get_by_label("Name").fill(name)
    await page.get_by_label("Price").fill("19.90")
    await page.get_by_label("Tags").fill("home, light")
    await page.get_by_role("button", name="Create product").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(name.title())
    product_id = page.url.rsplit("/", 1)[1]
    await expect(page.locator('dd[data-field="version"]')).to_have_text("1")

    # someone else edits the product while this page still shows version 1
    admin = bearer((await login(client, ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])
    other = await client.patch(
        f"/catalog/products/{product_id}",
        json={"tags": ["home", "light", "desk"]},
        headers={**admin, "If-Match": '"1"'},
    )
    assert other.status_code == 200, other.text

    editor = page.locator(".editor")
    await editor.get_by_label("Price").fill("42.00")
    await editor.get_by_role("button", name="Save changes").click()
    conflict = page.locator(".conflict")
    await expect(conflict).to_contain_text("Someone else changed this product")
    await expect(conflict).to_contain_text("version 2")
    await expect(page.locator('dd[data-field="tags"]')).to_have_text("home, light, desk")
    await check_page(tab)
    await conflict.get_by_role("button", name="Re-apply my changes to version 2").click()
    await expect(page.get_by_text("Saved: version 3.")).to_be_visible()
    await expect(conflict).to_be_hidden()

    saved = (await client.get(f"/catalog/products/{product_id}")).json()
    assert (saved["price"], saved["tags"], saved["version"]) == (
        "42.00",
        ["home", "light", "desk"],
        3,
    )


async def chat_ids(page: Page) -> list[int]:
    return [
        int(i)
        for i in await page.locator("ol.messages > li").evaluate_all(
            "(items) => items.map((item) => item.dataset.id)"
        )
    ]


async def chat_texts(page: Page) -> list[str]:
    return await page.locator("ol.messages > li .text").all_inner_texts()


async def send(page: Page, text: str) -> None:
    await page.get_by_label("Message", exact=True).fill(text)
    await page.get_by_role("button", name="Send").click()


async def open_room(tab: Tab, room: str) -> str:
    await tab.page.goto(f"/rooms/{room}")
    connection = tab.page.locator(".connection")
    await expect(connection).to_have_attribute("data-state", "open")
    node = await connection.get_attribute("data-node")
    assert node
    return node


async def test_chat_between_two_people_survives_a_killed_replica(
    tabs: OpenTab, healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    people = [await register(client), await register(client)]
    ada, bob = await tabs("ada"), await tabs("bob")
    for tab, person in zip((ada, bob), people, strict=True):
        await log_in(tab, person["email"], person["password"])
    room = f"web-{letters()}"
    ada_node = await open_room(ada, room)
    deadline = time.monotonic() + 30
    while await open_room(bob, room) == ada_node:
        assert time.monotonic() < deadline, "every socket reached one replica"
    for tab in (ada, bob):
        await expect(tab.page.locator(".presence li")).to_have_count(2)
    await check_page(ada)

    sent: list[str] = []
    for number in range(2):
        for tab in (ada, bob):
            text = f"{tab.name} before {number}"
            sent.append(text)
            await send(tab.page, text)
            await expect(ada.page.locator("ol.messages > li")).to_have_count(len(sent))
    await expect(bob.page.locator("ol.messages > li")).to_have_count(len(sent))

    # every state ada's connection takes from here on
    await ada.page.evaluate(
        """() => {
            const status = document.querySelector(".connection");
            window.connectionStates = [];
            new MutationObserver(() => window.connectionStates.push(status.dataset.state))
                .observe(status, {attributes: true, attributeFilter: ["data-state"]});
        }"""
    )
    await asyncio.to_thread(_docker, "kill", ada_node)
    for tab in (ada, bob):
        text = f"{tab.name} while a replica is down"
        sent.append(text)
        await send(tab.page, text)
    await ada.page.wait_for_function(
        # a function, not an expression: the page's policy forbids eval
        "() => window.connectionStates.includes('reconnecting')"
        " && document.querySelector('.connection').dataset.state === 'open'",
        timeout=45_000,
    )
    assert await ada.page.locator(".connection").get_attribute("data-node") != ada_node
    for tab in (ada, bob):
        text = f"{tab.name} after"
        sent.append(text)
        await send(tab.page, text)

    for tab in (ada, bob):
        await expect(tab.page.locator("ol.messages > li")).to_have_count(len(sent), timeout=45_000)
        await expect(tab.page.locator("ul.outbox > li")).to_have_count(0)
    ids = await chat_ids(ada.page)
    assert ids == list(range(ids[0], ids[0] + len(sent)))
    assert await chat_ids(bob.page) == ids
    texts = await chat_texts(ada.page)
    assert await chat_texts(bob.page) == texts
    assert sorted(texts) == sorted(sent)
    assert texts[:4] == sent[:4]
    await check_page(bob)

    await bob.page.get_by_role("button", name="Log out").click()
    await expect(bob.page).to_have_url(re.compile(r"/login$"))


async def test_password_reset_from_the_emailed_link_ends_other_sessions(
    tabs: OpenTab, stack: Stack, client: httpx.AsyncClient
) -> None:
    person = await register(client)
    elsewhere = await tabs("elsewhere")
    await log_in(elsewhere, person["email"], person["password"])
    await open_room(elsewhere, f"reset-{letters()}")

    tab = await tabs("resetter")
    page = tab.page
    await page.goto("/login")
    await page.get_by_role("link", name="Forgot your password?").click()
    await check_page(tab)
    await page.get_by_label("Email").fill(person["email"])
    await page.get_by_role("button", name="Email me a reset link").click()
    await expect(page.get_by_text("a link to reset its password is on its way")).to_be_visible()

    # the email goes out after the response, over SMTP to the suite's catcher
    emails = await stack.mail.wait_for(person["email"], count=2)  # welcome, reset
    (reset_email,) = [e for e in emails if e["Subject"] == "Reset your Bazaar password"]
    token = emailed_token(reset_email)
    # the web client's page on the public address (PUBLIC_BASE_URL)
    assert f"{stack.base_url}/password/reset?token={token}" in reset_email.get_content()

    await page.goto(f"/password/reset?token={token}")
    # the token leaves the address bar (and so the history) at once
    await expect(page).to_have_url(re.compile(r"/password/reset$"))
    await check_page(tab)
    await page.get_by_label("New password", exact=True).fill("short")
    await page.get_by_label("Repeat the new password").fill("short")
    await page.get_by_role("button", name="Set the new password").click()
    await expect(field_error(page, "password")).to_be_visible()
    await page.get_by_label("New password", exact=True).fill("a brand new password")
    await page.get_by_label("Repeat the new password").fill("a brand new passwort")
    await page.get_by_role("button", name="Set the new password").click()
    await expect(field_error(page, "repeat")).to_have_text("The two passwords differ.")
    await page.get_by_label("Repeat the new password").fill("a brand new password")
    await page.get_by_role("button", name="Set the new password").click()
    await expect(page.get_by_text("every session of the account has ended")).to_be_visible()
    await check_page(tab)

    # the other window's session is over: its chat socket is closed, the
    # refresh is refused, and the user is sent back to log in
    await expect(elsewhere.page).to_have_url(re.compile(r"/login\?next="), timeout=45_000)
    await expect(elsewhere.page.get_by_text("Your session has ended")).to_be_visible()

    await page.get_by_role("link", name="Log in with the new password").click()
    await log_in(tab, person["email"], "a brand new password")

    # a used link says so, next to nothing but the form
    await page.goto(f"/password/reset?token={token}")
    await page.get_by_label("New password", exact=True).fill("yet another password")
    await page.get_by_label("Repeat the new password").fill("yet another password")
    await page.get_by_role("button", name="Set the new password").click()
    await expect(page.locator(".form-error")).to_contain_text("already used")


async def test_the_emailed_link_verifies_the_address(
    tabs: OpenTab, stack: Stack, client: httpx.AsyncClient
) -> None:
    person = await register(client)
    (welcome,) = await stack.mail.wait_for(person["email"])
    token = emailed_token(welcome)
    link = f"{stack.base_url}/email/verify?token={token}"
    assert link in welcome.get_content()  # the web client's page on the public address

    tab = await tabs("verifier")
    page = tab.page
    await log_in(tab, person["email"], person["password"])
    await page.goto(link)
    # the token leaves the address bar at once, and nothing is spent on load
    await expect(page).to_have_url(re.compile(r"/email/verify$"))
    await check_page(tab)
    await page.get_by_role("button", name="Confirm my email address").click()
    await expect(page.get_by_text("Your email address is verified.")).to_be_visible()
    fresh = await login(client, person["email"], person["password"])
    assert claims(fresh["access_token"])["email_verified"] is True

    # the link works once; a spent one offers a new email
    await page.goto(link)
    await page.get_by_role("button", name="Confirm my email address").click()
    await expect(page.get_by_text("invalid, expired or already used")).to_be_visible()
    await page.get_by_label("Email").fill(person["email"])
    await page.get_by_role("button", name="Email me a new link").click()
    await expect(page.get_by_text("a new link is on its way")).to_be_visible()
    await check_page(tab)


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


async def test_docs_render_offline(tabs: OpenTab) -> None:
    tab = await tabs("reader")
    requests: list[str] = []
    tab.page.on("request", lambda request: requests.append(request.url))

    await tab.page.goto("/docs")

    await expect(tab.page.locator(".opblock-tag-section").first).to_be_visible()
    await expect(tab.page.get_by_text("/catalog/products/{product_id}").first).to_be_visible()
    origin = tab.page.url.rsplit("/docs", 1)[0]
    assert [url for url in requests if not url.startswith(origin)] == []
    assert tab.page_errors == []
    assert tab.refusals() == []


async def test_a_malformed_address_is_a_page_not_found(tabs: OpenTab) -> None:
    """A route whose parameter is not a valid escape ("%E0") cannot be decoded:
    the page says so, rather than staying on "Loading…" with a script error."""
    tab = await tabs("stray")
    await tab.page.goto("/products/%E0")
    await expect(tab.page.get_by_role("heading", name="Page not found")).to_be_visible()
    assert tab.page_errors == []


def _docker(*args: str) -> None:
    subprocess.run(["docker", *args], check=True, capture_output=True)
