"""deploy/kubernetes: every manifest valid against the Kubernetes schemas
(strict: an unknown field is an error), and the properties operators rely
on. These manifests are validated here, never run."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from auth.config import Settings as AuthSettings
from catalog.config import Settings as CatalogSettings
from chat.config import Settings as ChatSettings
from gateway.config import Settings as GatewaySettings
from kit.migrations import MigrationSettings

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
# The newest schemas kubernetes-validate ships (pinned in pyproject.toml)
KUBERNETES_VERSION = "1.37.0"
SERVICES = ("auth", "catalog", "chat", "gateway")
SETTINGS: dict[str, type[BaseSettings]] = {
    "auth": AuthSettings,
    "catalog": CatalogSettings,
    "chat": ChatSettings,
    "gateway": GatewaySettings,
    "migrate": MigrationSettings,
}
URL_WITH_PASSWORD = re.compile(r"://[^/@:]+:[^/@]+@")
# Read by uvicorn's command line in the images, not by the settings classes
UVICORN = {"UVICORN_WS_MAX_SIZE", "UVICORN_LOG_LEVEL"}


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return loaded


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in kustomization()["resources"]:
        for document in yaml.safe_load_all((BASE / name).read_text()):
            if document:
                yield name, document


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == kind}


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) for every container of every workload."""
    for kind in ("Deployment", "StatefulSet", "Job"):
        for name, workload in objects(kind).items():
            for container in pod(workload)["containers"]:
                yield name, pod(workload), container


def test_the_kustomization_lists_every_manifest_and_nothing_else() -> None:
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")

    assert sorted(listed) == on_disk
    assert kustomization()["namespace"] == "bazaar"
    assert {image["name"] for image in kustomization()["images"]} == {
        f"bazaar/{name}" for name in SERVICES
    }


@pytest.mark.parametrize(
    ("name", "document"),
    [pytest.param(n, d, id=f"{n}:{d['kind']}/{d['metadata']['name']}") for n, d in documents()],
)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(
    name: str, document: dict[str, Any]
) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_an_unknown_field() -> None:
    """Strict validation has teeth: a misspelt field fails."""
    deployment = next(iter(objects("Deployment").values()))
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 3}}

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_a_deployment_per_service_with_probes_and_resources() -> None:
    deployments = objects("Deployment")

    assert set(deployments) == set(SERVICES)
    for name, deployment in deployments.items():
        strategy = deployment["spec"]["strategy"]
        assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}, name
        (container,) = pod(deployment)["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["resources"]["requests"]["cpu"], name
        assert container["resources"]["limits"]["memory"], name


def test_every_container_runs_unprivileged_and_read_only() -> None:
    for name, spec, container in containers():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"]["drop"] == ["ALL"], name
        assert "add" not in context["capabilities"], name
        assert container["resources"]["limits"]["memory"], name


@pytest.mark.parametrize("name", SERVICES)
def test_every_pod_leaves_discovery_before_it_stops_listening(name: str) -> None:
    spec = pod(objects("Deployment")[name])
    (container,) = spec["containers"]
    wait = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    uvicorn_graceful_seconds = 10  # --timeout-graceful-shutdown in every image
    dns_refresh = GatewaySettings.model_fields["dns_refresh_seconds"].default
    coredns_ttl = 5  # CoreDNS's kubernetes plugin answers with a 5 s TTL

    # the wait outlasts the gateway's DNS refresh and the record's lifetime
    # (the gateway's own pods: a load balancer's health checks, longer), and
    # the grace period covers the wait and the drain both
    assert wait >= dns_refresh + coredns_ttl, name
    assert spec["terminationGracePeriodSeconds"] >= wait + uvicorn_graceful_seconds + 5, name


@pytest.mark.parametrize("name", SERVICES)
def test_replicas_spread_over_nodes_and_a_drain_takes_one_at_a_time(name: str) -> None:
    (spread,) = pod(objects("Deployment")[name])["topologySpreadConstraints"]
    budget = objects("PodDisruptionBudget")[name]["spec"]

    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"] == {"matchLabels": {"app.kubernetes.io/name": name}}
    assert budget == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
    }


