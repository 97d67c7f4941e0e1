"""The gateway's own endpoints and edge middleware: health, metrics, CORS,
trusted hosts and the merged OpenAPI (its docs page: test_webapp)."""

from __future__ import annotations

from kit_testing import TokenMinter, free_port

from .conftest import (
    GatewayWithALateReplica,
    gateway_settings,
    running_gateway,
    running_upstream,
    urls,
)
from .upstreams import Upstream, service_spec


async def test_health_and_readiness(redis_url: str, minter: TokenMinter) -> None:
    async with running_gateway(gateway_settings(redis_url), minter) as (_, client):
        healthz = await client.get("/healthz")
        readyz = await client.get("/readyz")
    assert healthz.status_code == 200
    assert healthz.json() == {"status": "ok"}
    assert readyz.status_code == 200
    assert readyz.json() == {
        "status": "ok",
        "checks": {},
        "optional": {"keys": "ok", "revocations": "ok", "rate_limits": "ok"},
    }


async def test_ready_without_redis_and_says_what_is_degraded(minter: TokenMinter) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    async with running_gateway(gateway_settings(unreachable), minter) as (_, client):
        readyz = await client.get("/readyz")
    assert readyz.status_code == 200
    assert readyz.json()["status"] == "degraded"
    assert readyz.json()["checks"] == {}
    assert readyz.json()["optional"]["revocations"] == (
        "Redis unreachable and the mirror too old: authenticated requests get 503"
    )


async def test_unknown_gateway_paths_are_problem_json(redis_url: str, minter: TokenMinter) -> None:
    async with running_gateway(gateway_settings(redis_url), minter) as (_, client):
        response = await client.get("/catalogue/products")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["instance"] == response.headers["x-request-id"]


async def test_rfc8414_root_well_known_path_redirects_to_auths_metadata(
    redis_url: str, minter: TokenMinter
) -> None:
    async with running_gateway(gateway_settings(redis_url), minter) as (_, client):
        response = await client.get("/.well-known/oauth-authorization-server/auth")
    assert response.status_code == 308
    assert response.headers["location"] == "/auth/.well-known/oauth-authorization-server"


async def test_metrics_count_requests_by_route_prefix_and_status(
    upstream: tuple[Upstream, str], redis_url: str, minter: TokenMinter
) -> None:
    # auth's replica stays down past the scrape, however slow the machine
    settings = gateway_settings(redis_url, catalog_upstream=urls(upstream[1]), eject_seconds=60)
    async with running_gateway(settings, minter) as (_, client):
        await client.get("/catalog/echo")
        await client.get("/auth/users/me")  # auth's pool is a dead port: 503
        response = await client.get("/metrics")
    assert response.status_code == 200
    text = response.text
    assert 'http_requests_total{method="GET",route="catalog",status="200"} 1.0' in text
    assert 'http_requests_total{method="GET",route="auth",status="503"} 1.0' in text
    assert 'gateway_upstream_duration_seconds_count{route="catalog"} 1.0' in text
    assert 'gateway_upstream_replicas{route="catalog",state="available"} 1.0' in text
    assert 'gateway_upstream_replicas{route="auth",state="down"} 1.0' in text
    assert 'gateway_upstream_panic{route="catalog"} 0.0' in text


async def test_cors_preflight_is_answered_at_the_edge(
    upstream: tuple[Upstream, str], redis_url: str, minter: TokenMinter
) -> None:
    settings = gateway_settings(
        redis_url, catalog_upstream=urls(upstream[1]), cors_origins=["https://shop.example"]
    )
    async with running_gateway(settings, minter) as (_, client):
        preflight = await client.options(
            "/catalog/echo",
            headers={
                "Origin": "https://shop.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        foreign = await client.options(
            "/catalog/echo",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        simple = await client.get("/catalog/echo", headers={"Origin": "https://shop.example"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://shop.example"
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert foreign.status_code == 400
    assert "access-control-allow-origin" not in foreign.headers
    assert simple.status_code == 200
    assert simple.headers["access-control-allow-origin"] == "https://shop.example"
    assert "ratelimit-remaining" in simple.headers["access-control-expose-headers"].lower()
    assert upstream[0].hits == 1


async def test_refuses_untrusted_hosts(redis_url: str, minter: TokenMinter) -> None:
    settings = gateway_settings(redis_url, trusted_hosts=["api.example"])
    async with running_gateway(settings, minter) as (_, client):
        response = await client.get("/catalog/echo", headers={"Host": "evil.example"})
    assert response.status_code == 400
    assert response.json()["detail"] == "Invalid host header"


async def test_the_merged_document_has_a_service_that_came_up_since_the_last_probe(
    gateway_with_a_late_replica: GatewayWithALateReplica,
) -> None:
    catalog = Upstream("catalog", spec=service_spec("catalog", item_field="price"))
    async with gateway_with_a_late_replica("catalog") as late, late.listen(catalog):
        spec = (await late.client.get("/openapi.json")).json()
    assert spec["info"]["x-unavailable-services"] == ["auth", "chat"]
    assert "/catalog/items" in spec["paths"]


async def test_merges_the_services_openapi_documents(redis_url: str, minter: TokenMinter) -> None:
    async with (
        running_upstream("auth", spec=service_spec("auth", item_field="email")) as (_, auth),
        running_upstream("catalog", spec=service_spec("catalog", item_field="price")) as (
            _,
            catalog,
        ),
    ):
        settings = gateway_settings(
            redis_url, auth_upstream=urls(auth), catalog_upstream=urls(catalog)
        )
        async with running_gateway(settings, minter) as (_, client):
            response = await client.get("/openapi.json")
            again = await client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert again.json() == spec
    assert spec["openapi"] == "3.1.0"
    assert spec["info"]["x-unavailable-services"] == ["chat"]
    paths = spec["paths"]
    # only what is reachable through the gateway; the gateway's own health
    assert set(paths) == {
        "/auth/items",
        "/auth/only-auth",
        "/catalog/items",
        "/catalog/only-catalog",
        "/healthz",
        "/readyz",
    }
    auth_items, catalog_items = paths["/auth/items"]["get"], paths["/catalog/items"]["get"]
    assert auth_items["operationId"] == "auth_list_items"
    assert catalog_items["operationId"] == "catalog_list_items"
    assert paths["/auth/only-auth"]["post"]["operationId"] == "create_auth"
    assert auth_items["tags"] == ["auth: items"]
    assert paths["/auth/only-auth"]["post"]["tags"] == ["auth"]
    ok = auth_items["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/auth.Item"}
    ok = catalog_items["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/catalog.Item"}
    invalid = catalog_items["responses"]["422"]["content"]["application/json"]["schema"]
    assert invalid == {"$ref": "#/components/schemas/HTTPValidationError"}
    schemas = spec["components"]["schemas"]
    assert schemas["auth.Item"]["properties"] == {"email": {"type": "string"}}
    assert schemas["catalog.Item"]["properties"] == {"price": {"type": "string"}}
    assert "Item" not in schemas
    assert "HTTPValidationError" in schemas
    assert set(spec["components"]["securitySchemes"]) == {"OAuth2PasswordBearer"}
    assert auth_items["security"] == [{"OAuth2PasswordBearer": []}]
    tag_names = [tag["name"] for tag in spec["tags"]]
    assert "auth: items" in tag_names
    assert "catalog: items" in tag_names
