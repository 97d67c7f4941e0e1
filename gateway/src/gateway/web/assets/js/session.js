// The signed-in user's session. The access token lives only in memory; the
// refresh token is an HttpOnly cookie that page scripts never see (auth sets
// it when asked with `Refresh-Token-Delivery: cookie`), so a reload or a new
// tab restores the session with one refresh. The access token is refreshed
// before it expires; a refresh that is refused ends the session ("lost").

import { ApiError, request } from "./api.js";

const COOKIE_DELIVERY = { "Refresh-Token-Delivery": "cookie" };
// refresh when this share of the token's life has passed
const REFRESH_AT = 0.8;
// a token with less left than this is refreshed before it is used
const MIN_LIFE_MS = 15_000;
const RETRY_MS = 5_000;
// Whether this browser holds a session cookie worth trying (scripts cannot
// see the HttpOnly cookie itself); spares anonymous visitors a refused refresh.
const MARKER = "bazaar.signed-in";

export class Session extends EventTarget {
  constructor() {
    super();
    this.user = null;
    this._accessToken = null;
    this._expiresAt = 0;
    this._timer = null;
    this._refreshing = null;
  }

  get signedIn() {
    return this.user !== null;
  }

  get isAdmin() {
    return this.user?.roles?.includes("admin") ?? false;
  }

  /** On page load: the refresh cookie, if any, signs the user back in. */
  async restore() {
    if (!localStorage.getItem(MARKER)) return;
    try {
      await this._refresh();
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 401) console.warn("restore:", error);
      this._clear();
    }
  }

  async logIn(email, password) {
    const { body } = await request("/auth/token", {
      method: "POST",
      form: { username: email, password },
      headers: COOKIE_DELIVERY,
    });
    await this._accept(body);
  }

  async logOut() {
    // a token that has expired (its refresh failed meanwhile, the laptop was
    // asleep) would be refused before auth sees it, and the session and its
    // cookie would live on: refreshed first, or the one in hand if that fails
    const token = this.signedIn
      ? await this.token().catch(() => this._accessToken)
      : this._accessToken;
    this._clear();
    this._emit("change");
    if (token) {
      // revokes the token and its session, and clears the refresh cookie
      await request("/auth/logout", { method: "POST", token }).catch(() => {});
    }
  }

  /** A token that is still good for a while; `fresh` forces a new one. */
  async token(fresh = false) {
    if (!this.signedIn) throw new Error("not signed in");
    if (fresh || Date.now() > this._expiresAt - MIN_LIFE_MS) await this.refresh();
    return this._accessToken;
  }

  /** An API call with the token; a 401 gets one refresh and one retry. */
  async call(path, options = {}) {
    try {
      return await request(path, { ...options, token: await this.token() });
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 401 || !this.signedIn) throw error;
      return request(path, { ...options, token: await this.token(true) });
    }
  }

  /** Refreshes once however many ask at once; a refused refresh ends the session. */
  async refresh() {
    try {
      await this._refresh();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        this._lose();
      } else {
        this._schedule(RETRY_MS);
      }
      throw error;
    }
  }

  _refresh() {
    this._refreshing ??= this._exclusive(async () => {
      const { body } = await request("/auth/refresh", { method: "POST", headers: COOKIE_DELIVERY });
      await this._accept(body);
    }).finally(() => {
      this._refreshing = null;
    });
    return this._refreshing;
  }

  // Refresh tokens rotate and a spent one revokes the whole session, so two
  // tabs must never present the same cookie at once: the refresh holds a lock
  // shared by every tab of this origin, and the next tab sends the new cookie.
  _exclusive(task) {
    const locks = globalThis.navigator?.locks;
    return locks ? locks.request("bazaar-refresh", task) : task();
  }

  async _accept(tokens) {
    const first = !this.signedIn;
    localStorage.setItem(MARKER, "1");
    this._accessToken = tokens.access_token;
    this._expiresAt = Date.now() + tokens.expires_in * 1000;
    this._schedule(tokens.expires_in * 1000 * REFRESH_AT);
    if (first) {
      const { body } = await request("/auth/users/me", { token: this._accessToken });
      this.user = body;
      this._emit("change");
    }
    this._emit("token", { token: this._accessToken });
  }

  _schedule(delayMs) {
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this.refresh().catch(() => {}), delayMs);
  }

  _lose() {
    const wasSignedIn = this.signedIn;
    this._clear();
    if (wasSignedIn) {
      this._emit("change");
      this._emit("lost");
    }
  }

  _clear() {
    localStorage.removeItem(MARKER);
    clearTimeout(this._timer);
    this._timer = null;
    this.user = null;
    this._accessToken = null;
    this._expiresAt = 0;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
