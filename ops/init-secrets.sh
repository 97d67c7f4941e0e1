#!/bin/sh
# Compose's `setup` step, before anything else starts: every secret the stack
# needs, each written to the volume of the containers that read it (they see
# their own secrets only), and the Redis data volume handed to the redis user.
#
# A secret comes from the environment when the operator set it (.env), else
# it is the one kept from an earlier start, else a new random one. So a fresh
# `docker compose up` has no known password, and later starts keep theirs.
set -eu

random_secret() {
  # 192 random bits, URL-safe: no quoting needed in a URL or a config file
  head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'
}

# choose VALUE_FROM_ENVIRONMENT KEPT_FILE: the secret to use
choose() {
  if [ -n "$1" ]; then
    printf '%s' "$1"
  elif [ -s "$2" ]; then
    cat "$2"
  else
    random_secret
  fi
}

# put FILE VALUE: written whole or not at all; readable by the container's
# user, whatever its uid (only that container mounts the volume)
put() {
  printf '%s' "$2" > "$1.new"
  chmod 0444 "$1.new"
  mv -f "$1.new" "$1"
}

superuser_password=$(choose "${POSTGRES_PASSWORD:-}" /secrets/postgres/superuser-password)
redis_password=$(choose "${REDIS_PASSWORD:-}" /secrets/redis/password)

put /secrets/postgres/superuser-password "$superuser_password"
put /secrets/redis/password "$redis_password"
# requirepass in a config file, so the password is in no process's arguments
escaped=$(printf '%s' "$redis_password" | sed 's/[\\"]/\\&/g')
put /secrets/redis/redis.conf "requirepass \"$escaped\""

for service in auth catalog chat; do
  case $service in
    auth) configured=${AUTH_DATABASE_PASSWORD:-} ;;
    catalog) configured=${CATALOG_DATABASE_PASSWORD:-} ;;
    chat) configured=${CHAT_DATABASE_PASSWORD:-} ;;
  esac
  put "/secrets/$service/database-password" \
    "$(choose "$configured" "/secrets/$service/database-password")"
  put "/secrets/$service/redis-password" "$redis_password"
done
put /secrets/gateway/redis-password "$redis_password"
# auth's signing key, when the operator gave one: SIGNING_KEY (its PEM), or
# SIGNING_KEY_FILE (a file on this machine, mounted here as /input/signing-key).
# An empty file names none: auth then keeps the key it generates in its
# database. Kept out of every container's environment either way.
if [ -n "${SIGNING_KEY:-}" ]; then
  put /secrets/auth/signing-key "$SIGNING_KEY"
elif [ -s /input/signing-key ]; then
  put /secrets/auth/signing-key "$(cat /input/signing-key)"
else
  put /secrets/auth/signing-key ""
fi
# Grafana's admin (the observability profile): its image reads
# GF_SECURITY_ADMIN_PASSWORD__FILE
put /secrets/grafana/admin-password \
  "$(choose "${GRAFANA_ADMIN_PASSWORD:-}" /secrets/grafana/admin-password)"

# The official redis image's /data already belongs to redis; a volume first
# mounted by an image whose /data is root's does not.
chown redis:redis /data
