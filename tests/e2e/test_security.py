"""Secure and operable by default, on the running stack: no well-known
credential, least privilege, hardened containers, settings that reach the
containers, email verification, and tokens whose keys and lifetimes are bounded.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import time
import uuid

import httpx
from jose import jwt

from kit_testing import emailed_token

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, SETTINGS, Stack
from .helpers import bearer, login, register
from .security import (
    compose,
    docker,
    inspect,
    psql,
    service_statuses,
    unique_name,
)

SERVICE_ROLES = ("auth", "catalog", "chat")


async def test_redis_and_postgres_take_no_well_known_password(stack: Stack) -> None:
    ping = compose(stack, "exec", "-T", "redis", "redis-cli", "ping")
    assert "NOAUTH" in ping.stdout + ping.stderr

    for user, password in (("bazaar", "bazaar"), ("postgres", "postgres"), ("auth", "bazaar")):
        login_over_tcp = compose(
            stack,
            "exec",
            "-T",
            "-e",
            f"PGPASSWORD={password}",
            "postgres",
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            user,
            "-d",
            "postgres",
            "-c",
            "SELECT 1",
        )
        assert login_over_tcp.returncode != 0
        assert "password authentication failed" in login_over_tcp.stderr


async def test_grafana_gets_a_generated_admin_password_and_its_profile_stays_on_loopback(
    stack: Stack,
) -> None:
    def kept_password() -> str:
        done = compose(
            stack, "run", "--rm", "--no-deps", "--entrypoint", "cat", "setup",
            "/secrets/grafana/admin-password",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    password = kept_password()
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", password)
    assert kept_password() == password  # the same on every read: kept, not regenerated

    profile = compose(stack, "--profile", "observability", "config", "--format", "json")
    services = json.loads(profile.stdout)["services"]
    grafana = services["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    secret_file = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    mounts = {volume["target"]: volume for volume in grafana["volumes"]}
    assert mounts[str(pathlib.PurePosixPath(secret_file).parent)]["read_only"]
    for name in ("prometheus", "jaeger", "grafana"):
        assert {port["host_ip"] for port in services[name]["ports"]} == {"127.0.0.1"}, name


async def test_each_service_has_its_own_role_and_nothing_runs_as_the_superuser(
    stack: Stack,
) -> None:
    roles = psql(
        stack,
        "postgres",
        "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
        "WHERE rolname IN ('auth', 'catalog', 'chat') ORDER BY rolname",
    )
    assert roles.splitlines() == [f"{role}|f|f|f" for role in SERVICE_ROLES]
    owners = psql(
        stack,
        "postgres",
        "SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
        "WHERE datname IN ('auth', 'catalog', 'chat') ORDER BY datname",
    )
    assert owners.splitlines() == [f"{role}|{role}" for role in SERVICE_ROLES]
    for role in SERVICE_ROLES:
        for database in SERVICE_ROLES:
            allowed = psql(
                stack,
                "postgres",
                f"SELECT has_database_privilege('{role}', '{database}', 'CONNECT')",
            )
            assert allowed == ("t" if role == database else "f"), (role, database)
        tables = psql(
            stack,
            role,
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'",
        )
        assert tables == role
    connected = psql(
        stack,
        "postgres",
        "SELECT DISTINCT usename FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    assert set(connected.split()) == set(SERVICE_ROLES)


async def test_the_gateway_listens_on_loopback_only(stack: Stack) -> None:
    (gateway,) = stack.containers("gateway")
    bindings = inspect(gateway["ID"])["HostConfig"]["PortBindings"]["8000/tcp"]
    assert [binding["HostIp"] for binding in bindings] == ["127.0.0.1"]


async def test_every_container_is_hardened(stack: Stack) -> None:
    listed = docker(
        "ps", "--quiet", "--filter", f"label=com.docker.compose.project={stack.project}"
    )
    containers = [inspect(container) for container in listed.stdout.split()]
    services = {
        container["Config"]["Labels"]["com.docker.compose.service"] for container in containers
    }
    assert services >= {"postgres", "redis", "auth", "catalog", "chat", "gateway"}

    for container in containers:
        name, host = container["Name"], container["HostConfig"]
        assert host["ReadonlyRootfs"] is True, name
        assert host["CapDrop"] == ["ALL"], name
        assert not host["CapAdd"], name
        assert "no-new-privileges:true" in host["SecurityOpt"], name
        assert not host["Privileged"], name
        assert host["Memory"] > 0, name
        assert host["PidsLimit"] > 0, name
        assert container["Config"]["User"] not in ("", "root", "0"), name


async def test_settings_from_the_environment_reach_the_containers(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/catalog/products")

    assert response.status_code == 200
    assert response.headers["ratelimit-limit"] == SETTINGS["RATE_LIMIT_ANONYMOUS"]


async def test_production_refuses_default_secrets_by_name(stack: Stack) -> None:
    refused = compose(
        stack, "run", "--rm", "--no-deps", "-T", "-e", "ENVIRONMENT=production", "gateway"
    )
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    assert "ENVIRONMENT=production refuses to start" in output
    assert "METRICS_USER, METRICS_PASSWORD" in output
    assert "REDIS_PASSWORD" not in output  # the generated one is no default

    # with credentials for /metrics, the generated passwords pass; a guessable
    # import key does not
    checked = compose(
        stack,
        "run",
        "--rm",
        "--no-deps",
        "-T",
        "-e",
        "ENVIRONMENT=production",
        "-e",
        "METRICS_USER=scraper",
        "-e",
        f"METRICS_PASSWORD={uuid.uuid4().hex}",
        "catalog",
        "python",
        "-c",
        PRODUCTION_SETTINGS,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.split() == ["started", "True", "refused", "CATALOG_API_KEY"]


# Inside a catalog container, with production settings in its environment.
PRODUCTION_SETTINGS = """
import os, re
from pydantic import ValidationError
from catalog.config import Settings
print("started", Settings().verified_email_required)
os.environ["CATALOG_API_KEY"] = "change-me"
try:
    Settings()
