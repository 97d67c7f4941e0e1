"""Who is connected to a room, across replicas, kept in Redis.

Each replica owns one hash per room, `chat:presence:<room>:<node>`, mapping
its connection ids to users, and scores itself in the room's sorted set
`chat:presence:<room>:nodes` with the time its entries expire. A heartbeat
rewrites both, so when a replica dies its entries drop out of every listing
after `ttl` seconds (the score) and out of Redis soon after (the key TTL).
Writes are best effort: when Redis is away the next heartbeat restores them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Mapping
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat.schemas import PresentUser

logger = logging.getLogger("chat.presence")


def presence_key(room: str, node: str) -> str:
    return f"chat:presence:{room}:{node}"


def presence_nodes_key(room: str) -> str:
    return f"chat:presence:{room}:nodes"


def user_entry(user_id: str, display_name: str) -> str:
    return json.dumps({"id": user_id, "display_name": display_name})


class Presence:
    def __init__(self, *, redis: Redis, node_id: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.node_id = node_id
        self.ttl_seconds = ttl_seconds

    async def add(self, room: str, connection_id: str, entry: str) -> None:
        await self._best_effort(self._write(room, {connection_id: entry}), "add")

    async def remove(self, room: str, connection_id: str) -> None:
        async def remove() -> None:
            await self.redis.hdel(presence_key(room, self.node_id), connection_id)

        await self._best_effort(remove(), "remove")

    async def heartbeat(self, rooms: Mapping[str, Mapping[str, str]]) -> None:
        """Rewrites this replica's entries for every room it has sockets in."""
        for room, entries in rooms.items():
            await self._best_effort(self._write(room, entries, replace=True), "heartbeat")

    async def clear(self, rooms: list[str]) -> None:
        for room in rooms:

            async def clear(room: str = room) -> None:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(presence_key(room, self.node_id))
                    pipe.zrem(presence_nodes_key(room), self.node_id)
                    await pipe.execute()

            await self._best_effort(clear(), "clear")

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
                if present is None:
                    counts[user["id"]] = PresentUser(
                        id=user["id"], display_name=user["display_name"], connections=1
                    )
                else:
                    present.connections += 1
        return sorted(counts.values(), key=lambda user: user.id)

    async def _write(self, room: str, entries: Mapping[str, str], *, replace: bool = False) -> None:
        key = presence_key(room, self.node_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            if replace:
                pipe.delete(key)
            if entries:
                pipe.hset(key, mapping=cast(Any, dict(entries)))
            pipe.expire(key, math.ceil(self.ttl_seconds) + 5)
            pipe.zadd(presence_nodes_key(room), {self.node_id: time.time() + self.ttl_seconds})
            # replicas that stopped heartbeating long ago leave the set for good
            pipe.zremrangebyscore(presence_nodes_key(room), 0, time.time() - 3600)
            pipe.expire(presence_nodes_key(room), math.ceil(self.ttl_seconds) + 3600)
            await pipe.execute()

    async def _best_effort(self, operation: Awaitable[None], what: str) -> None:
        try:
            await operation
        except (RedisError, OSError) as error:
            logger.warning("presence %s failed (restored by the next heartbeat): %s", what, error)