def pool_size(name: str) -> int:
    """PostgreSQL connections one pod of `name` may hold, from its settings'
    defaults and what the manifests set."""
    container = pod(objects("Deployment")[name])["containers"][0]
    values = {**objects("ConfigMap")["bazaar-shared"]["data"]}
    values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    fields = SETTINGS[name].model_fields

    def setting(field: str) -> int:
        return int(values.get(field.upper(), fields[field].default))

    size = setting("database_pool_size") + setting("database_pool_overflow")
    return size + (setting("point_read_pool_size") if "point_read_pool_size" in fields else 0)


def test_the_services_at_their_most_pods_stay_within_postgres_connections() -> None:
    """Every pool together, with chat at the autoscaler's ceiling and a
    migrate Job's two connections for each service, within PostgreSQL's 100
    less the 3 kept for the superuser (docs/operations.md)."""
    deployments = objects("Deployment")
    (autoscaler,) = objects("HorizontalPodAutoscaler").values()
    most = {name: deployments[name]["spec"]["replicas"] for name in ("auth", "catalog", "chat")}
    most[autoscaler["spec"]["scaleTargetRef"]["name"]] = autoscaler["spec"]["maxReplicas"]
    postgres = pod(objects("StatefulSet")["postgres"])["containers"][0]

    assert "max_connections" not in str(postgres.get("args", [])), "the budget assumes 100"
    assert sum(pods * pool_size(name) for name, pods in most.items()) + 6 <= 97


def test_chat_and_catalog_resolve_to_every_pod() -> None:
    services = objects("Service")

    for name in ("auth", "catalog", "chat"):
        assert services[name]["spec"]["clusterIP"] == "None", name
        assert services[name]["spec"]["selector"] == {"app.kubernetes.io/name": name}
    gateway = objects("Deployment")["gateway"]
    environment = {e["name"]: e.get("value") for e in pod(gateway)["containers"][0]["env"]}
    assert environment["CHAT_UPSTREAM"] == "http://chat:8000"
    assert environment["CATALOG_UPSTREAM"] == "http://catalog:8000"
    # only the gateway is exposed outside the cluster
    exposed = {n for n, s in services.items() if s["spec"].get("type", "ClusterIP") != "ClusterIP"}
    assert exposed == {"gateway"}


def test_a_migration_job_per_service() -> None:
    jobs = objects("Job")

    assert set(jobs) == {"migrate-auth", "migrate-catalog", "migrate-chat"}
    for name, job in jobs.items():
        assert 0 < job["spec"]["backoffLimit"] <= 20, name
        assert pod(job)["restartPolicy"] == "OnFailure"
        assert pod(job)["containers"][0]["command"] == ["alembic", "upgrade", "head"]
        assert pod(job)["containers"][0]["image"] == f"bazaar/{name.removeprefix('migrate-')}"


def test_secrets_are_referenced_never_written_down() -> None:
    assert objects("Secret") == {}
    assert "secretGenerator" not in kustomization()
    for name, spec, container in containers():
        mounted = {
            mount["mountPath"]
            for mount in container.get("volumeMounts", [])
            if any(v["name"] == mount["name"] and "secret" in v for v in spec.get("volumes", []))
        }
        for variable in container.get("env", []):
            value = variable.get("value", "")
            if variable["name"].endswith("_FILE"):
                # a file of a mounted Secret
                assert any(value.startswith(f"{path}/") for path in mounted), (name, variable)
            else:
                assert not any(
                    word in variable["name"] for word in ("PASSWORD", "SECRET", "KEY")
                ), (name, variable)
                assert not URL_WITH_PASSWORD.search(value), (name, variable)
    config = objects("ConfigMap")["bazaar-shared"]["data"]
    for setting, value in config.items():
        if not setting.endswith("_FILE"):
            assert not any(word in setting for word in ("PASSWORD", "SECRET")), setting
        assert not URL_WITH_PASSWORD.search(value), setting


