#!/bin/sh
# `make swarm-up`: builds the images, joins a swarm (a single-node one made
# here if the engine is in none), labels where PostgreSQL and Redis keep their
# volumes, makes the stack's secrets, deploys deploy/swarm/stack.yaml as
# $STACK and waits until every migration ran and every replica is healthy.
#
# Needs only Docker (with its compose plugin for the build). Settings come
# from the environment, as compose reads them; see docs/operations.md.
set -eu
cd "$(dirname "$0")/../.."

STACK=${STACK:-bazaar}
TAG=${TAG:-dev}
REGISTRY=${REGISTRY:-}
WAIT_SECONDS=${SWARM_WAIT_SECONDS:-300}
export STACK TAG

say() { printf 'swarm-up: %s\n' "$*" >&2; }

# 1. Images: built here, or (REGISTRY set) already pushed by `make push`.
if [ -z "$REGISTRY" ] && [ -z "${SWARM_SKIP_BUILD:-}" ]; then
  say "building the images (tag $TAG)"
  docker compose build --quiet auth catalog chat gateway
fi

# 2. A swarm.
if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
  say "no swarm: initialising a single-node one"
  docker swarm init ${SWARM_ADVERTISE_ADDR:+--advertise-addr "$SWARM_ADVERTISE_ADDR"} >/dev/null
  # remembered in the swarm itself, so `make swarm-down` leaves only a swarm made here
  docker node update --label-add bazaar.swarm-made-by=swarm-up "$(docker info --format '{{.Swarm.NodeID}}')" >/dev/null
fi

# 3. Where the data lives: the first deploy pins it to this node; on a bigger
# swarm, label the node holding the volumes beforehand.
for store in postgres redis; do
  labelled=$(docker node ls -q --filter "node.label=bazaar.$store=true")
  if [ -z "$labelled" ]; then
    say "no node labelled bazaar.$store=true: labelling this one, where $store's volume will be"
    docker node update --label-add "bazaar.$store=true" "$(docker info --format '{{.Swarm.NodeID}}')" >/dev/null
  fi
done

# 4. Secrets: kept when they exist (they are immutable; docs/operations.md
# says how to rotate one), else from the environment, else random.
random_secret() {
  head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'
}
has_secret() { docker secret inspect "${STACK}_$1" >/dev/null 2>&1; }
# make_secret NAME: the secret's value on stdin. Not labelled as the stack's:
# `docker stack rm` would delete it, while the volumes it opens stay.
make_secret() { docker secret create --label "com.bazaar.stack=$STACK" "${STACK}_$1" - >/dev/null; }
secret_from() {  # secret_from NAME VALUE_FROM_ENVIRONMENT
  has_secret "$1" && return 0
  if [ -n "$2" ]; then printf '%s' "$2"; else random_secret; fi | make_secret "$1"
  say "created secret ${STACK}_$1"
}

secret_from postgres-superuser-password "${POSTGRES_PASSWORD:-}"
secret_from auth-database-password "${AUTH_DATABASE_PASSWORD:-}"
secret_from catalog-database-password "${CATALOG_DATABASE_PASSWORD:-}"
secret_from chat-database-password "${CHAT_DATABASE_PASSWORD:-}"
secret_from redis-password "${REDIS_PASSWORD:-}"

if ! has_secret admin-password; then
  if [ -n "${ADMIN_PASSWORD:-}" ]; then
    printf '%s' "$ADMIN_PASSWORD" | make_secret admin-password
  else
    generated=$(random_secret)
    printf '%s' "$generated" | make_secret admin-password
    say "admin ${ADMIN_EMAIL:-admin@example.com}: generated password, shown only this once: $generated"
    say "(it is set when the account is created; an existing account keeps its password)"
  fi
fi

