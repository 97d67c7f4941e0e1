"""`make push` (deploy/swarm/push.sh): every image tagged for the registry and
pushed. No registry is reachable from the test machine, so the push itself
is shown as far as it goes: a dry run names every image, a real run reaches
for the registry and fails loudly when nobody answers."""

from __future__ import annotations

import os
import subprocess

import pytest

from kit_testing import free_port

from .conftest import ROOT, Swarm, docker

IMAGES = ("auth", "catalog", "chat", "gateway")


def push(**environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "deploy/swarm/push.sh"],
        cwd=ROOT,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def image_id(reference: str) -> str:
    return docker("image", "inspect", "--format", "{{.Id}}", reference).strip()


@pytest.fixture
def tag(swarm: Swarm) -> str:
    """The tag the swarm fixture built (and deployed)."""
    return swarm.tag


def test_a_dry_run_tags_every_image_for_the_registry_and_names_it(tag: str) -> None:
    registry = "registry.invalid:5000/team"
    targets = [f"{registry}/bazaar/{name}:{tag}" for name in IMAGES]
    try:
        done = push(REGISTRY=f"{registry}/", TAG=tag, DRY_RUN="1")

        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"would push {target}" for target in targets]
        for name, target in zip(IMAGES, targets, strict=True):
            assert image_id(target) == image_id(f"bazaar/{name}:{tag}")
    finally:
        for target in targets:
            subprocess.run(["docker", "image", "rm", target], capture_output=True, check=False)


def test_a_push_goes_to_the_registry_and_fails_when_none_answers(tag: str) -> None:
    registry = f"127.0.0.1:{free_port()}"
    target = f"{registry}/bazaar/auth:{tag}"
    try:
        done = push(REGISTRY=registry, TAG=tag)

        assert done.returncode != 0
        assert registry in done.stderr
        assert image_id(target) == image_id(f"bazaar/auth:{tag}")
    finally:
        for name in IMAGES:
            subprocess.run(
                ["docker", "image", "rm", f"{registry}/bazaar/{name}:{tag}"],
                capture_output=True,
                check=False,
            )


def test_without_a_registry_it_says_how_to_call_it() -> None:
    done = push(REGISTRY="")

    assert done.returncode != 0
    assert "usage: make push REGISTRY=" in done.stderr
