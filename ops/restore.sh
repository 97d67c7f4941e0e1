#!/bin/sh
# `make restore BACKUP=backups/<time>`: replaces every service database with
# the dumps of a backup (ops/backup.sh), in a running stack, a stopped one, or
# one destroyed with its volumes, then starts the stack.
#
# The services are stopped meanwhile. Each service's migrate step first makes
# its role and database (a fresh volume has neither); then each database is
# dropped and created again, owned by its service's role, and the dump is
# loaded as that role, so a backup restores into any stack whatever its
# generated passwords are. Last, `up` runs the migrate steps again, which
# bring a backup from an older version up to date, and starts the services.
set -eu

source=${1:?usage: restore.sh <backup directory>}
databases="auth catalog chat"
for database in $databases; do
  if [ ! -s "$source/$database.dump" ]; then
    echo "restore: $source/$database.dump is missing or empty" >&2
    exit 1
  fi
done

docker compose stop gateway auth catalog chat
docker compose up --detach --wait postgres
pids=""
for database in $databases; do
  docker compose run --rm --no-deps "migrate-$database" >/dev/null &
  pids="$pids $!"
done
for pid in $pids; do wait "$pid"; done

for database in $databases; do
  # the role is the database's name (see compose.yaml); dropdb --force ends
  # any connection left, such as an admin command's
  docker compose exec -T postgres sh -c '
    set -e
    dropdb --username="$POSTGRES_USER" --if-exists --force "$1"
    createdb --username="$POSTGRES_USER" --owner="$1" "$1"
    psql --username="$POSTGRES_USER" --quiet --dbname=postgres \
      --command="REVOKE ALL ON DATABASE \"$1\" FROM PUBLIC"
    pg_restore --username="$POSTGRES_USER" --dbname="$1" --role="$1" \
      --no-owner --no-privileges --exit-on-error
  ' restore "$database" < "$source/$database.dump"
  echo "restored $database from $source"
done
docker compose up --detach --wait
