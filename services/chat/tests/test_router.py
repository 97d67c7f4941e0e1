from __future__ import annotations

import httpx
import pytest
from redis.asyncio import Redis

from chat.presence import Presence
from kit_testing import TokenMinter

from .factories import (
    Node,
    chat,
    joined_sockets,
    joins,
    leaves,
    presence_listing,
    presence_users,
    unique_room,
)


def bearer(minter: TokenMinter) -> dict[str, str]:
    return {"Authorization": f"Bearer {minter.token()}"}


async def test_history_pages_oldest_first(cluster: list[Node], minter: TokenMinter) -> None:
    room = unique_room()
    async with chat(cluster[0], room, minter.token(user_id="h", name="Hist")) as client:
        for seq in range(5):
            await client.say(f"h{seq}", client_id=f"c{seq}")
        await client.messages(5)
    async with httpx.AsyncClient(base_url=cluster[1].url, headers=bearer(minter)) as http:
        first = await http.get(f"/chat/rooms/{room}/messages", params={"limit": 2})
        second = await http.get(
            f"/chat/rooms/{room}/messages", params={"after": first.json()["next_after"], "limit": 2}
        )
        rest = await http.get(f"/chat/rooms/{room}/messages", params={"after": 4})
    assert first.status_code == 200
    body = first.json()
    assert body["room"] == room
    assert body["next_after"] == 2
    assert [item["id"] for item in body["items"]] == [1, 2]
    item = body["items"][0]
    assert item["type"] == "message"
    assert item["user"] == {"id": "h", "display_name": "Hist"}
    assert item["text"] == "h0"
    assert item["client_id"] == "c0"
    assert [item["id"] for item in second.json()["items"]] == [3, 4]
    assert rest.status_code == 200
    assert rest.json() == {"room": room, "items": rest.json()["items"], "next_after": None}
    assert [item["text"] for item in rest.json()["items"]] == ["h4"]


async def test_history_limit_is_capped(cluster: list[Node], minter: TokenMinter) -> None:
    async with httpx.AsyncClient(base_url=cluster[0].url, headers=bearer(minter)) as http:
        response = await http.get("/chat/rooms/empty-room/messages", params={"limit": 10**6})
    assert response.status_code == 200
    assert response.json() == {"room": "empty-room", "items": [], "next_after": None}


async def test_history_rejects_bad_input(cluster: list[Node], minter: TokenMinter) -> None:
    async with httpx.AsyncClient(base_url=cluster[0].url, headers=bearer(minter)) as http:
        bad_room = await http.get("/chat/rooms/bad.room/messages")
        bad_after = await http.get("/chat/rooms/ok/messages", params={"after": -1})
    assert bad_room.status_code == 422
    assert bad_room.headers["content-type"] == "application/problem+json"
    assert bad_room.json()["errors"][0]["loc"] == ["path", "room"]
    assert bad_after.status_code == 422
    assert bad_after.json()["errors"][0]["loc"] == ["query", "after"]


async def test_history_refuses_an_after_beyond_64_bits(
    cluster: list[Node], minter: TokenMinter
) -> None:
    async with httpx.AsyncClient(base_url=cluster[0].url, headers=bearer(minter)) as http:
        huge = await http.get("/chat/rooms/ok/messages", params={"after": "9" * 20})
        nul = await http.get("/chat/rooms/o%00k/messages")
    assert huge.status_code == 422
    assert huge.json()["errors"][0] == {
        "loc": ["query", "after"],
        "msg": "Integer must fit in 64 bits (-2^63 .. 2^63-1)",
        "type": "int_out_of_range",
    }
    assert nul.status_code == 422


