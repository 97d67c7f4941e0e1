"""One OpenAPI document for the whole system, merged from every service's.

Each service's `/openapi.json` is fetched from one of its replicas and the
merge is cached for `openapi_cache_seconds`. Only paths under the service's
own prefix are kept (the rest is not reachable through the gateway). Tags are
prefixed with the service name; a component name defined differently by two
services becomes `<service>.<Name>` in each of them (identical definitions,
such as FastAPI's `HTTPValidationError`, are shared), every `$ref` and
security requirement follows the rename, and a colliding operationId becomes
`<service>_<operationId>`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from gateway.runtime import ROUTE_NAMES, Runtime
from kit.errors import ServiceUnavailable

logger = logging.getLogger("gateway.openapi")

Spec = dict[str, Any]
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
UNAVAILABLE_RETRY_SECONDS = 10.0


def _reachable_paths(service: str, paths: Mapping[str, Any]) -> dict[str, Any]:
    prefix = f"/{service}"
    return {
        path: item
        for path, item in paths.items()
        if path == prefix or path.startswith(prefix + "/")
    }


def _component_renames(specs: Mapping[str, Spec]) -> dict[str, dict[str, dict[str, str]]]:
    """service -> section -> old name -> new name, for names defined differently."""
    definitions: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for service, spec in specs.items():
        for section, entries in spec.get("components", {}).items():
            for name, definition in entries.items():
                definitions[(section, name)][service] = json.dumps(definition, sort_keys=True)
    renames: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for (section, name), by_service in definitions.items():
        if len(set(by_service.values())) > 1:
            for service in by_service:
                renames[service][section][name] = f"{service}.{name}"
    return renames


def _rewrite_refs(node: Any, renames: Mapping[str, Mapping[str, str]]) -> None:
    def renamed(ref: str) -> str:
        parts = ref.split("/")
        if len(parts) == 4 and parts[:2] == ["#", "components"]:
            new = renames.get(parts[2], {}).get(parts[3])
            if new is not None:
                return f"#/components/{parts[2]}/{new}"
        return ref

    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                node[key] = renamed(value)
            elif key == "mapping" and isinstance(value, dict):
                for tag, target in value.items():
                    if isinstance(target, str):
                        value[tag] = renamed(target)
            else:
                _rewrite_refs(value, renames)
    elif isinstance(node, list):
        for item in node:
            _rewrite_refs(item, renames)


def _rename_security(requirements: Any, schemes: Mapping[str, str]) -> Any:
    if not isinstance(requirements, list) or not schemes:
        return requirements
    return [
        {schemes.get(name, name): scopes for name, scopes in requirement.items()}
        for requirement in requirements
    ]


def _prefixed_tag(service: str, tag: str) -> str:
    return service if tag == service else f"{service}: {tag}"


def _operations(paths: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        item[method]
        for item in paths.values()
        for method in HTTP_METHODS
        if isinstance(item.get(method), dict)
    ]


def merge_specs(specs: Mapping[str, Spec], *, title: str, version: str) -> Spec:
    """Merges specs keyed by service name; `gateway` keeps all its paths."""
    specs = {service: copy.deepcopy(spec) for service, spec in specs.items()}
    for service, spec in specs.items():
        if service != "gateway":
            spec["paths"] = _reachable_paths(service, spec.get("paths", {}))
    renames = _component_renames(specs)
    operation_counts: dict[str, int] = defaultdict(int)
    for spec in specs.values():
        for operation in _operations(spec.get("paths", {})):
            if "operationId" in operation:
                operation_counts[operation["operationId"]] += 1

    merged: Spec = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": {},
        "components": {},
        "tags": [],
    }
    for service, spec in specs.items():
        service_renames = renames.get(service, {})
        _rewrite_refs(spec, service_renames)
        _label_operations(service, spec, service_renames, operation_counts)
        merged["paths"].update(spec.get("paths", {}))
        for section, entries in spec.get("components", {}).items():
            target = merged["components"].setdefault(section, {})
            for name, definition in entries.items():
                target[service_renames.get(section, {}).get(name, name)] = definition
        known_tags = {tag["name"] for tag in merged["tags"]}
        for tag in spec.get("tags", []):
            name = _prefixed_tag(service, tag["name"])
            if name not in known_tags:
                merged["tags"].append({**tag, "name": name})
                known_tags.add(name)
    if not merged["components"]:
        del merged["components"]
    return merged


def _label_operations(
    service: str,
    spec: Spec,
    renames: dict[str, dict[str, str]],
    operation_counts: Mapping[str, int],
) -> None:
    """Tags each operation with its service, prefixes an operation id that two
    services share, and points its security at the renamed schemes."""
    schemes = renames.get("securitySchemes", {})
    for operation in _operations(spec.get("paths", {})):
        operation["tags"] = [
            _prefixed_tag(service, tag) for tag in operation.get("tags") or [service]
        ]
        operation_id = operation.get("operationId")
        if operation_id is not None and operation_counts[operation_id] > 1:
            operation["operationId"] = f"{service}_{operation_id}"
        if "security" in operation:
            operation["security"] = _rename_security(operation["security"], schemes)
        if "security" in spec and "security" not in operation:
            operation["security"] = _rename_security(spec["security"], schemes)


class MergedOpenApi:
    """Fetches, merges and caches; one fetch at a time however many ask."""

    def __init__(self, runtime: Runtime, own_spec: Callable[[], Spec], *, title: str) -> None:
        self.runtime = runtime
        self.own_spec = own_spec
        self.title = title
        self._cached: Spec | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def document(self) -> Spec:
        if self._cached is not None and time.monotonic() < self._expires_at:
            return self._cached
        async with self._lock:
            if self._cached is None or time.monotonic() >= self._expires_at:
                self._cached, complete = await self._build()
                ttl = self.runtime.settings.openapi_cache_seconds
                self._expires_at = time.monotonic() + (
                    ttl if complete else min(ttl, UNAVAILABLE_RETRY_SECONDS)
                )
            return self._cached

    async def _build(self) -> tuple[Spec, bool]:
        fetched = await asyncio.gather(*(self._fetch(name) for name in ROUTE_NAMES))
        specs: dict[str, Spec] = {"gateway": self.own_spec()}
        missing: list[str] = []
        for name, spec in zip(ROUTE_NAMES, fetched, strict=True):
            if spec is None:
                missing.append(name)
            else:
                specs[name] = spec
        merged = merge_specs(specs, title=self.title, version="1")
        merged["info"]["description"] = "Every service's operations, through the gateway."
        if missing:
            merged["info"]["description"] += f" Not reachable right now: {', '.join(missing)}."
            merged["info"]["x-unavailable-services"] = missing
        return merged, not missing

    async def _fetch(self, name: str) -> Spec | None:
        route = self.runtime.routes[name]
        pool = route.pool
        try:
            # as for a request: a replica up since the last round is looked for
            replica = await self.runtime.replica_for(route, ())
        except ServiceUnavailable:
            return None
        try:
            response = await self.runtime.http.get(
                str(replica.origin.with_path("/openapi.json")),
                headers={"Host": pool.host_header},
                timeout=5.0,
            )
            response.raise_for_status()
            spec = response.json()
        except (httpx.HTTPError, ValueError) as error:
            logger.warning("cannot fetch the %s OpenAPI document: %s", name, error)
            return None
        return spec if isinstance(spec, dict) else None
