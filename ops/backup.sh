#!/bin/sh
# `make backup`: every service database of the running stack, dumped with
# `pg_dump --format=custom` into a new directory named after the UTC time.
# The dumps hold password hashes and the private signing keys: the directory
# is readable by its owner only. Redis is not backed up: it holds only
# short-lived state (revocations, counters, presence).
#
#   sh ops/backup.sh [parent directory, default backups]
set -eu

parent=${1:-backups}
target="$parent/$(date -u +%Y%m%dT%H%M%SZ)"
umask 077
mkdir -p "$target"
for database in auth catalog chat; do
  docker compose exec -T postgres \
    sh -c 'exec pg_dump --username="$POSTGRES_USER" --format=custom --dbname="$1"' \
    pg_dump "$database" > "$target/$database.dump.partial"
  mv "$target/$database.dump.partial" "$target/$database.dump"
done
echo "$target"
