// The web client's chat module against a scripted socket and clock:
// `node --test gateway/tests/js` (run by `make unit`).
import assert from "node:assert/strict";
import { test } from "node:test";

// Node 18 has no global CustomEvent; browsers and Node 20+ do
globalThis.CustomEvent ??= class extends Event {
  constructor(type, init = {}) {
    super(type);
    this.detail = init.detail;
  }
};

const { ChatClient } = await import("../../src/gateway/web/assets/js/chat-client.js");

/** A stand-in for the browser's WebSocket that the test drives as the server. */
class ScriptedSocket {
  static opened = [];

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.sent = [];
    this.closedWith = null;
    this.readyState = 1;
    ScriptedSocket.opened.push(this);
  }

  send(data) {
    this.sent.push(JSON.parse(data));
  }

  close(code) {
    this.closedWith = code;
    this.readyState = 2;
  }

  /** The server sends a frame. */
  deliver(frame) {
    this.onmessage({ data: JSON.stringify(frame) });
  }

  /** The connection ends with `code` (1006: lost without a close frame). */
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose({ code });
  }

  messagesSent() {
    return this.sent.filter((frame) => frame.type === "message");
  }
}

function scenario({ random = () => 0.5 } = {}) {
  ScriptedSocket.opened = [];
  const timers = [];
  const tokens = [];
  let issued = 0;
  let ids = 0;
  const client = new ChatClient({
    url: "ws://edge.test/chat/ws",
    room: "lobby",
    token: async (fresh) => {
      if (fresh || issued === 0) issued += 1;
      tokens.push({ fresh, token: `token-${issued}` });
      return `token-${issued}`;
    },
    WebSocketImpl: ScriptedSocket,
    random,
    setTimer: (callback, ms) => {
      timers.push({ callback, ms });
      return timers.length;
    },
    clearTimer: () => {},
    newClientId: () => `c${++ids}`,
  });
  const events = [];
  for (const type of ["state", "message", "ack", "presence", "problem"]) {
    client.addEventListener(type, (event) => events.push({ type, detail: event.detail }));
  }
  return {
    client,
    timers,
    tokens,
    events,
    socket: () => ScriptedSocket.opened.at(-1),
    sockets: () => ScriptedSocket.opened,
    shown: () => events.filter((e) => e.type === "message").map((e) => e.detail.id),
    states: () => events.filter((e) => e.type === "state").map((e) => e.detail.state),
  };
}

const settle = () => new Promise((resolve) => setImmediate(resolve));

function message(id, { clientId = null, text = `m${id}` } = {}) {
  return { type: "message", id, room: "lobby", text, client_id: clientId, user: { id: "u" } };
}

async function openRoom(s, lastId = 10, node = "chat-1") {
  s.client.start();
  await settle();
  s.socket().deliver({ type: "ready", room: "lobby", last_id: lastId, node });
}

async function reconnect(s) {
  const timer = s.timers.at(-1);
  timer.callback();
  await settle();
  return timer;
}

test("the token goes in the subprotocol pair, never in the URL", async () => {
  const s = scenario();
  await openRoom(s);
  assert.deepEqual(s.socket().protocols, ["bearer", "token-1"]);
  assert.equal(s.socket().url, "ws://edge.test/chat/ws/lobby");
  assert.equal(s.client.state, "open");
  assert.equal(s.client.node, "chat-1");
});

test("live messages are emitted once each, in order", async () => {
  const s = scenario();
  await openRoom(s, 10);
  s.socket().deliver(message(11));
  s.socket().deliver(message(12));
  s.socket().deliver(message(12));
  s.socket().deliver(message(9));
  assert.deepEqual(s.shown(), [11, 12]);
  assert.equal(s.client.lastId, 12);
});

test("a dropped socket resumes with since = the last id shown", async () => {
  const s = scenario();
  await openRoom(s, 10);
  s.socket().deliver(message(11));
  s.socket().drop(1012);
  assert.equal(s.client.state, "reconnecting");
  await reconnect(s);
  assert.equal(s.sockets().length, 2);
  assert.equal(s.socket().url, "ws://edge.test/chat/ws/lobby?since=11");
  // the replay repeats nothing already shown and fills what was missed
  s.socket().deliver({ type: "ready", room: "lobby", last_id: 13, node: "chat-2" });
  for (const id of [11, 12, 13, 14]) s.socket().deliver(message(id));
  assert.deepEqual(s.shown(), [11, 12, 13, 14]);
  assert.equal(s.client.node, "chat-2");
  assert.deepEqual(s.states(), ["connecting", "open", "reconnecting", "open"]);
  assert.equal(s.events.find((e) => e.detail.state === "reconnecting").detail.code, 1012);
});

