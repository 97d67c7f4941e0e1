"""Every container compose runs, the observability profile's included: no
capabilities beyond the few named, no privilege gain, memory and process
limits; the system's own on a read-only root file system."""

from __future__ import annotations

from .compose import compose_services

OBSERVABILITY = {"prometheus", "jaeger", "grafana"}
# Started as root with these only, to hand a volume or tmpfs to their user
CAPABILITIES = {"setup": ["CHOWN"]}


def test_every_container_is_contained_and_limited() -> None:
    every = compose_services("--profile", "observability")

    assert set(every) >= OBSERVABILITY
    for name, service in every.items():
        assert service.get("cap_drop") == ["ALL"], name
        assert service.get("cap_add", []) == CAPABILITIES.get(name, []), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert "privileged" not in service, name
        limits = service["deploy"]["resources"]["limits"]
        assert limits["memory"], name
        assert limits["pids"], name
        assert service.get("read_only", False) is (name not in OBSERVABILITY), name