async def test_presence_join_and_leave_across_replicas(
    cluster: list[Node], minter: TokenMinter
) -> None:
    room = unique_room()
    async with chat(cluster[0], room, minter.token(user_id="ann", name="Ann")) as ann:
        # each replica writes its presence on its own beat: Ann's is written
        # (and told to her) before Bob comes, or the listing could miss her
        await ann.recv_until(joins("ann"))
        async with chat(cluster[1], room, minter.token(user_id="bob", name="Bob")):
            joined = await ann.recv_until(joins("bob"))
            listing = await presence_listing(cluster[2], room, minter)
        left = await ann.recv_until(leaves("bob"))
        after = await presence_listing(cluster[2], room, minter)
    bob = {"id": "bob", "display_name": "Bob", "connections": 1}
    node = cluster[1].name
    assert joined == {
        "type": "presence",
        "room": room,
        "node": node,
        "seq": joined["seq"],
        "joins": [bob | {"here": 1}],
        "leaves": [],
    }
    assert listing["users"] == [
        {"id": "ann", "display_name": "Ann", "connections": 1},
        {"id": "bob", "display_name": "Bob", "connections": 1},
    ]
    # replica by replica, each with the seq of the flush that wrote it
    by_node = {entry["node"]: entry for entry in listing["nodes"]}
    assert by_node[node] == {"node": node, "seq": joined["seq"], "users": [bob]}
    assert by_node[cluster[0].name]["users"] == [
        {"id": "ann", "display_name": "Ann", "connections": 1}
    ]
    assert left == {
        "type": "presence",
        "room": room,
        "node": node,
        "seq": left["seq"],
        "joins": [],
        "leaves": [bob | {"here": 0}],
    }
    assert left["seq"] > joined["seq"]
    assert after["users"] == [{"id": "ann", "display_name": "Ann", "connections": 1}]
    assert [entry["node"] for entry in after["nodes"]] == [cluster[0].name]


async def test_presence_of_a_dead_replica_vanishes_and_members_hear_it(
    cluster: list[Node], minter: TokenMinter, redis_url: str
) -> None:
    room = unique_room()
    redis = Redis.from_url(redis_url)
    # its entries outlive the listing below however slow the machine, then lapse
    ghost = Presence(redis=redis, node_id="ghost-node", ttl_seconds=4.0)
    try:
        async with chat(cluster[0], room, minter.token(user_id="ann", name="Ann")) as ann:
            ghost.joined(room, "gus", "Gus")
            ghost.joined(room, "gus", "Gus")
            await ghost.flush()
            seen = await presence_users(cluster[0], room, minter)
            # nothing refreshes the ghost's entries: they drop out on their own,
            # and a live replica tells the room who went with it
            gone = await ann.recv_until(leaves("gus"), within=15)
            listed = await presence_users(cluster[0], room, minter)
            remaining = await redis.exists(f"chat:presence:{room}:ghost-node")
    finally:
        await redis.aclose()
    assert {"id": "gus", "display_name": "Gus", "connections": 2} in seen
    assert gone["gone"] is True
    assert gone["node"] == "ghost-node"
    assert gone["leaves"] == [{"id": "gus", "display_name": "Gus", "connections": 2, "here": 0}]
    assert listed == [{"id": "ann", "display_name": "Ann", "connections": 1}]
    assert remaining == 0


async def test_after_the_bus_was_away_the_sockets_get_each_room_presence_whole(
    cluster: list[Node], minter: TokenMinter, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis keeps no diff for a subscriber that was away: once a replica's
    bus is back, its sockets get each room's listing, and what the other
    replicas said meanwhile is not lost to them."""
    room = unique_room()
    redis = Redis.from_url(redis_url)
    other = Presence(redis=redis, node_id=f"other-{room}", ttl_seconds=30)
    joined = joined_sockets(monkeypatch)
    try:
        async with chat(cluster[0], room, minter.token(user_id="ann", name="Ann")) as ann:
            ((_, hub),) = joined
            # while this replica's bus was away: bob came on another replica,
            # whose diff (its flush's frame) never reached this one
            other.joined(room, "bob", "Bob")
            await other.flush()
            hub.resync()  # the bus is back
            relisted = await ann.recv_until(lambda frame: "listing" in frame)
    finally:
        await other.clear()
        await redis.aclose()
    listing = relisted["listing"]
    assert relisted["room"] == room
    assert [user["id"] for user in listing["users"]] == ["ann", "bob"]
    assert {node["node"] for node in listing["nodes"]} == {cluster[0].name, other.node_id}


async def test_readyz_proves_database_and_bus(cluster: list[Node]) -> None:
    async with httpx.AsyncClient(base_url=cluster[0].url) as http:
        response = await http.get("/readyz")
        health = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "schema": "ok", "bus": "ok"},
        "optional": {"keys": "ok", "revocations": "ok"},
    }
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}


async def test_metrics_count_messages_sockets_and_the_bus(
    cluster: list[Node], minter: TokenMinter
) -> None:
    async with chat(cluster[1], unique_room(), minter.token()) as client:
        await client.say("counted")
        await client.messages(1)
        async with httpx.AsyncClient(base_url=cluster[1].url) as http:
            response = await http.get("/metrics")
    assert response.status_code == 200
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in response.text.splitlines()
        if line.startswith("chat_")
    }
    assert values["chat_messages_stored_total"] >= 1
    assert values["chat_deliveries_total"] >= 1
    assert values["chat_sockets"] >= 1
    assert values["chat_bus_connected"] == 1.0
