"""`make backup`, then the stack destroyed with its volumes, then `make restore`
into a fresh one: users, products and messages are back, and logins work."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import httpx

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, ROOT, Stack
from .helpers import bearer, login, open_socket, receive_json, receive_messages, register

COMPOSE_FILES = "compose.yaml:tests/e2e/compose.e2e.yaml"
PROJECT_LABEL = "com.docker.compose.project"


def make(*arguments: str) -> str:
    """A make target as an operator runs it, against the suite's stack (the
    project name, port and tag are in the environment)."""
    done = subprocess.run(
        ["make", *arguments],
        cwd=ROOT,
        env={**os.environ, "COMPOSE_FILE": COMPOSE_FILES},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_a_backup_restores_users_products_and_messages_into_a_fresh_stack(
    healthy_stack: Stack, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    user = await register(client)
    tokens = await login(client, user["email"], user["password"])
    admin = bearer((await login(client, ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])
    name = "Backed Up " + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:8])
    product = await client.post(
        "/catalog/products", json={"name": name, "price": "12.50"}, headers=admin
    )
    assert product.status_code == 201, product.text
    room = f"backup-{uuid.uuid4().hex[:8]}"
    socket = await open_socket(healthy_stack.ws_url, room, tokens["access_token"])
    try:
        await receive_json(socket)
        for number in range(3):
            await socket.send(f'{{"type": "message", "text": "kept {number}"}}')
        await receive_messages(socket, 3)
    finally:
        await socket.close()

    made = await asyncio.to_thread(make, "backup", f"BACKUP_DIR={tmp_path}")
    backup = made.strip().splitlines()[-1]
    assert sorted(await asyncio.to_thread(os.listdir, backup)) == [
        "auth.dump",
        "catalog.dump",
        "chat.dump",
    ]

    healthy_stack.compose_cmd("down", "--volumes")
    await asyncio.to_thread(healthy_stack.compose_cmd, "up", "--detach", "--wait", "--no-build")
    gone = await client.post(
        "/auth/token", data={"username": user["email"], "password": user["password"]}
    )
    assert gone.status_code == 400  # invalid_grant: a fresh stack, nothing of the old one

    await asyncio.to_thread(make, "restore", f"BACKUP={backup}")

    again = await login(client, user["email"], user["password"])
    me = await client.get("/auth/users/me", headers=bearer(again["access_token"]))
    assert me.json()["id"] == user["id"]
    # the signing keys came back too: a token issued before the backup still verifies
    before = await client.get("/auth/users/me", headers=bearer(tokens["access_token"]))
    assert before.status_code == 200
    restored = await client.get(f"/catalog/products/{product.json()['id']}")
    assert restored.status_code == 200
    assert restored.json()["name"] == product.json()["name"]
    history = await client.get(
        f"/chat/rooms/{room}/messages", headers=bearer(again["access_token"])
    )
    assert [message["text"] for message in history.json()["items"]] == [
        "kept 0",
        "kept 1",
        "kept 2",
    ]
    await login(client, ADMIN_EMAIL, ADMIN_PASSWORD)
