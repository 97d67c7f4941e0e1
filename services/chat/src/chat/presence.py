"""Who is connected to a room, across replicas: counted here, kept in Redis,
announced as batched diffs.

A replica counts its own sockets per room and user in memory; joining and
leaving cost no Redis work at all. Every `interval` the changes since the
last flush go out at once, in one pipeline for every room that changed:

- Redis: the replica's hash per room, `chat:presence:<room>:<node>`, maps
  each user to `{"id", "display_name", "connections"}` (this replica's
  sockets of that user) and `~seq` to the flush that wrote it last; the
  room's sorted set `chat:presence:<room>:nodes` scores each replica with the
  time its entries expire.
- Members: one `presence` frame per changed room, `joins` and `leaves` each a
  list of users with how many of their sockets came or went on this replica
  (net over the interval: a socket that came and went is not mentioned) and
  how many are `here` now; the frame names its `node` and carries `seq`, a
  number that grows with every flush of that replica (milliseconds since the
  epoch, or one more than the last).

A client therefore keeps counts per replica, not one running total: a frame
sets the counts of the users it names on its replica unless the client
already holds a newer `seq` for them (from the listing, which gives each
replica's counts and `seq`, or from a later frame). Frames and the listing
may arrive in any order, and the result is the same.

So a join storm of n sockets costs each member one frame per replica per
interval, not n frames, and Redis work grows with rooms, not with sockets.

A large room's changes are held back until they are worth a frame to every
member: a room whose sockets here number more than `sockets_per_change` times
its changes waits (its changes accumulate, net) until enough have come or a
boundary of the wall clock's `max_delay` grid has passed since the oldest of
them (so at most `max_delay` seconds; every replica lets a room's held changes
go at the same boundary, and members get the replicas' diffs in one frame, see
`chat.hub`). A diff goes to every member of the
room, on every replica, so without this a storm of joins into rooms of m
members costs m frames per replica and interval whatever the joins (about 10
frames relayed per socket opened when 2,000 sockets joined 100 rooms through
the gateway, more as rooms grow). Held back, a diff carries at least one
change per `sockets_per_change` sockets here, so the frames per change stay
a small constant. Rooms of at most `sockets_per_change` sockets here (and a
room's last socket leaving) are not held: a change there goes out at the next
interval, as before.

The heartbeat pushes the expiry of every room ahead (one pipeline) and looks
for replicas whose entries expired in those rooms: when a replica dies, its
entries drop out of every listing after `ttl` seconds (the score), and the
first live replica to remove it from the room's set (a script that checks
the expiry again as it removes, so a replica that wrote since it was found
expired stays, and only one remover gets its entries) sends the room a
`presence` frame with `"gone": true` that names the dead replica's users in
`leaves`, so members see them go. Writes are best
effort: a room whose write failed is rewritten whole by the next flush.

A room is also written whole the first time this process writes it: its hash
may hold what a previous process of the same node id left (a container
restarted in place keeps its hostname), whose sockets went with it. A room
written whole names, in its frame, every user here (`joins`, with `here`) and
every user its hash held who is not here (`leaves`, `here` 0). So members
drop a restarted replica's old users, and get a replica's users back after a
live replica took it for dead (its entries lapsed while Redis was away) and
announced it `gone`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat.schemas import (
    NodePresence,
    PresenceChange,
    PresenceOut,
    PresentUser,
    presence_diff_frame,
)

logger = logging.getLogger("chat.presence")

PIPELINE_ROOMS = 200
"""Rooms written per pipeline round trip."""
STALE_NODES_SECONDS = 3600
SEQ_FIELD = "~seq"
"""The hash field holding the `seq` of the flush that wrote it (user ids never start with ~)."""
SEQ_KEYS = (SEQ_FIELD, SEQ_FIELD.encode())
_clock = time.time  # the shared grid of held rooms (a module attribute so tests can move it)


# Removes a replica from a room if its entries expired, and returns what they
# held; nil if they did not (it wrote again since it was found expired: a
# stalled replica back, or one whose heartbeat Redis missed for a while).
# KEYS: the room's set of replicas, the replica's hash; ARGV: the replica, now.
_BURY = """
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires or tonumber(expires) > tonumber(ARGV[2]) then
    return false
