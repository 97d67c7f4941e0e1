// Who is in a room, kept replica by replica.
//
// Every chat replica announces its own sockets: a `presence` frame names the
// replica (`node`), a `seq` that grows with each of its announcements, and for
// every user it mentions how many of their sockets are `here` on it now. The
// listing (GET /chat/rooms/{room}/presence) gives the same per replica, with
// the `seq` it was written at, and `at`, when it was read. Frames and the
// listing reach the page in any order (one over the socket, one over HTTP, and
// frames from different replicas through different paths), so each count is
// kept with the `seq` it came with and only ever replaced by a newer one. A
// replica's `gone` frame (it died; a live one noticed) drops all of its users.
// Diffs of one room that reach a replica together (the replicas flush on the
// same tick) come as one frame whose `diffs` holds them, applied in order.
// A frame with `listing` carries the whole listing (the socket's replica lost
// the diffs of a while, its bus away): taken as the listing over HTTP is.

export class RoomPresence {
  constructor() {
    // node -> {seq (of the listing), users: Map(user id -> {name, connections, seq})}
    this.nodes = new Map();
  }

  /** Takes a listing, keeping whatever newer frames already said. */
  reset(listing) {
    const next = new Map();
    for (const entry of listing.nodes ?? []) {
      const known = this.nodes.get(entry.node);
      const users = new Map();
      for (const user of entry.users) {
        users.set(user.id, { name: user.display_name, connections: user.connections, seq: entry.seq });
      }
      // a frame newer than the listing wins over it, user by user
      for (const [id, person] of known?.users ?? []) {
        if (person.seq > entry.seq) users.set(id, person);
      }
      next.set(entry.node, { seq: entry.seq, users });
    }
    // a replica missing from the listing is gone, unless it spoke after the listing was read
    for (const [node, known] of this.nodes) {
      if (next.has(node)) continue;
      const newer = [...known.users].filter(([, person]) => person.seq > listing.at);
      if (newer.length) next.set(node, { seq: 0, users: new Map(newer) });
    }
    this.nodes = next;
  }

  /** Applies one `presence` frame: a replica's diff, or several in `diffs`, in order. */
  apply(frame) {
    if (frame.listing) {
      this.reset(frame.listing);
      return;
    }
    if (Array.isArray(frame.diffs)) {
      for (const diff of frame.diffs) this.apply(diff);
      return;
    }
    if (frame.node === undefined) return; // a replica older than per-replica frames
    if (frame.gone) {
      this.nodes.delete(frame.node);
      return;
    }
    const node = this.nodes.get(frame.node) ?? { seq: 0, users: new Map() };
    this.nodes.set(frame.node, node);
    for (const user of [...frame.joins, ...frame.leaves]) {
      const known = node.users.get(user.id);
      const since = Math.max(known?.seq ?? 0, node.seq);
      if (frame.seq <= since) continue; // the listing or a later frame said more
      node.users.set(user.id, { name: user.display_name, connections: user.here, seq: frame.seq });
    }
  }

  /** Everyone here, sockets on every replica added up, by name. */
  people() {
    const everyone = new Map();
    for (const { users } of this.nodes.values()) {
      for (const [id, { name, connections }] of users) {
        if (connections <= 0) continue;
        const person = everyone.get(id) ?? { id, name, connections: 0 };
        person.connections += connections;
        everyone.set(id, person);
      }
    }
    return [...everyone.values()].sort((a, b) => a.name.localeCompare(b.name));
  }
}