test("the acknowledgement of a message is its own copy coming back", async () => {
  const s = scenario();
  await openRoom(s, 0);
  const clientId = s.client.send("hello");
  assert.deepEqual(s.socket().messagesSent(), [
    { type: "message", text: "hello", client_id: clientId },
  ]);
  assert.deepEqual([...s.client.pending.keys()], [clientId]);
  s.socket().deliver(message(1, { clientId, text: "hello" }));
  assert.equal(s.client.pending.size, 0);
  const ack = s.events.find((e) => e.type === "ack");
  assert.equal(ack.detail.clientId, clientId);
});

test("unacknowledged messages are re-sent with the same client_id after the replay", async () => {
  const s = scenario();
  await openRoom(s, 5);
  const stored = s.client.send("stored before the drop");
  const lost = s.client.send("never stored");
  s.socket().drop();
  const written = s.client.send("written while away");
  await reconnect(s);
  s.socket().deliver({ type: "ready", room: "lobby", last_id: 6, node: "chat-2" });
  // nothing is re-sent while the replay may still bring our own messages back
  assert.deepEqual(s.socket().messagesSent(), []);
  s.socket().deliver(message(6, { clientId: stored, text: "stored before the drop" }));
  assert.deepEqual(
    s.socket().messagesSent().map((frame) => [frame.client_id, frame.text]),
    [
      [lost, "never stored"],
      [written, "written while away"],
    ],
  );
  assert.deepEqual([...s.client.pending.keys()], [lost, written]);
});

test("with nothing to replay, pending messages go out as soon as the room is ready", async () => {
  const s = scenario();
  await openRoom(s, 5);
  s.socket().drop();
  const clientId = s.client.send("while away");
  assert.deepEqual(s.sockets()[0].messagesSent(), []);
  await reconnect(s);
  s.socket().deliver({ type: "ready", room: "lobby", last_id: 5, node: "chat-2" });
  assert.deepEqual(s.socket().messagesSent(), [
    { type: "message", text: "while away", client_id: clientId },
  ]);
});

test("a message written while the socket is closing waits for the next one", async () => {
  const s = scenario();
  await openRoom(s, 5);
  const dying = s.socket();
  dying.readyState = 2; // closing: the browser would drop the frame
  const clientId = s.client.send("into the void");
  assert.deepEqual(dying.messagesSent(), []);
  dying.drop();
  await reconnect(s);
  s.socket().deliver({ type: "ready", room: "lobby", last_id: 5, node: "chat-2" });
  assert.deepEqual(s.socket().messagesSent(), [
    { type: "message", text: "into the void", client_id: clientId },
  ]);
});

test("a repeat the server already stored acknowledges without showing it twice", async () => {
  const s = scenario();
  await openRoom(s, 0);
  const clientId = s.client.send("once");
  s.socket().deliver(message(1, { clientId, text: "once" }));
  s.client.pending.set(clientId, "once"); // as if re-sent after a lost acknowledgement
  s.socket().deliver(message(1, { clientId, text: "once" }));
  assert.deepEqual(s.shown(), [1]);
  assert.equal(s.client.pending.size, 0);
  assert.equal(s.events.filter((e) => e.type === "ack").length, 2);
});

test("delays double up to the ceiling, jittered within its upper half, and reset once ready", async () => {
  const draws = [0, 1, 0.5, 0, 0, 0.999, 0, 0];
  const s = scenario({ random: () => draws.shift() });
  await openRoom(s, 0);
  const delays = [];
  for (let attempt = 0; attempt < 7; attempt += 1) {
    s.socket().drop();
    delays.push(s.timers.at(-1).ms);
    await reconnect(s);
  }
  // ceilings 500, 1000, 2000, 4000, 8000, 15000 (capped), 15000
  assert.deepEqual(delays, [250, 1000, 1500, 2000, 4000, 14993, 7500]);
  s.socket().deliver({ type: "ready", room: "lobby", last_id: 0, node: "chat-3" });
  s.socket().drop();
  assert.equal(s.timers.at(-1).ms, 250);
});

test("a socket closed for an expired or revoked token reconnects with a fresh token", async () => {
  const s = scenario();
  await openRoom(s, 0);
  s.socket().drop(4001);
  await reconnect(s);
  assert.deepEqual(s.socket().protocols, ["bearer", "token-2"]);
  assert.deepEqual(
    s.tokens.map((t) => t.fresh),
    [false, true],
  );
});

test("a renewed token is handed to the open socket", async () => {
  const s = scenario();
  await openRoom(s, 0);
  s.client.renewToken("token-9");
  assert.deepEqual(s.socket().sent, [{ type: "auth", token: "token-9" }]);
});