except ValidationError as error:
    print("refused", re.search(r"set ([A-Z_, ]+) \\(", str(error)).group(1))
"""


async def test_a_first_start_without_admin_password_shows_a_random_one_once(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    email = f"{unique_name('first-admin')}@example.com"
    name = unique_name(f"{stack.project}-auth-first")
    started = compose(
        stack,
        "run",
        "--detach",
        "--no-deps",
        "--name",
        name,
        "-e",
        f"ADMIN_EMAIL={email}",
        "-e",
        "ADMIN_PASSWORD=",
        "auth",
    )
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 60
        while not (shown := generated_password_lines(docker("logs", name).stdout, email)):
            assert time.monotonic() < deadline, docker("logs", name).stdout[-2000:]
            await asyncio.sleep(0.5)
    finally:
        docker("rm", "--force", name)

    ((password, how_to_change),) = shown
    assert (
        how_to_change == f"docker compose run --rm auth python -m auth.admin set-password {email}"
    )
    tokens = await login(client, email, password)
    assert "admin" in jwt.get_unverified_claims(tokens["access_token"])["roles"]


def generated_password_lines(log: str, email: str) -> list[tuple[str, str]]:
    found = []
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        message = json.loads(line)["msg"]
        match = re.fullmatch(
            rf"created the admin account {re.escape(email)} with a generated password, shown "
            r"only this once: (\S+) \(change it with: (.+)\)",
            message,
        )
        if match:
            found.append((match.group(1), match.group(2)))
    return found


async def test_the_admin_command_runs_in_the_stack(stack: Stack, client: httpx.AsyncClient) -> None:
    user = await register(client)
    tokens = await login(client, user["email"], user["password"])
    command = ["run", "--rm", "--no-deps", "-T", "auth", "python", "-m", "auth.admin"]

    done = compose(
        stack,
        *command,
        "set-password",
        user["email"],
        "--password-stdin",
        stdin="chosen by an operator\n",
    )

    assert done.returncode == 0, done.stderr
    assert (
        await client.get("/auth/users/me", headers=bearer(tokens["access_token"]))
    ).status_code == 401
    await login(client, user["email"], "chosen by an operator")


async def test_registration_emails_a_link_that_verifies_the_address(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    (welcome,) = await stack.mail.wait_for(user["email"])
    before = await login(client, user["email"], user["password"])
    assert jwt.get_unverified_claims(before["access_token"])["email_verified"] is False

    verified = await client.post("/auth/email/verify", json={"token": emailed_token(welcome)})

    assert verified.status_code == 204, verified.text
    refreshed = await client.post("/auth/refresh", json={"refresh_token": before["refresh_token"]})
    assert refreshed.status_code == 200
    assert jwt.get_unverified_claims(refreshed.json()["access_token"])["email_verified"] is True
    # asking again answers the same for a verified, an unknown and no address
    for email in (user["email"], "nobody@example.com", "not an address"):
        again = await client.post("/auth/email/verify/resend", json={"email": email})
        assert again.status_code == 202
        assert again.content == b""


async def test_with_verification_required_an_unverified_admin_cannot_write(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    """A catalog replica started with REQUIRE_VERIFIED_EMAIL, asked directly."""
    admin = bearer((await login(client, ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])
    user = await register(client)
    promoted = await client.patch(
        f"/auth/users/{user['id']}", json={"roles": ["admin", "user"]}, headers=admin
    )
    assert promoted.status_code == 200, promoted.text
    unverified = (await login(client, user["email"], user["password"]))["access_token"]
    name = unique_name(f"{stack.project}-catalog-strict")
    started = compose(
        stack,
        "run",
        "--detach",
        "--no-deps",
        "--name",
        name,
        "-e",
        "REQUIRE_VERIFIED_EMAIL=true",
        "catalog",
    )
    assert started.returncode == 0, started.stderr
    try:
        slug = unique_name("strict")
        body = json.dumps({"slug": slug, "name": "Strict"})
        write = [
            "exec",
            name,
            "python",
            "-c",
            WRITE_WHEN_READY,
            "http://127.0.0.1:8000/catalog/categories",
            body,
        ]
        refused = docker(*write, unverified)
        assert refused.returncode == 0, refused.stderr
        status, problem = refused.stdout.split(" ", 1)
        assert status == "403"
        assert json.loads(problem)["type"] == "urn:problem-type:email-not-verified"

        (welcome,) = await stack.mail.wait_for(user["email"])
        verified = await client.post("/auth/email/verify", json={"token": emailed_token(welcome)})
        assert verified.status_code == 204
        fresh = (await login(client, user["email"], user["password"]))["access_token"]
        accepted = docker(*write, fresh)
        assert accepted.stdout.split(" ", 1)[0] == "201", accepted.stdout
    finally:
        docker("rm", "--force", name)


# Inside a catalog container: waits for it to be ready, then POSTs the body
# with the token; prints the status and the answer.
WRITE_WHEN_READY = r"""
import sys, time, urllib.error, urllib.request
url, body, token = sys.argv[1:4]
deadline = time.monotonic() + 90
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:8000/readyz", timeout=3)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
request = urllib.request.Request(url, data=body.encode(), method="POST", headers={
    "Authorization": "Bearer " + token, "Content-Type": "application/json"})
