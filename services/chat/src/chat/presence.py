"""Who is connected to a room, across replicas: counted here, kept in Redis,
announced as batched diffs.

A replica counts its own sockets per room and user in memory; joining and
leaving cost no Redis work at all. Every `interval` the changes since the
last flush go out at once, in one pipeline for every room that changed:

- Redis: the replica's hash per room, `chat:presence:<room>:<node>`, maps
  each user to `{"id", "display_name", "connections"}` (this replica's
  sockets of that user); the room's sorted set `chat:presence:<room>:nodes`
  scores each replica with the time its entries expire.
- Members: one `presence` frame per changed room, `joins` and `leaves` each a
  list of users with how many of their sockets came or went on this replica
  (net over the interval: a socket that came and went is not mentioned).

So a join storm of n sockets costs each member one frame per replica per
interval, not n frames, and Redis work grows with rooms, not with sockets.
The heartbeat only pushes the expiry of every room ahead (one pipeline), so
when a replica dies its entries drop out of every listing after `ttl`
seconds (the score) and out of Redis soon after (the key TTL). Writes are
best effort: a room whose write failed is rewritten whole by the next flush.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat.schemas import PresentUser, presence_diff_frame

logger = logging.getLogger("chat.presence")

PIPELINE_ROOMS = 200
"""Rooms written per pipeline round trip."""
STALE_NODES_SECONDS = 3600


def presence_key(room: str, node: str) -> str:
    return f"chat:presence:{room}:{node}"


def presence_nodes_key(room: str) -> str:
    return f"chat:presence:{room}:nodes"


def user_entry(user_id: str, display_name: str, connections: int) -> str:
    return json.dumps({"id": user_id, "display_name": display_name, "connections": connections})


class Presence:
    """This replica's sockets per room and user, and what changed since the last flush."""

    def __init__(self, *, redis: Redis, node_id: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.node_id = node_id
        self.ttl_seconds = ttl_seconds
        # room -> user id -> [display name, sockets here]
        self.rooms: dict[str, dict[str, list[Any]]] = {}
        # room -> user id -> [display name, net change since the last flush]
        self._changes: dict[str, dict[str, list[Any]]] = {}
        # rooms whose last write failed: rewritten whole by the next flush
        self._stale: set[str] = set()

    # -- local counts (no I/O) ------------------------------------------------

    def joined(self, room: str, user_id: str, display_name: str) -> None:
        self._count(room, user_id, display_name, 1)

    def left(self, room: str, user_id: str, display_name: str) -> None:
        self._count(room, user_id, display_name, -1)

    def _count(self, room: str, user_id: str, display_name: str, step: int) -> None:
        users = self.rooms.setdefault(room, {})
        present = users.setdefault(user_id, [display_name, 0])
        present[1] += step
        if present[1] <= 0:
            del users[user_id]
            if not users:
                del self.rooms[room]
        change = self._changes.setdefault(room, {}).setdefault(user_id, [display_name, 0])
        change[1] += step

    def connections(self, room: str, user_id: str) -> int:
        present = self.rooms.get(room, {}).get(user_id)
        return 0 if present is None else int(present[1])

    # -- flushing -------------------------------------------------------------

    async def flush(self) -> dict[str, str]:
        """Writes every changed room to Redis (one pipeline per `PIPELINE_ROOMS`)
        and returns the `presence` frame of each room with a net change."""
        changes, self._changes = self._changes, {}
        rooms = set(changes) | self._stale
        if rooms:
            await self._write(sorted(rooms), changes)
        frames: dict[str, str] = {}
        for room, users in changes.items():
            joins = [(uid, name, n) for uid, (name, n) in users.items() if n > 0]
            leaves = [(uid, name, -n) for uid, (name, n) in users.items() if n < 0]
            if joins or leaves:
                frames[room] = presence_diff_frame(room=room, joins=joins, leaves=leaves)
        return frames

    async def _write(self, rooms: list[str], changes: dict[str, dict[str, list[Any]]]) -> None:
        expires_at = time.time() + self.ttl_seconds
        key_ttl = math.ceil(self.ttl_seconds) + 5
        for start in range(0, len(rooms), PIPELINE_ROOMS):
            batch = rooms[start : start + PIPELINE_ROOMS]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for room in batch:
                        key = presence_key(room, self.node_id)
                        users = self.rooms.get(room, {})
                        if not users:  # the last socket here left
                            pipe.delete(key)
                            pipe.zrem(presence_nodes_key(room), self.node_id)
                            continue
                        if room in self._stale:
                            pipe.delete(key)
                            changed = list(users)
                        else:
                            changed = list(changes.get(room, ()))
                        gone = [uid for uid in changed if uid not in users]
                        if gone:
                            pipe.hdel(key, *gone)
                        mapping = {
                            uid: user_entry(uid, users[uid][0], users[uid][1])
                            for uid in changed
                            if uid in users
                        }
                        if mapping:
                            pipe.hset(key, mapping=cast(Any, mapping))
                        self._refresh(pipe, room, expires_at, key_ttl)
                    await pipe.execute()
                self._stale.difference_update(batch)
            except (RedisError, OSError) as error:
                self._stale.update(batch)
                logger.warning("presence of %d rooms not written (retried): %s", len(batch), error)

    def _refresh(self, pipe: Any, room: str, expires_at: float, key_ttl: int) -> None:
        nodes = presence_nodes_key(room)
        pipe.expire(presence_key(room, self.node_id), key_ttl)
        pipe.zadd(nodes, {self.node_id: expires_at})
        # replicas that stopped heartbeating long ago leave the set for good
        pipe.zremrangebyscore(nodes, 0, time.time() - STALE_NODES_SECONDS)
        pipe.expire(nodes, key_ttl + STALE_NODES_SECONDS)

    async def heartbeat(self) -> None:
        """Pushes the expiry of every room this replica has sockets in ahead."""
        rooms = sorted(self.rooms)
        expires_at = time.time() + self.ttl_seconds
        key_ttl = math.ceil(self.ttl_seconds) + 5
        for start in range(0, len(rooms), PIPELINE_ROOMS):
            batch = rooms[start : start + PIPELINE_ROOMS]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for room in batch:
                        self._refresh(pipe, room, expires_at, key_ttl)
                    await pipe.execute()
            except (RedisError, OSError) as error:
                self._stale.update(batch)
                logger.warning("presence heartbeat of %d rooms failed: %s", len(batch), error)

    async def clear(self) -> None:
        """This replica is stopping: its entries leave every listing now."""
        rooms = sorted(self.rooms)
        self.rooms.clear()
        self._changes.clear()
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

    async def users(self, room: str) -> list[PresentUser]:
        """Everyone connected to `room` on a live replica, one entry per user."""
        now = time.time()
        nodes = await self.redis.zrangebyscore(presence_nodes_key(room), now, math.inf)
        async with self.redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                name = node.decode() if isinstance(node, bytes) else str(node)
                pipe.hvals(presence_key(room, name))
            results = await pipe.execute()
        counts: dict[str, PresentUser] = {}
        for values in results:
            for raw in values:
                user = json.loads(raw)
                present = counts.get(user["id"])
                connections = int(user.get("connections", 1))
                if present is None:
                    counts[user["id"]] = PresentUser(
                        id=user["id"], display_name=user["display_name"], connections=connections
                    )
                else:
                    present.connections += connections
        return sorted(counts.values(), key=lambda user: user.id)