test("presence and refused frames are passed on", async () => {
  const s = scenario();
  await openRoom(s, 0);
  s.socket().deliver({
    type: "presence",
    room: "lobby",
    joins: [{ id: "u2", display_name: "B", connections: 1 }],
    leaves: [],
  });
  s.socket().deliver({ type: "error", detail: "text must be 1..4000 characters" });
  assert.deepEqual(
    s.events.filter((e) => e.type === "presence" || e.type === "problem").map((e) => e.type),
    ["presence", "problem"],
  );
});

test("close() stops for good: no reconnection, late frames ignored", async () => {
  const s = scenario();
  await openRoom(s, 0);
  const socket = s.socket();
  s.client.close();
  assert.equal(socket.closedWith, 1000);
  socket.drop(1000);
  socket.deliver(message(1));
  assert.equal(s.timers.length, 0);
  assert.deepEqual(s.shown(), []);
  assert.equal(s.client.state, "closed");
});

test("without a session the client closes instead of retrying", async () => {
  ScriptedSocket.opened = [];
  const client = new ChatClient({
    url: "ws://edge.test/chat/ws",
    room: "lobby",
    token: async () => {
      throw new Error("logged out");
    },
    ended: () => true,
    WebSocketImpl: ScriptedSocket,
  });
  client.start();
  await settle();
  assert.equal(client.state, "closed");
  assert.equal(ScriptedSocket.opened.length, 0);
});

test("a token that cannot be had for now is a failed attempt, tried again", async () => {
  ScriptedSocket.opened = [];
  const timers = [];
  let offline = false;
  const client = new ChatClient({
    url: "ws://edge.test/chat/ws",
    room: "lobby",
    token: async (fresh) => {
      if (fresh && offline) throw new TypeError("Failed to fetch");
      return "token-1";
    },
    ended: () => false,
    WebSocketImpl: ScriptedSocket,
    random: () => 0.5,
    setTimer: (callback, ms) => timers.push({ callback, ms }),
    clearTimer: () => {},
  });
  client.start();
  await settle();
  ScriptedSocket.opened.at(-1).deliver({ type: "ready", room: "lobby", last_id: 3, node: "n" });
  offline = true;
  // the network drops: the first retry fails too, the next one wants a fresh token
  for (let attempt = 0; attempt < 3; attempt += 1) {
    if (ScriptedSocket.opened.at(-1).readyState === 1) ScriptedSocket.opened.at(-1).drop();
    timers.at(-1).callback();
    await settle();
  }
  assert.equal(client.state, "reconnecting");
  const opened = ScriptedSocket.opened.length;
  offline = false;
  client.reconnectNow(); // the browser is back online
  await settle();
  assert.equal(ScriptedSocket.opened.length, opened + 1);
  assert.match(ScriptedSocket.opened.at(-1).url, /since=3$/);
});

test("the backoff starts over once caught up, not at ready", async () => {
  const s = scenario();
  await openRoom(s, 500);
  s.socket().drop();
  const delays = [];
  for (let attempt = 0; attempt < 4; attempt += 1) {
    await reconnect(s);
    // ready, then the replay from since=500 fails (the database away): 1011
    s.socket().deliver({ type: "ready", room: "lobby", last_id: 900, node: "chat-1" });
    s.socket().drop(1011);
    delays.push(s.timers.at(-1).ms);
  }
  assert.deepEqual(delays, [750, 1500, 3000, 6000]);
  await reconnect(s);
  s.socket().deliver({ type: "ready", room: "lobby", last_id: 501, node: "chat-1" });
  s.socket().deliver(message(501));
  s.socket().drop();
  assert.equal(s.timers.at(-1).ms, 375);
});

test("a message dropped for the send rate goes again after retry_after", async () => {
  const s = scenario();
  await openRoom(s, 0);
  const clientId = s.client.send("hello");
  s.socket().deliver({
    type: "error",
    detail: "Rate limit exceeded; frame dropped",
    retry_after: 0.5,
    client_id: clientId,
  });
  assert.deepEqual(
    s.events.filter((e) => e.type === "problem"),
    [],
  );
  const timer = s.timers.at(-1);
  assert.equal(timer.ms, 500);
  timer.callback();
  assert.deepEqual(
    s.socket().messagesSent().map((frame) => [frame.client_id, frame.text]),
    [
      [clientId, "hello"],
      [clientId, "hello"],
    ],
  );
  // acknowledged meanwhile: not sent a third time
  s.client.send("again");
  s.socket().deliver({ type: "error", detail: "dropped", retry_after: 1, client_id: "c2" });
  s.socket().deliver(message(1, { clientId: "c2", text: "again" }));
  s.timers.at(-1).callback();
  assert.equal(s.socket().messagesSent().length, 3);
});
