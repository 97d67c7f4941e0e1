// A browser client for one chat room (the protocol is in services/chat/README.md).
//
// It keeps what a person expects of a chat through faults: after a dropped
// socket it reconnects with backoff and jitter, resumes with `since` (the last
// id it showed), re-sends every message not yet acknowledged with the same
// `client_id` (the server stores a repeat once), sends a message the server
// dropped for the send rate again after the `retry_after` it names, and never
// emits a message twice. The backoff starts over once a resumed socket has
// caught up, not at `ready`. A token it cannot get is a failed attempt like a
// dropped socket, unless the session has ended. It knows nothing of the page:
// events tell the view what happened.
//
// Events (CustomEvent, `detail` as listed):
//   state    {state, delayMs?, code?}   connecting | open | reconnecting | closed
//   message  the message frame          each new message once, in id order
//   ack      {clientId, message}        a message of ours is stored
//   presence the presence frame         {node, seq, joins, leaves, gone?}: one replica's
//                                        users that came or went, or {diffs: [...]},
//                                        several such diffs in order, or {listing},
//                                        the room's presence whole (see presence.js)
//   problem  the error frame            the server refused a frame; the socket stays open
//                                        (not for one dropped for the send rate: sent again)

const AUTH_CLOSE_CODES = new Set([4001, 4003]); // token expired / revoked while open
const NORMAL_CLOSURE = 1000;
const OPEN = 1; // WebSocket.OPEN