try:
    response = urllib.request.urlopen(request, timeout=10)
    print(response.status, response.read().decode())
except urllib.error.HTTPError as error:
    print(error.code, error.read().decode())
"""


def signing_key(stack: Stack) -> tuple[str, str]:
    """The kid and private key auth signs with now."""
    row = json.loads(
        psql(
            stack,
            "auth",
            "SELECT json_build_object('kid', kid, 'pem', private_pem) FROM signing_keys "
            "WHERE retired_at IS NULL AND private_pem IS NOT NULL",
        )
    )
    return row["kid"], row["pem"]


def mint(stack: Stack, kid: str, pem: str, user_id: str, *, issued_at: int, lifetime: int) -> str:
    claims = {
        "sub": user_id,
        "name": "Minted",
        "roles": ["user"],
        "iat": issued_at,
        "exp": issued_at + lifetime,
        "jti": uuid.uuid4().hex,
        # the stack's issuer: its public address (PUBLIC_BASE_URL) + /auth
        "iss": f"{stack.base_url}/auth",
        "aud": "bazaar",
        "typ": "access",
    }
    token: str = jwt.encode(claims, pem, algorithm="ES256", headers={"kid": kid})
    return token


async def test_a_token_claiming_more_than_the_maximum_lifetime_is_refused_everywhere(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    kid, pem = signing_key(stack)
    now = int(time.time())
    fair = mint(stack, kid, pem, user["id"], issued_at=now, lifetime=900)
    too_long = mint(stack, kid, pem, user["id"], issued_at=now, lifetime=3601)
    backdated = mint(
        stack, kid, pem, user["id"], issued_at=now - 7 * 24 * 3600, lifetime=8 * 24 * 3600
    )

    # the same key, a fair lifetime: accepted (so the refusals below are the lifetime's)
    assert (await client.get("/auth/users/me", headers=bearer(fair))).status_code == 200
    assert set((await service_statuses(stack, fair, want=401, within=0)).values()) <= {200, 403}
    for token in (too_long, backdated):
        edge = await client.get("/auth/users/me", headers=bearer(token))
        assert edge.status_code == 401
        assert edge.json()["detail"] == "Token lifetime exceeds the maximum"
        statuses = await service_statuses(stack, token, want=401, within=0)
        assert set(statuses.values()) == {401}, statuses


async def test_a_logout_outlives_a_redis_crash_at_the_edge_and_in_every_service(
    healthy_stack: Stack, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    logged_out = (await login(client, user["email"], user["password"]))["access_token"]
    still_in = (await login(client, user["email"], user["password"]))["access_token"]
    assert (await client.post("/auth/logout", headers=bearer(logged_out))).status_code == 204

    (redis,) = healthy_stack.containers("redis")
    assert docker("kill", redis["ID"]).returncode == 0
    restarted = compose(
        healthy_stack, "up", "--detach", "--wait", "--no-recreate", "--no-build", "redis"
    )
    assert restarted.returncode == 0, restarted.stderr

    # every service is back on Redis once a valid token passes everywhere again
    deadline = time.monotonic() + 60
    while (await client.get("/auth/users/me", headers=bearer(still_in))).status_code != 200:
        assert time.monotonic() < deadline, "the stack did not recover from the Redis crash"
        await asyncio.sleep(0.5)
    accepted = await service_statuses(healthy_stack, still_in, want=200, within=30)
    assert set(accepted.values()) <= {200, 403}, accepted

    edge = await client.get("/auth/users/me", headers=bearer(logged_out))
    assert edge.status_code == 401
    assert edge.json()["detail"] == "Token revoked"
    refused = await service_statuses(healthy_stack, logged_out, want=401, within=0)
    assert set(refused.values()) == {401}, refused


async def test_a_retired_key_is_refused_everywhere_within_the_refresh_window(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    old = (await login(client, user["email"], user["password"]))["access_token"]
    kid = jwt.get_unverified_header(old)["kid"]
    assert (await client.get("/auth/users/me", headers=bearer(old))).status_code == 200
    # the longest any verifier may keep a key set: the JWKS's max-age, or auth's
    # own key-ring refresh, with a margin for a loaded machine
    jwks = await client.get("/auth/.well-known/jwks.json")
    max_age = int(re.search(r"max-age=(\d+)", jwks.headers["cache-control"]).group(1))  # type: ignore[union-attr]
    # a verifier whose fetch failed once on a loaded machine fetches again on
    # its next round: a second interval of the key-ring's 30 s is allowed
    window = max(max_age, 30) + 30 + 15

    retired = compose(stack, "exec", "-T", "auth", "python", "-m", "auth.keys", "retire", kid)

    assert retired.returncode == 0, retired.stderr
    assert f"retired {kid}" in retired.stdout
    # no token of the new key is used before: it must not be what evicts the old one
    statuses, edge = await asyncio.gather(
        service_statuses(stack, old, want=401, within=window),
        refused_at_the_edge(client, old, within=window),
    )
    assert set(statuses.values()) == {401}, statuses
    assert edge == 401
    fresh = (await login(client, user["email"], user["password"]))["access_token"]
    assert jwt.get_unverified_header(fresh)["kid"] != kid
    assert (await client.get("/auth/users/me", headers=bearer(fresh))).status_code == 200


async def refused_at_the_edge(client: httpx.AsyncClient, token: str, *, within: float) -> int:
    """The gateway's answer to `token` on a route it verifies, once it is 401 or time is up."""
    deadline = time.monotonic() + within
    while True:
        status = (await client.get("/chat/rooms/lobby/messages", headers=bearer(token))).status_code
        if status == 401 or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.5)