end
local entries = redis.call('HGETALL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return entries
"""


def presence_key(room: str, node: str) -> str:
    return f"chat:presence:{room}:{node}"


def presence_nodes_key(room: str) -> str:
    return f"chat:presence:{room}:nodes"


def user_entry(user_id: str, display_name: str, connections: int) -> str:
    return json.dumps({"id": user_id, "display_name": display_name, "connections": connections})


class Presence:
    """This replica's sockets per room and user, and what changed since the last flush."""

    def __init__(
        self,
        *,
        redis: Redis,
        node_id: str,
        ttl_seconds: float,
        sockets_per_change: int = 0,
        max_delay: float = 0.0,
    ) -> None:
        self.redis = redis
        self._bury_script = redis.register_script(_BURY)
        self.node_id = node_id
        self.ttl_seconds = ttl_seconds
        # 0: every changed room is flushed at every interval
        self.sockets_per_change = sockets_per_change
        self.max_delay = max_delay
        # room -> user id -> [display name, sockets here]
        self.rooms: dict[str, dict[str, list[Any]]] = {}
        # room -> sockets here (the sum of `rooms[room]`'s counts)
        self._sockets: dict[str, int] = {}
        # room -> user id -> [display name, net change since the last flush]
        self._changes: dict[str, dict[str, list[Any]]] = {}
        # room -> when its oldest change not flushed yet was counted (wall clock)
        self._held_since: dict[str, float] = {}
        # rooms whose last write failed: rewritten whole by the next flush
        self._stale: set[str] = set()
        # rooms whose hash this process has written and still owns; any other
        # is written whole, for it may hold what a previous process of the
        # same node id left (its sockets gone with it)
        self._claimed: set[str] = set()
        self._seq = 0

    # -- local counts (no I/O) ------------------------------------------------

    def joined(self, room: str, user_id: str, display_name: str) -> None:
        self._count(room, user_id, display_name, 1)

    def left(self, room: str, user_id: str, display_name: str) -> None:
        self._count(room, user_id, display_name, -1)

    def _count(self, room: str, user_id: str, display_name: str, step: int) -> None:
        users = self.rooms.setdefault(room, {})
        present = users.setdefault(user_id, [display_name, 0])
        present[1] += step
        self._sockets[room] = self._sockets.get(room, 0) + step
        if present[1] <= 0:
            del users[user_id]
            if not users:
                del self.rooms[room]
                self._sockets.pop(room, None)
        changes = self._changes.get(room)
        if changes is None:
            changes = self._changes[room] = {}
            self._held_since.setdefault(room, _clock())
        change = changes.setdefault(user_id, [display_name, 0])
        change[1] += step

    # -- flushing -------------------------------------------------------------

    def _next_seq(self) -> int:
        """Grows with every flush, and across restarts of a replica with the same id."""
        self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
        return self._seq

    async def flush(self) -> dict[str, str]:
        """Writes every changed room to Redis (one pipeline per `PIPELINE_ROOMS`)
        and returns the `presence` frame of each room with a net change."""
        changes, self._changes = self._changes, {}
        if self.sockets_per_change > 0:
            now = _clock()
            for room in [room for room in changes if self._holds(room, changes[room], now)]:
                self._changes[room] = changes.pop(room)
        for room in changes:
            self._held_since.pop(room, None)
        rooms = set(changes) | self._stale
        if not rooms:
            return {}
        seq = self._next_seq()
        # room -> user id -> sockets here as written (sockets may come and go
        # while the write is under way: the next flush carries those)
        written: dict[str, dict[str, int]] = {}
        rewritten = await self._write(sorted(rooms), changes, seq, written)
        frames: dict[str, str] = {}
        for room in [*changes, *(room for room in rewritten if room not in changes)]:
            joins: list[PresenceChange] = []
            leaves: list[PresenceChange] = []
            here = written.get(room, {})
            for uid, (name, n) in changes.get(room, {}).items():
                change = PresenceChange(uid, name, abs(n), here.get(uid, 0))
                if n > 0:
                    joins.append(change)
                elif n < 0:
                    leaves.append(change)
            if room in rewritten:
                # written whole: every user here is named (members may have
                # dropped this replica's users, a live replica having taken it
                # for dead while Redis was away), and so is every user its hash
                # held who is not here (a previous process's, of the same id)
                named = {change.user_id for change in (*joins, *leaves)}
                whole, ghosts = rewritten[room]
                joins += [
                    PresenceChange(uid, name, 0, here[uid])
                    for uid, name in whole
                    if uid not in named
                ]
                leaves += [ghost for ghost in ghosts if ghost.user_id not in named]
            if joins or leaves:
                frames[room] = presence_diff_frame(
                    room=room, node=self.node_id, seq=seq, joins=joins, leaves=leaves
                )
        return frames

    def _holds(self, room: str, users: dict[str, list[Any]], now: float) -> bool:
        """Whether a room's changes wait for a later flush: fewer than one per
        `sockets_per_change` of its sockets here, and no boundary of the
        `max_delay` grid passed since the oldest (`_due`). A room being rewritten after a failed write, or left
        without sockets here, is never held."""
        if room in self._stale or self._due(self._held_since.get(room, now), now):
            return False
        changed: int = sum(abs(n) for _, n in users.values())
        return changed * self.sockets_per_change < self._sockets.get(room, 0)

    def _due(self, held_since: float, now: float) -> bool:
        """Whether a boundary of the `max_delay` grid of the wall clock passed
        since `held_since`: every replica holding a room's changes lets them go
        at the same instant, so members receive the replicas' diffs together
        (one frame, `chat.hub`) rather than each at its own time."""
        if self.max_delay <= 0:
            return True
        return math.floor(now / self.max_delay) > math.floor(held_since / self.max_delay)

    async def _write(
        self,
        rooms: list[str],
        changes: dict[str, dict[str, list[Any]]],
        seq: int,
        written: dict[str, dict[str, int]],
    ) -> dict[str, tuple[list[tuple[str, str]], list[PresenceChange]]]:
        """Writes the rooms, and puts in `written` each changed user's sockets
        here as the write carries them (every user's, for a room written whole).
        Returns, for each room written whole (a first write of this process, or
        one after a failed write), its users as written and the users its hash
        held who are not among them."""
        expires_at = time.time() + self.ttl_seconds
        key_ttl = math.ceil(self.ttl_seconds) + 5
        rewritten: dict[str, tuple[list[tuple[str, str]], list[PresenceChange]]] = {}
        wholes: dict[str, list[tuple[str, str]]] = {}
        for start in range(0, len(rooms), PIPELINE_ROOMS):
            batch = rooms[start : start + PIPELINE_ROOMS]
            read: list[tuple[str, int]] = []  # a room written whole, its HGETALL's place
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for room in batch:
                        key = presence_key(room, self.node_id)
                        users = self.rooms.get(room, {})
                        if not users:  # the last socket here left
                            written[room] = {}
                            pipe.delete(key)
                            pipe.zrem(presence_nodes_key(room), self.node_id)
                            continue
                        if room in self._stale or room not in self._claimed:
                            read.append((room, len(pipe.command_stack)))
                            pipe.hgetall(key)
                            pipe.delete(key)
                            changed = list(users)
                            wholes[room] = [(uid, users[uid][0]) for uid in changed]
                        else:
                            changed = list(changes.get(room, ()))
                        written[room] = {
                            uid: users[uid][1] if uid in users else 0 for uid in changed
                        }
                        gone = [uid for uid in changed if uid not in users]
                        if gone:
                            pipe.hdel(key, *gone)
                        mapping = {
                            uid: user_entry(uid, users[uid][0], users[uid][1])
                            for uid in changed
                            if uid in users
                        }
                        mapping[SEQ_FIELD] = str(seq)
                        pipe.hset(key, mapping=cast(Any, mapping))
                        self._refresh(pipe, room, expires_at, key_ttl)
                    results = await pipe.execute()
                self._stale.difference_update(batch)
            except (RedisError, OSError) as error:
                self._stale.update(batch)
                logger.warning("presence of %d rooms not written (retried): %s", len(batch), error)
                continue
            for room in batch:
                if room in self.rooms:
                    self._claimed.add(room)
                else:
                    self._claimed.discard(room)  # its hash is gone: nothing left to own
            for room, index in read:
                here = written[room]
                held = (
                    json.loads(raw)
                    for field, raw in results[index].items()
                    if field not in SEQ_KEYS
                )
                rewritten[room] = (
                    wholes[room],
                    [
                        PresenceChange(
                            user["id"], user["display_name"], int(user["connections"]), 0
                        )
                        for user in held
                        if user["id"] not in here
                    ],
                )
        return rewritten

    def _refresh(self, pipe: Any, room: str, expires_at: float, key_ttl: int) -> None:
        nodes = presence_nodes_key(room)
        pipe.expire(presence_key(room, self.node_id), key_ttl)
        pipe.zadd(nodes, {self.node_id: expires_at})
        # replicas that stopped heartbeating long ago leave the set for good
        pipe.zremrangebyscore(nodes, 0, time.time() - STALE_NODES_SECONDS)
        pipe.expire(nodes, key_ttl + STALE_NODES_SECONDS)

    async def heartbeat(self) -> list[tuple[str, str]]:
        """Pushes the expiry of every room this replica has sockets in ahead, and
        returns a `gone` frame for every replica found dead in one of them."""
        rooms = sorted(self.rooms)
        expires_at = time.time() + self.ttl_seconds
        key_ttl = math.ceil(self.ttl_seconds) + 5
        expired: list[tuple[str, str]] = []
        for start in range(0, len(rooms), PIPELINE_ROOMS):
            batch = rooms[start : start + PIPELINE_ROOMS]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for room in batch:
                        self._refresh(pipe, room, expires_at, key_ttl)
                        pipe.zrangebyscore(presence_nodes_key(room), 0, time.time())
                    results = await pipe.execute()
            except (RedisError, OSError) as error:
                self._stale.update(batch)
                logger.warning("presence heartbeat of %d rooms failed: %s", len(batch), error)
                continue
            per_room = len(results) // len(batch)
            for index, room in enumerate(batch):
                for node in results[(index + 1) * per_room - 1]:
                    name = node.decode() if isinstance(node, bytes) else str(node)
                    if name != self.node_id:
                        expired.append((room, name))
        return await self._bury(expired) if expired else []

    async def _bury(self, expired: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Removes dead replicas from their rooms; for each removal this replica
        won, the room's frame naming the dead replica's users as gone.

        Each removal checks the expiry again, with the removal itself (one
        script): between the heartbeat that found a replica expired and this,
        the replica may have written again, and a live replica's users must
        not be announced gone."""
        bury = self._bury_script
        now = time.time()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for room, node in expired:
                    keys = [presence_nodes_key(room), presence_key(room, node)]
                    await bury(keys=keys, args=[node, now], client=pipe)
                results = await pipe.execute()
        except (RedisError, OSError) as error:
            logger.warning("dead replicas not removed from presence (retried): %s", error)
            return []
        frames: list[tuple[str, str]] = []
        for (room, node), entries in zip(expired, results, strict=True):
            if entries is None:
                continue  # alive again, or another replica announces it
            pairs = zip(entries[::2], entries[1::2], strict=True)
            users = [json.loads(raw) for field, raw in pairs if field not in SEQ_KEYS]
            leaves = [
                PresenceChange(u["id"], u["display_name"], int(u["connections"]), 0) for u in users
            ]
            logger.info("replica %s left room %s with %d users", node, room, len(leaves))
            if leaves:
                frame = presence_diff_frame(
                    room=room, node=node, seq=self._next_seq(), joins=[], leaves=leaves, gone=True
                )
                frames.append((room, frame))
        return frames

    async def clear(self) -> None:
        """This replica is stopping: its entries leave every listing now."""
        rooms = sorted(self.rooms)
        self.rooms.clear()
        self._sockets.clear()
        self._changes.clear()
        self._held_since.clear()
        self._claimed.clear()
        for start in range(0, len(rooms), PIPELINE_ROOMS):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for room in rooms[start : start + PIPELINE_ROOMS]:
                        pipe.delete(presence_key(room, self.node_id))
                        pipe.zrem(presence_nodes_key(room), self.node_id)
                    await pipe.execute()
            except (RedisError, OSError) as error:
                logger.warning("presence not cleared (expires on its own): %s", error)

    # -- reading --------------------------------------------------------------

    async def listing(self, room: str) -> PresenceOut:
        """Everyone connected to `room` on a live replica: one entry per user, and
        each replica's own counts with the `seq` they were written at."""
        now = time.time()
        names = [
            node.decode() if isinstance(node, bytes) else str(node)
            for node in await self.redis.zrangebyscore(presence_nodes_key(room), now, math.inf)
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(presence_key(room, name))
            results = await pipe.execute()
        totals: dict[str, PresentUser] = {}
        nodes: list[NodePresence] = []
        for name, entries in zip(names, results, strict=True):
            seq, users = 0, []
            for field, raw in entries.items():
                if field in SEQ_KEYS:
                    seq = int(raw)
                    continue
                user = json.loads(raw)
                present = PresentUser(
                    id=user["id"],
                    display_name=user["display_name"],
                    connections=int(user.get("connections", 1)),
                )
                users.append(present)
                total = totals.get(present.id)
                if total is None:
                    totals[present.id] = present.model_copy()
                else:
                    total.connections += present.connections
            if users:
                nodes.append(NodePresence(node=name, seq=seq, users=sorted(users, key=by_id)))
        return PresenceOut(
            room=room,
            users=sorted(totals.values(), key=by_id),
            nodes=nodes,
            at=int(now * 1000),
        )

    async def users(self, room: str) -> list[PresentUser]:
        """Everyone connected to `room` on a live replica, one entry per user."""
        return (await self.listing(room)).users


def by_id(user: PresentUser) -> str:
    return user.id
