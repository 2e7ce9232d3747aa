#!/bin/sh
# The legacy catalogue for the Docker stack (docker-compose.kafka.yml): the same database,
# role and table infra/stack.py creates, run once by the postgres image's entrypoint.
set -e
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres <<SQL
CREATE ROLE legacy LOGIN REPLICATION PASSWORD 'legacy';
CREATE DATABASE legacy OWNER legacy;
SQL
{ echo "SET ROLE legacy;"; cat /legacy/catalog.sql; } | psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d legacy
