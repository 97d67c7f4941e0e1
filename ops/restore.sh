#!/bin/sh
# `make restore BACKUP=backups/<time>`: replaces every service database of
# the running stack with the dumps of a backup (ops/backup.sh), then lets the
# migrate steps bring an older backup up to date and starts the services.
#
# The services are stopped meanwhile. Each database is dropped and created
# again, owned by its service's role, and the dump is loaded as that role, so
# a backup restores into any stack whatever its generated passwords are.
set -eu

source=${1:?usage: restore.sh <backup directory>}
for database in auth catalog chat; do
  if [ ! -s "$source/$database.dump" ]; then
    echo "restore: $source/$database.dump is missing or empty" >&2
    exit 1
  fi
done

docker compose stop gateway auth catalog chat
for database in auth catalog chat; do
  # the role is the database's name (see compose.yaml); dropdb --force ends
  # any connection left, such as an admin command
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
