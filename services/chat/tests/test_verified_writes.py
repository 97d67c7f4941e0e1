"""REQUIRE_VERIFIED_EMAIL: only a token that vouches for the email sends messages."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chat.endpoint import EMAIL_NOT_VERIFIED
from kit_testing import TokenMinter

from .factories import Node, chat, start_node, unique_room


@pytest.fixture
async def strict_node(settings_for: object, minter: TokenMinter) -> AsyncIterator[Node]:
    settings = settings_for("node-strict", require_verified_email=True)  # type: ignore[operator]
    async with start_node(settings, minter) as node:
        yield node


async def test_an_unverified_user_reads_but_cannot_send_until_a_verified_token(
    strict_node: Node, minter: TokenMinter
) -> None:
    room = unique_room()
    async with chat(strict_node, room, minter.token(user_id="new", email_verified=False)) as client:
        await client.say("too early")
        refused = await client.recv_type("error")

        await client.send(
            {"type": "auth", "token": minter.token(user_id="new", email_verified=True)}
        )
        await client.recv_type("auth")
        await client.say("now verified")
        (message,) = await client.messages(1)

    assert refused == {"type": "error", "detail": EMAIL_NOT_VERIFIED}
    assert message["text"] == "now verified"
    assert message["id"] == 1


async def test_without_the_setting_anyone_sends(cluster: list[Node], minter: TokenMinter) -> None:
    async with chat(cluster[0], unique_room(), minter.token(email_verified=False)) as client:
        await client.say("hello")
        (message,) = await client.messages(1)
    assert message["text"] == "hello"