export class ChatClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.url base of the room sockets, e.g. `ws://host/chat/ws`
   * @param {string} options.room
   * @param {(fresh: boolean) => Promise<string>} options.token the current access
   *   token; `fresh` asks for a newly issued one (after the server refused the last)
   * @param {() => boolean} options.ended whether there is no session any more: a
   *   token that cannot be had then closes the client; otherwise (the network,
   *   auth briefly away) it is a failed attempt, tried again with backoff
   */
  constructor({
    url,
    room,
    token,
    ended = () => false,
    WebSocketImpl = globalThis.WebSocket,
    initialDelayMs = 500,
    maxDelayMs = 15_000,
    random = Math.random,
    setTimer = (callback, ms) => globalThis.setTimeout(callback, ms),
    clearTimer = (handle) => globalThis.clearTimeout(handle),
    newClientId = () => globalThis.crypto.randomUUID(),
  }) {
    super();
    this.url = url;
    this.room = room;
    this.state = "idle";
    /** The id of the newest message emitted; `since` on a reconnection. */
    this.lastId = null;
    /** client_id -> text of every message sent and not yet acknowledged. */
    this.pending = new Map();
    /** The replica serving the socket (from `ready`). */
    this.node = null;
    this._token = token;
    this._ended = ended;
    this._WebSocket = WebSocketImpl;
    this._initialDelayMs = initialDelayMs;
    this._maxDelayMs = maxDelayMs;
    this._random = random;
    this._setTimer = setTimer;
    this._clearTimer = clearTimer;
    this._newClientId = newClientId;
    this._socket = null;
    this._timer = null;
    this._failures = 0;
    this._freshToken = false;
    this._caughtUpTo = 0;
    this._ready = false;
    /** Timers of messages the server dropped for the send rate, to send again. */
    this._resends = new Set();
  }

  start() {
    if (this.state !== "idle") return;
    this._connect();
  }

  /** Sends a message now if the room is live, else as soon as it is again. */
  send(text) {
    const clientId = this._newClientId();
    this.pending.set(clientId, text);
    if (this._ready && this.lastId >= this._caughtUpTo) this._sendMessage(clientId, text);
    return clientId;
  }

  /** Hands a refreshed access token to the open socket, so it is not closed at expiry. */
  renewToken(token) {
    if (this._ready && this._socket.readyState === OPEN) {
      this._socket.send(JSON.stringify({ type: "auth", token }));
    }
  }

  /** Skips the wait before the next attempt (the browser came back online). */
  reconnectNow() {
    if (this.state !== "reconnecting" || this._timer === null) return;
    this._clearTimer(this._timer);
    this._timer = null;
    this._connect();
  }

  close() {
    this._stop();
    this._emit("state", { state: "closed" });
  }

  async _connect() {
    this._setState(this.lastId === null ? "connecting" : "reconnecting");
    let token;
    try {
      token = await this._token(this._freshToken);
    } catch {
      if (this.state === "closed") return;
      if (this._ended()) {
        this.close(); // no session any more: nothing to reconnect with
      } else {
        this._retryLater(); // no token right now: a failed attempt like a dropped socket
      }
      return;
    }
    if (this.state === "closed") return;
    this._freshToken = false;
    const since = this.lastId === null ? "" : `?since=${this.lastId}`;
    const address = `${this.url}/${encodeURIComponent(this.room)}${since}`;
    // browsers cannot set headers on a WebSocket: the token travels as the
    // subprotocol pair `bearer, <token>`, never in the URL
    const socket = new this._WebSocket(address, ["bearer", token]);
    this._socket = socket;
    socket.onmessage = (event) => this._onFrame(socket, event.data);
    socket.onclose = (event) => this._onClose(socket, event.code);
  }

  _onFrame(socket, data) {
    if (socket !== this._socket) return;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    switch (frame.type) {
      case "ready":
        this._onReady(frame);
        break;
      case "message":
        this._onMessage(frame);
        break;
      case "presence":
        this._emit("presence", frame);
        break;
      case "error":
        if (!this._resendLater(frame)) this._emit("problem", frame);
        break;
      default:
        break;
    }
  }

  _onReady(frame) {
    this._ready = true;
    this.node = frame.node;
    if (this.lastId === null) this.lastId = frame.last_id;
    // a resumed socket first replays what came after `since`, up to here
    this._caughtUpTo = frame.last_id;
    this._setState("open");
    if (this.lastId >= this._caughtUpTo) this._caughtUp();
  }

  /** The room is live again: the backoff starts over, and what is pending goes out.
   * Not at `ready`: a socket that keeps failing its replay after `ready` (the
   * database away) would otherwise be retried at the first delay for ever. */
  _caughtUp() {
    this._failures = 0;
    this._resendPending();
  }

  /** A message the server dropped for the send rate goes again after the
   * `retry_after` it named, with the same client_id; true if so. */
  _resendLater(frame) {
    const clientId = frame.client_id;
    if (typeof frame.retry_after !== "number" || !clientId || !this.pending.has(clientId)) {
      return false;
    }
    const timer = this._setTimer(() => {
      this._resends.delete(timer);
      const text = this.pending.get(clientId);
      // not live now: the resend after the next `ready` takes it
      if (text !== undefined && this._ready && this.lastId >= this._caughtUpTo) {
        this._sendMessage(clientId, text);
      }
    }, frame.retry_after * 1000);
    this._resends.add(timer);
    return true;
  }

  _onMessage(message) {
    const isNew = message.id > this.lastId;
    if (isNew) {
      this.lastId = message.id;
      this._emit("message", message);
    }
    const clientId = message.client_id;
    if (clientId && this.pending.has(clientId)) {
      this.pending.delete(clientId);
      this._emit("ack", { clientId, message });
    }
    // the replay is complete: what is still pending was never stored
    if (isNew && message.id === this._caughtUpTo) this._caughtUp();
  }

  _onClose(socket, code) {
    if (socket !== this._socket) return;
    this._socket = null;
    this._ready = false;
    if (this.state === "closed") return;
    if (AUTH_CLOSE_CODES.has(code) || this._failures > 0) {
      // refused or expired: the next attempt asks for a newly issued token
      this._freshToken = true;
    }
    this._retryLater({ code });
  }

  _retryLater(extra = {}) {
    this._failures += 1;
    const ceiling = Math.min(this._maxDelayMs, this._initialDelayMs * 2 ** (this._failures - 1));
    // "equal jitter": at least half the ceiling, so a whole room dropped at
    // once by a dying replica spreads its reconnections over the other half
    const delayMs = Math.round(ceiling / 2 + this._random() * (ceiling / 2));
    this._setState("reconnecting", { delayMs, ...extra });
    this._timer = this._setTimer(() => {
      this._timer = null;
      this._connect();
    }, delayMs);
  }

  _resendPending() {
    for (const [clientId, text] of this.pending) this._sendMessage(clientId, text);
  }

  _sendMessage(clientId, text) {
    // a socket already closing drops the frame; it stays pending and goes
    // out again after the reconnection
    if (this._socket.readyState !== OPEN) return;
    this._socket.send(JSON.stringify({ type: "message", text, client_id: clientId }));
  }

  _stop() {
    this.state = "closed";
    if (this._timer !== null) this._clearTimer(this._timer);
    this._timer = null;
    for (const timer of this._resends) this._clearTimer(timer);
    this._resends.clear();
    const socket = this._socket;
    this._socket = null;
    this._ready = false;
    if (socket) socket.close(NORMAL_CLOSURE);
  }

  _setState(state, extra = {}) {
    const changed = this.state !== state;
    this.state = state;
    // each wait before an attempt is news, with its delay
    if (changed || "delayMs" in extra) this._emit("state", { state, ...extra });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
