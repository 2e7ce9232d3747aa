"""The read side's tables, made at start by whichever process comes first.

Two kinds: the bookkeeping every projection shares (positions, counters, versions,
workers), by the SQL migrations in `sql/`, applied once each and in order; and each
projection's own storage, from the projection's code (`Projection.ddl`), which defines
it once for version 1 and for every version a rebuild builds. A projection that has no
live table yet (a new deployment, a newly registered projection) gets version 1 and
the view readers query.
"""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

from projections import versions
from projections.db import schema_name
from projections.projection import Projection
from projections.registry import PROJECTIONS
from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

MIGRATION_LOCK = 0x7265_6164  # advisory lock key: one migrator at a time
SQL_DIR = Path(__file__).resolve().parent / "sql"


def migrations() -> list[tuple[str, str]]:
    return sorted((f.name, f.read_text()) for f in SQL_DIR.glob("*.sql"))


async def migrate(settings: Settings) -> list[str]:
    """Apply the migrations not applied yet, each in its own transaction, then create the
    live storage of every PostgreSQL projection that has none. Returns what was done."""
    schema = schema_name(settings)
    conn = await asyncpg.connect(settings.postgres_dsn)
    done: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET search_path TO "{schema}"')
            done += await _apply_migrations(conn, schema)
            done += await _create_storage(conn, settings)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()
    return done


async def _apply_migrations(conn: asyncpg.Connection, schema: str) -> list[str]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    applied = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
    done = []
    for name, sql in migrations():
        if name in applied:
            continue
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
        done.append(name)
        log.info("migration applied", extra={"schema": schema, "migration": name})
    return done


async def _create_storage(conn: asyncpg.Connection, settings: Settings) -> list[str]:
    """Only what is missing is created: a statement on an existing table would queue
    behind the projectors' writes for a lock."""
    schema = schema_name(settings)
    done = []
    for projection in PROJECTIONS.values():
        if projection.store != "postgresql":
            continue  # search indexes are made by whoever opens them (`ensure_index`)
        async with conn.transaction():
            await versions.register(conn, projection.name)
            live = projection.at(await versions.live_version(conn, projection.name))
            if await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".{live.physical}') is None:
                await live.create_storage(conn, settings)
                done.append(live.physical)
            added = await _add_columns(conn, settings, schema, live)
            if added:
                await live.make_live(conn, settings)  # the view shows the new columns
                done += [f"{live.physical}.{c}" for c in added]
            elif await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".{live.table}') is None:
                await live.make_live(conn, settings)
                done.append(live.table)
    if done:
        log.info("read model storage created", extra={"schema": schema, "tables": done})
    return done


class _Probed(Exception):
    """Rolls the probe's savepoint back."""


async def _add_columns(
    conn: asyncpg.Connection, settings: Settings, schema: str, live: Projection
) -> list[str]:
    """Columns the projection's code defines that its live table, made by older code,
    lacks are added (empty, or at their default), and the reader's view made again.
    Their values are not derived for the rows there: a rebuild does that (`cqrs
    projections rebuild NAME`). Until then a row made before tenancy (no `tenant`)
    belongs to no tenant, and no caller sees it."""
    query = (
        "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, "
        "pg_get_expr(d.adbin, d.adrelid) AS default FROM pg_attribute a "
        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
    )
    have = {r["name"] for r in await conn.fetch(query, f'"{schema}".{live.physical}')}
    probe = live.at(0)
    wanted: list[asyncpg.Record] = []
    try:
        async with conn.transaction():  # a savepoint: the probe's table is never kept
            await probe.create_storage(conn, settings)
            wanted = await conn.fetch(query, f'"{schema}".{probe.physical}')
            raise _Probed
    except _Probed:
        pass
    added = []
    for column in wanted:
        if column["name"] in have:
            continue
        default = f" NOT NULL DEFAULT {column['default']}" if column["default"] is not None else ""
        name, kind = column["name"], column["type"]
        await conn.execute(f'ALTER TABLE {live.physical} ADD COLUMN "{name}" {kind}{default}')
        added.append(column["name"])
    if added:
        log.warning(
            "read model made by older code: columns added; rebuild it to fill them",
            extra={"table": live.physical, "columns": added},
        )
    return added
