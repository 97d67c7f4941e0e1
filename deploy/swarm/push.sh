#!/bin/sh
# `make push REGISTRY=host[:port][/path]`: tags every image built as
# bazaar/<name>:$TAG as $REGISTRY/bazaar/<name>:$TAG and pushes it, for a swarm
# of several nodes (each pulls from the registry; `make swarm-up` with the same
# REGISTRY and TAG deploys those images, pinned by digest).
# DRY_RUN=1 tags, and prints what it would push instead of pushing.
set -eu
: "${REGISTRY:?usage: make push REGISTRY=registry.example.com[:port][/path] [TAG=...]}"
TAG=${TAG:-dev}
REGISTRY=${REGISTRY%/}

for name in auth catalog chat gateway; do
  source="bazaar/$name:$TAG"
  target="$REGISTRY/bazaar/$name:$TAG"
  docker image inspect "$source" >/dev/null 2>&1 \
    || { echo "push: no image $source (make build TAG=$TAG first)" >&2; exit 1; }
  docker tag "$source" "$target"
  if [ -n "${DRY_RUN:-}" ]; then
    echo "would push $target"
  else
    docker push --quiet "$target"
  fi
done
