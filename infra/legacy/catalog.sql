-- The stand-in for a system we do not own: a legacy catalogue keeping its datasets in
-- its own PostgreSQL tables. infra/stack.py runs this as the role `legacy` in the
-- database `legacy` (both its own) when it first creates them; the CDC job captures
-- this table's changes through Debezium (the publication is the project's, made by
-- `cqrs cdc apply` or the job's start).
CREATE SCHEMA IF NOT EXISTS catalog;
CREATE TABLE IF NOT EXISTS catalog.datasets (
    id text PRIMARY KEY,
    name text NOT NULL,
    description text,
    status text,
    owner_id text,
    metadata jsonb,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now()
);
