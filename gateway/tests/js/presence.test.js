// Room presence kept replica by replica: frames and the listing in any order.
import assert from "node:assert/strict";
import { test } from "node:test";

const { RoomPresence } = await import("../../src/gateway/web/assets/js/presence.js");

const user = (id, here, connections = 1) => ({ id, display_name: id, connections, here });
const frame = (node, seq, { joins = [], leaves = [], gone = false } = {}) => ({
  type: "presence",
  node,
  seq,
  joins,
  leaves,
  ...(gone ? { gone } : {}),
});
const listing = (at, nodes) => ({
  at,
  nodes: Object.entries(nodes).map(([node, { seq, users }]) => ({
    node,
    seq,
    users: Object.entries(users).map(([id, connections]) => ({ id, display_name: id, connections })),
  })),
});
const counts = (presence) =>
  Object.fromEntries(presence.people().map(({ id, connections }) => [id, connections]));

test("a late leave from the replica a user moved away from does not remove them", () => {
  // bob's first socket was on A; he reconnected to B; the listing already shows B
  const presence = new RoomPresence();
  presence.reset(listing(1000, { A: { seq: 900, users: { ann: 1 } }, B: { seq: 990, users: { bob: 1 } } }));
  assert.deepEqual(counts(presence), { ann: 1, bob: 1 });
  presence.apply(frame("A", 950, { leaves: [user("bob", 0)] }));
  assert.deepEqual(counts(presence), { ann: 1, bob: 1 });
});

test("a frame older than the listing changes nothing; a newer one does", () => {
  const presence = new RoomPresence();
  presence.reset(listing(1000, { A: { seq: 900, users: { ann: 2 } } }));
  presence.apply(frame("A", 850, { joins: [user("ann", 1)] })); // said before the listing was written
  assert.deepEqual(counts(presence), { ann: 2 });
  presence.apply(frame("A", 1100, { leaves: [user("ann", 1)] }));
  assert.deepEqual(counts(presence), { ann: 1 });
});

test("frames that arrive before the listing survive it when newer", () => {
  const presence = new RoomPresence();
  presence.apply(frame("A", 1200, { joins: [user("cy", 1)] }));
  presence.apply(frame("B", 1300, { leaves: [user("ann", 0)] }));
  // read before those frames were written, answered after they arrived
  presence.reset(listing(1100, { A: { seq: 1000, users: { ann: 1 } }, B: { seq: 1050, users: { ann: 1 } } }));
  assert.deepEqual(counts(presence), { ann: 1, cy: 1 });
});

test("a replica the listing no longer has is dropped unless it spoke since", () => {
  const presence = new RoomPresence();
  presence.apply(frame("A", 500, { joins: [user("ann", 1)] }));
  presence.apply(frame("C", 2000, { joins: [user("dee", 1)] }));
  presence.reset(listing(1000, { B: { seq: 900, users: { bob: 1 } } }));
  assert.deepEqual(counts(presence), { bob: 1, dee: 1 });
});

test("a gone replica takes its users, and the user's sockets elsewhere stay", () => {
  const presence = new RoomPresence();
  presence.reset(listing(1000, { A: { seq: 900, users: { ann: 1, bob: 2 } }, B: { seq: 900, users: { bob: 1 } } }));
  assert.deepEqual(counts(presence), { ann: 1, bob: 3 });
  presence.apply(frame("A", 5000, { leaves: [user("ann", 0), user("bob", 0, 2)], gone: true }));
  assert.deepEqual(counts(presence), { bob: 1 });
});

test("people are listed by name with their sockets added up across replicas", () => {
  const presence = new RoomPresence();
  presence.apply(frame("A", 10, { joins: [user("zoe", 1), user("ann", 2, 2)] }));
  presence.apply(frame("B", 10, { joins: [user("zoe", 1)] }));
  assert.deepEqual(presence.people(), [
    { id: "ann", name: "ann", connections: 2 },
    { id: "zoe", name: "zoe", connections: 2 },
  ]);
});

test("a frame of several diffs applies each in order, as the separate frames would", () => {
  const diffs = [
    frame("A", 10, { joins: [user("ann", 1), user("bob", 1)] }),
    frame("B", 10, { joins: [user("ann", 2, 2)] }),
    frame("A", 11, { leaves: [user("bob", 0)] }),
    frame("C", 12, { joins: [user("cy", 1)] }),
    frame("C", 13, { leaves: [user("cy", 0)], gone: true }),
  ];
  const together = new RoomPresence();
  together.apply({ type: "presence", room: "lobby", diffs });
  const apart = new RoomPresence();
  for (const diff of diffs) apart.apply(diff);
  assert.deepEqual(counts(together), { ann: 3 });
  assert.deepEqual(counts(together), counts(apart));
});

test("a frame carrying the listing (its replica's bus was away) is taken as the listing is", () => {
  const presence = new RoomPresence();
  presence.reset(listing(1000, { A: { seq: 900, users: { ann: 1 } }, B: { seq: 950, users: { bob: 1 } } }));
  // meanwhile bob left B, cy came to B and dee to C: diffs this socket never got
  presence.apply(frame("A", 1500, { joins: [user("eve", 1)] })); // a later diff it did get
  presence.apply({
    type: "presence",
    room: "lobby",
    listing: listing(1400, { A: { seq: 1200, users: { ann: 1 } }, B: { seq: 1300, users: { cy: 1 } }, C: { seq: 1350, users: { dee: 2 } } }),
  });
  assert.deepEqual(counts(presence), { ann: 1, cy: 1, dee: 2, eve: 1 });
});