def test_every_variable_is_a_setting_of_the_container_that_gets_it() -> None:
    shared = set(objects("ConfigMap")["bazaar-shared"]["data"])
    for name, _, container in containers():
        if name not in SERVICES and not name.startswith("migrate-"):
            continue
        settings = SETTINGS["migrate" if name.startswith("migrate-") else name]
        known = {field.upper() for field in settings.model_fields}
        names = {variable["name"] for variable in container.get("env", [])}
        if container.get("envFrom"):
            names |= shared
        unknown = {
            n for n in names - UVICORN if n not in known and n.removesuffix("_FILE") not in known
        }
        assert unknown == set(), name


def test_the_gateway_sees_each_client_address() -> None:
    # rate limits and the connection cap count by it: a node's address in its
    # place would put every client behind that node in one bucket
    (public,) = (
        service
        for service in objects("Service").values()
        if service["spec"].get("type") == "LoadBalancer"
    )
    assert public["metadata"]["name"] == "gateway"
    assert public["spec"]["externalTrafficPolicy"] == "Local"


def test_chat_scales_on_its_own_and_survives_drains() -> None:
    (autoscaler,) = objects("HorizontalPodAutoscaler").values()
    budgets = objects("PodDisruptionBudget")

    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "chat",
    }
    assert autoscaler["spec"]["minReplicas"] >= 3
    assert autoscaler["spec"]["maxReplicas"] > autoscaler["spec"]["minReplicas"]
    assert budgets["chat"]["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "chat"}
    assert budgets["chat"]["spec"]["maxUnavailable"] == 1


def allowed_sources(target: str) -> set[str] | None:
    """Pod names allowed to connect to `target`'s pods; None: from anywhere."""
    sources: set[str] = set()
    for policy in objects("NetworkPolicy").values():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if selector.get("app.kubernetes.io/name") != target:
            continue
        for rule in policy["spec"].get("ingress", []):
            if "from" not in rule:
                return None
            for peer in rule["from"]:
                labels = peer["podSelector"]
                if "matchLabels" in labels:
                    sources.add(labels["matchLabels"]["app.kubernetes.io/name"])
                for expression in labels.get("matchExpressions", []):
                    assert expression["operator"] == "In"
                    sources.update(expression["values"])
    return sources


def test_network_policies_let_in_only_who_needs_in() -> None:
    policies = objects("NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]

    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    assert allowed_sources("gateway") is None
    assert allowed_sources("catalog") == {"gateway"}
    assert allowed_sources("chat") == {"gateway"}
    assert allowed_sources("auth") == {"gateway", "catalog", "chat"}
    migrations = {"migrate-auth", "migrate-catalog", "migrate-chat"}
    assert allowed_sources("postgres") == {"auth", "catalog", "chat"} | migrations
    assert allowed_sources("redis") == {"auth", "catalog", "chat", "gateway"}
    scrape = policies["metrics-from-monitoring"]["spec"]
    (expression,) = scrape["podSelector"]["matchExpressions"]
    assert sorted(expression["values"]) == sorted(SERVICES)
    assert scrape["ingress"] == [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
            "ports": [{"port": "http"}],
        }
    ]


def test_postgres_and_redis_are_stateful_sets_with_their_own_volumes() -> None:
    sets = objects("StatefulSet")

    assert set(sets) == {"postgres", "redis"}
    for name, stateful in sets.items():
        (claim,) = stateful["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], name
        assert stateful["spec"]["serviceName"] == name
        assert stateful["spec"]["replicas"] == 1
    text = (BASE / "postgres.yaml").read_text() + (BASE / "redis.yaml").read_text()
    assert text.count("In production use a managed") + text.count("In production a managed") == 2
