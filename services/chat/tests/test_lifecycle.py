from __future__ import annotations

from collections.abc import Callable

from chat.config import Settings
from kit_testing import TokenMinter

from .factories import StalledReader, chat, joins, leaves, start_node, unique_room

SettingsFor = Callable[..., Settings]


async def test_shutdown_closes_every_socket_with_1012(
    settings_for: SettingsFor, minter: TokenMinter
) -> None:
    room = unique_room()
    async with start_node(settings_for("node-leaving"), minter) as node:
        client_cm = chat(node, room, minter.token())
        client = await client_cm.__aenter__()
        await client.say("before shutdown")
        await client.messages(1)
    closed = await client.close_frame()
    await client_cm.__aexit__(None, None, None)
    assert closed == (1012, "")


async def test_a_peer_that_stops_answering_pings_is_dropped(
    settings_for: SettingsFor, minter: TokenMinter
) -> None:
    room = unique_room()
    node_cm = start_node(
        settings_for("node-pinging"), minter, ws_ping_interval=0.2, ws_ping_timeout=0.3
    )
    async with node_cm as node, chat(node, room, minter.token(user_id="alive")) as alive:
        # answers nothing, not even pings
        async with StalledReader.opened(node, room, minter.token(user_id="dead")):
            joined = await alive.recv_until(joins("dead"))
            left = await alive.recv_until(leaves("dead"))
        await alive.say("still fine")
        (message,) = await alive.messages(1)
    assert {"id": "dead", "display_name": "Test User", "connections": 1, "here": 1} in joined[
        "joins"
    ]
    assert left == {
        "type": "presence",
        "room": room,
        "node": node.name,
        "seq": left["seq"],
        "joins": [],
        "leaves": [{"id": "dead", "display_name": "Test User", "connections": 1, "here": 0}],
    }
    assert message["text"] == "still fine"
