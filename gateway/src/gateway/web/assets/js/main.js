// The client's entry point: the header, a router on location.pathname (the
// gateway answers every page path with this page), and the session.

import { fill, h } from "./dom.js";
import { Session } from "./session.js";
import { forgotView, logInView, resetView, signUpView, verifyView } from "./views/account.js";
import { catalogView, newProductView, productView } from "./views/catalog.js";
import { roomsView, roomView } from "./views/chat.js";

// [pattern, view, title, needs a signed-in user]
const ROUTES = [
  [/^\/$/, catalogView, "Catalog", false],
  [/^\/login$/, logInView, "Log in", false],
  [/^\/signup$/, signUpView, "Create an account", false],
  [/^\/password\/forgot$/, forgotView, "Forgot your password?", false],
  [/^\/password\/reset$/, resetView, "Reset your password", false],
  [/^\/email\/verify$/, verifyView, "Verify your email address", false],
  [/^\/products\/new$/, newProductView, "New product", true],
  [/^\/products\/([^/]+)$/, productView, "Product", false],
  [/^\/rooms$/, roomsView, "Chat", true],
  [/^\/rooms\/([A-Za-z0-9_-]{1,64})$/, roomView, "Chat room", true],
];

const session = new Session();
const main = document.getElementById("main");
const nav = document.getElementById("account");
const notice = document.getElementById("notice");
let current = null;

function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", path);
  else history.pushState(null, "", path);
  render();
}

function say(text) {
  notice.textContent = text;
  notice.hidden = !text;
}

function render() {
  current?.dispose?.();
  current = null;
  const path = location.pathname;
  const match = ROUTES.map(([pattern, ...rest]) => [pattern.exec(path), ...rest]).find(([m]) => m);
  const params = match && decodedParams(match[0]);
  if (!params) {
    fill(main, h("h1", { tabindex: "-1" }, "Page not found"), h("a", { href: "/" }, "To the catalog"));
    document.title = "Not found · Bazaar";
    return;
  }
  const [found, view, title, needsUser] = match;
  if (needsUser && !session.signedIn) {
    navigate(`/login?next=${encodeURIComponent(path + location.search)}`, { replace: true });
    return;
  }
  document.title = `${title} · Bazaar`;
  const result = view({
    session,
    navigate,
    params,
    query: new URLSearchParams(location.search),
  });
  current = result instanceof Node ? { element: result } : result;
  fill(main, current.element);
  markCurrentLink(path);
  main.querySelector("h1")?.focus({ preventScroll: true });
}

/** A route's parameters decoded, or null for a malformed escape ("%E0"): not found. */
function decodedParams(found) {
  try {
    return found.slice(1).map(decodeURIComponent);
  } catch {
    return null;
  }
}

function markCurrentLink(path) {
  for (const link of document.querySelectorAll("header nav a")) {
    const target = link.getAttribute("href");
    const active = target === "/" ? path === "/" || path.startsWith("/products") : path.startsWith(target);
    if (active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function renderAccount() {
  if (session.signedIn) {
    const logOut = h("button", { type: "button", class: "link" }, "Log out");
    logOut.addEventListener("click", async () => {
      await session.logOut();
      say("You are logged out.");
      navigate("/login");
    });
    fill(nav, h("span", { class: "who" }, "Signed in as ", h("strong", {}, session.user.display_name)), logOut);
  } else {
    fill(nav, h("a", { href: "/login" }, "Log in"), h("a", { href: "/signup" }, "Sign up"));
  }
}

// same-origin links change the view without reloading the page
document.addEventListener("click", (event) => {
  const link = event.target.closest?.("a[href]");
  if (!link || event.defaultPrevented || event.button !== 0) return;
  if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey || link.target) return;
  if (link.getAttribute("href").startsWith("#")) return;
  const url = new URL(link.href);
  if (url.origin !== location.origin || url.pathname === "/docs") return;
  event.preventDefault();
  say("");
  navigate(url.pathname + url.search);
});
window.addEventListener("popstate", render);

session.addEventListener("change", renderAccount);
session.addEventListener("lost", () => {
  say("Your session has ended. Log in again to go on.");
  navigate(`/login?next=${encodeURIComponent(location.pathname + location.search)}`);
});

renderAccount();
await session.restore();
renderAccount();
render();
