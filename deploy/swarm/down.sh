#!/bin/sh
# `make swarm-down`: removes the stack $STACK and waits until its containers
# and networks are gone. Its volumes and secrets stay, as `make down` keeps
# compose's; with SWARM_DESTROY=1 (`make swarm-destroy`) they go too.
# Leaves the swarm only if `make swarm-up` made it and no stack is left on it.
set -eu
STACK=${STACK:-bazaar}
say() { printf 'swarm-down: %s\n' "$*" >&2; }

if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
  say "this engine is in no swarm"
  exit 0
fi

namespace="label=com.docker.stack.namespace=$STACK"
if [ -n "$(docker service ls -q --filter "$namespace")" ]; then
  docker stack rm "$STACK" >/dev/null
fi
deadline=$(( $(date +%s) + ${SWARM_WAIT_SECONDS:-120} ))
while [ -n "$(docker ps -aq --filter "$namespace")$(docker network ls -q --filter "$namespace")" ]; do
  # the migrate jobs' finished containers outlive their services
  stopped=$(docker ps -aq --filter "$namespace" --filter status=exited --filter status=created)
  [ -z "$stopped" ] || docker container rm $stopped >/dev/null 2>&1 || true
  if [ "$(date +%s)" -ge "$deadline" ]; then
    say "the containers or networks of $STACK are still there"
    exit 1
  fi
  sleep 1
done
say "removed stack $STACK"

if [ -n "${SWARM_DESTROY:-}" ]; then
  secrets=$(docker secret ls -q --filter "label=com.bazaar.stack=$STACK")
  [ -z "$secrets" ] || docker secret rm $secrets >/dev/null
  volumes=$(docker volume ls -q --filter "$namespace")
  [ -z "$volumes" ] || docker volume rm $volumes >/dev/null
  say "deleted the secrets and volumes of $STACK"
fi

node=$(docker info --format '{{.Swarm.NodeID}}')
made_here=$(docker node inspect --format '{{index .Spec.Labels "bazaar.swarm-made-by"}}' "$node")
if [ "$made_here" = swarm-up ]; then
  if [ -n "$(docker stack ls --format '{{.Name}}')" ]; then
    say "other stacks run on this swarm: staying in it"
  else
    docker swarm leave --force >/dev/null
    say "left the swarm that swarm-up made"
  fi
fi