image() { printf '%s/bazaar/%s:%s' "${REGISTRY:-docker.io}" "$1" "$TAG"; }
if ! has_secret signing-key; then
  if [ -n "${SIGNING_KEY:-}" ]; then
    printf '%s' "$SIGNING_KEY" | make_secret signing-key
  elif [ -n "${SIGNING_KEY_FILE:-}" ]; then
    make_secret signing-key < "$SIGNING_KEY_FILE"
  else
    # an ES256 key made by auth's own code, inside its image, with no network
    docker run --rm --network none --read-only "$(image auth)" python -c \
      'from auth.keys import generate_private_pem; print(generate_private_pem(), end="")' \
      | make_secret signing-key
  fi
  say "created secret ${STACK}_signing-key"
fi

# 5. Settings that are secrets only when set: a Docker secret named after its
# content (a changed value is a new secret, which rolls the services that read
# it), mounted through an override file, read through NAME_FILE; the variable
# itself is emptied, so the stack passes nothing the specs would show.
override=$(mktemp)
entries=$(mktemp)
declared=$(mktemp)
optional_secret() {  # optional_secret NAME SETTING SERVICE...
  name=$1 setting=$2
  shift 2
  eval "value=\${$setting:-}"
  [ -n "$value" ] || return 0
  full="$name-$(printf '%s' "$value" | sha256sum | cut -c1-12)"
  if ! has_secret "$full"; then
    printf '%s' "$value" | make_secret "$full"
    say "created secret ${STACK}_$full ($setting)"
  fi
  for service in "$@"; do printf '%s %s %s %s\n' "$service" "$setting" "$full" "$name" >>"$entries"; done
  printf '  %s: { external: true, name: "%s_%s" }\n' "$full" "$STACK" "$full" >>"$declared"
  eval "$setting="
  export "$setting"
}
optional_secret metrics-password METRICS_PASSWORD auth catalog chat gateway
optional_secret otlp-headers OTEL_EXPORTER_OTLP_HEADERS auth catalog chat gateway
optional_secret catalog-api-key CATALOG_API_KEY catalog
optional_secret oauth-clients OAUTH_CLIENTS auth
optional_secret smtp-url SMTP_URL auth
if [ -s "$entries" ]; then
  {
    printf 'version: "3.9"\nservices:\n'
    for service in auth catalog chat gateway; do
      grep "^$service " "$entries" >/dev/null || continue
      printf '  %s:\n    environment:\n' "$service"
      grep "^$service " "$entries" | while read -r _ setting _ name; do
        printf '      %s_FILE: /run/secrets/%s\n' "$setting" "$name"
      done
      printf '    secrets:\n'
      grep "^$service " "$entries" | while read -r _ _ full name; do
        printf '      - { source: %s, target: %s }\n' "$full" "$name"
      done
    done
    printf 'secrets:\n'
    cat "$declared"
  } >"$override"
fi

# 6. Deploy. DEPLOY_ID changes the migrate jobs' spec, so they run again.
# Compose makes the issuer PUBLIC_BASE_URL + /auth; a stack file cannot.
export JWT_ISSUER="${JWT_ISSUER:-${PUBLIC_BASE_URL:-http://localhost:8000}/auth}"
export DEPLOY_ID="${DEPLOY_ID:-$(date +%s)}"
if [ -n "$REGISTRY" ]; then resolve=always; else resolve=never; fi
say "deploying stack $STACK"
files="-c deploy/swarm/stack.yaml"
if [ -s "$entries" ]; then files="$files -c $override"; fi
status=0
# shellcheck disable=SC2086  # $files: options and mktemp paths, no spaces
docker stack deploy --detach=true --prune --resolve-image "$resolve" \
  ${REGISTRY:+--with-registry-auth} $files "$STACK" >/dev/null || status=$?
rm -f "$override" "$entries" "$declared"
[ "$status" = 0 ] || exit "$status"

# 7. Converged: every job of this deploy complete, every service at its
# replica count (a task with a health check counts once it is healthy).
exec sh deploy/swarm/wait.sh "$STACK" "$WAIT_SECONDS"
