// The web client's session against a scripted auth API and clock:
// `node --test gateway/tests/js` (run by `make unit`).
import assert from "node:assert/strict";
import { beforeEach, mock, test } from "node:test";

globalThis.CustomEvent ??= class extends Event {
  constructor(type, init = {}) {
    super(type);
    this.detail = init.detail;
  }
};
const stored = new Map();
globalThis.localStorage = {
  getItem: (key) => stored.get(key) ?? null,
  setItem: (key, value) => stored.set(key, String(value)),
  removeItem: (key) => stored.delete(key),
};

const { Session } = await import("../../src/gateway/web/assets/js/session.js");

/** The auth API as the session sees it: answers by path, records every call. */
class ScriptedAuth {
  constructor() {
    this.calls = [];
    this.issued = 0;
    this.refreshRefused = false;
    this.revoked = new Set();
  }

  pair() {
    this.issued += 1;
    return { access_token: `access-${this.issued}`, token_type: "bearer", expires_in: 100 };
  }

  async fetch(path, init) {
    this.calls.push({ path, method: init.method ?? "GET", headers: init.headers, body: init.body });
    const answer = (status, body) =>
      new Response(body === undefined ? null : JSON.stringify(body), { status });
    const bearer = init.headers.Authorization?.slice("Bearer ".length);
    if (path === "/auth/token") return answer(200, this.pair());
    if (path === "/auth/refresh") {
      return this.refreshRefused
        ? answer(401, { title: "Not authenticated", status: 401, detail: "Refresh token is invalid or expired" })
        : answer(200, this.pair());
    }
    if (this.revoked.has(bearer)) return answer(401, { title: "Not authenticated", status: 401, detail: "Token revoked" });
    if (path === "/auth/users/me") return answer(200, { id: "u1", display_name: "Ada", roles: ["user"] });
    if (path === "/auth/logout") return answer(204);
    return answer(200, { bearer });
  }

  paths() {
    return this.calls.map((call) => call.path);
  }
}

let auth;
beforeEach(() => {
  stored.clear();
  auth = new ScriptedAuth();
  globalThis.fetch = (path, init) => auth.fetch(path, init);
  mock.timers.reset();
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
});

const settle = async () => {
  for (let turn = 0; turn < 20; turn += 1) await new Promise((resolve) => setImmediate(resolve));
};

async function signedIn() {
  const session = new Session();
  const events = [];
  for (const type of ["change", "lost", "token"]) {
    session.addEventListener(type, () => events.push(type));
  }
  await session.logIn("ada@example.com", "a long password");
  return { session, events };
}

test("a login asks for the refresh token as a cookie and keeps the access token in memory", async () => {
  const { session } = await signedIn();
  const [login, me] = auth.calls;
  assert.equal(login.path, "/auth/token");
  assert.equal(login.headers["Refresh-Token-Delivery"], "cookie");
  assert.equal(String(login.body), "username=ada%40example.com&password=a+long+password");
  assert.equal(me.headers.Authorization, "Bearer access-1");
  assert.equal(session.user.display_name, "Ada");
  assert.equal(await session.token(), "access-1");
  assert.deepEqual([...stored.keys()], ["bazaar.signed-in"]);
});

test("the token is refreshed at 80% of its life, with the cookie and no body", async () => {
  const { session, events } = await signedIn();
  mock.timers.tick(79_000);
  await settle();
  assert.deepEqual(auth.paths(), ["/auth/token", "/auth/users/me"]);
  mock.timers.tick(1_000);
  await settle();
  const refresh = auth.calls.at(-1);
  assert.equal(refresh.path, "/auth/refresh");
  assert.equal(refresh.headers["Refresh-Token-Delivery"], "cookie");
  assert.equal(refresh.body, undefined);
  assert.equal(await session.token(), "access-2");
  assert.deepEqual(events, ["change", "token", "token"]);
});

test("a token about to expire is refreshed before it is used", async () => {
  const { session } = await signedIn();
  mock.timers.tick(79_000); // 21 s left, the timer has not fired yet
  mock.timers.tick(7_000);
  await settle();
  assert.equal(await session.token(), "access-2");
});

test("callers asking at once share one refresh", async () => {
  const { session } = await signedIn();
  const tokens = await Promise.all([session.token(true), session.token(true), session.token(true)]);
  assert.deepEqual(tokens, ["access-2", "access-2", "access-2"]);
  assert.equal(auth.paths().filter((path) => path === "/auth/refresh").length, 1);
});

test("a refused refresh ends the session and says so", async () => {
  const { session, events } = await signedIn();
  auth.refreshRefused = true;
  await assert.rejects(session.token(true));
  assert.equal(session.signedIn, false);
  assert.deepEqual(events.slice(-2), ["change", "lost"]);
  assert.equal(stored.size, 0);
  await assert.rejects(session.token());
});

test("a call refused with 401 is retried once with a fresh token", async () => {
  const { session } = await signedIn();
  auth.revoked.add("access-1");
  const { body } = await session.call("/catalog/products");
  assert.equal(body.bearer, "access-2");
  assert.deepEqual(auth.paths().slice(-3), ["/catalog/products", "/auth/refresh", "/catalog/products"]);
});

test("a reload restores the session from the cookie, only when there is one", async () => {
  const anonymous = new Session();
  await anonymous.restore();
  assert.equal(anonymous.signedIn, false);
  assert.deepEqual(auth.calls, []);

  await signedIn();
  const reloaded = new Session();
  await reloaded.restore();
  assert.equal(reloaded.user.display_name, "Ada");
  assert.equal(await reloaded.token(), "access-2");
});

test("logging out with an expired token refreshes it first, so the logout is not refused", async () => {
  const { session } = await signedIn();
  // the refresh at 80% fails (auth away) and the token expires meanwhile
  auth.fetch = async function (path, init) {
    if (path === "/auth/refresh") throw new TypeError("Failed to fetch");
    return ScriptedAuth.prototype.fetch.call(this, path, init);
  };
  mock.timers.tick(101_000);
  await settle();
  auth.fetch = ScriptedAuth.prototype.fetch; // auth is back
  await session.logOut();
  const logout = auth.calls.at(-1);
  assert.equal(logout.path, "/auth/logout");
  assert.notEqual(logout.headers.Authorization, "Bearer access-1");
  assert.equal(session.signedIn, false);
});

test("logging out forgets the token and revokes the session", async () => {
  const { session, events } = await signedIn();
  await session.logOut();
  const logout = auth.calls.at(-1);
  assert.equal(logout.path, "/auth/logout");
  assert.equal(logout.headers.Authorization, "Bearer access-1");
  assert.equal(session.signedIn, false);
  assert.equal(events.at(-1), "change");
  assert.equal(stored.size, 0);
});
