"""PostgreSQL access of the read side: one schema per topic prefix, migrations at start."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

JSONB_V1 = b"\x01"  # jsonb's binary format: a version byte, then the JSON text
MIGRATION_LOCK = 0x7265_6164  # advisory lock key: one migrator at a time


def schema_name(settings: Settings) -> str:
    """The read models of a deployment live in a schema named after its topic prefix."""
    return schema_of(settings.topic_prefix)


def schema_of(topic_prefix: str) -> str:
    name = re.sub(r"[^a-z0-9_]", "_", topic_prefix.lower())
    return name if name[:1].isalpha() else f"p_{name}"


async def init_connection(conn: asyncpg.Connection) -> None:
    # binary codecs: `COPY` (the bulk path of rebuilds) takes nothing else
    await conn.set_type_codec(
        "json", encoder=orjson.dumps, decoder=orjson.loads, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: JSONB_V1 + orjson.dumps(v),
        decoder=lambda b: orjson.loads(b[1:]),
        schema="pg_catalog",
        format="binary",
    )


async def keep_session(conn: asyncpg.Connection) -> None:
    """A pool `reset` for connections that leave no session state behind (no session
    advisory locks, cursors, LISTEN or SET): asyncpg still rolls back an open transaction
    on release, and this skips the second statement its default reset sends on every
    release (unlock all, close all, unlisten, reset all), a round trip per query."""


async def create_pool(settings: Settings, role: str = "", **options: Any) -> asyncpg.Pool:
    """A pool whose connections read and write the deployment's schema; `role` names
    the process in `pg_stat_activity` (after the service name)."""
    schema = schema_name(settings)
    app_name = f"{settings.service_name}:{role}" if role else settings.service_name
    pool = await asyncpg.create_pool(
        settings.postgres_dsn,
        server_settings={"search_path": schema, "application_name": app_name[:63]},
        init=init_connection,
        **{"min_size": 1, "max_size": 10, **options},
    )
    assert pool is not None
    return pool


SQL_DIR = Path(__file__).resolve().parent / "sql"


def migrations() -> list[tuple[str, str]]:
    return sorted((f.name, f.read_text()) for f in SQL_DIR.glob("*.sql"))


async def migrate(settings: Settings) -> list[str]:
    """Apply the migrations not applied yet, in order, each in its own transaction."""
    schema = schema_name(settings)
    conn = await asyncpg.connect(settings.postgres_dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET search_path TO "{schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for name, sql in migrations():
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied.append(name)
                log.info("migration applied", extra={"schema": schema, "migration": name})
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()
    return applied
