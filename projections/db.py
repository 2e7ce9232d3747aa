"""PostgreSQL access of the read side: one schema per topic prefix, pools, codecs."""

from __future__ import annotations

import logging
import re
from typing import Any

import asyncpg
import orjson

from shared_kernel.settings import Settings

log = logging.getLogger(__name__)

JSONB_V1 = b"\x01"  # jsonb's binary format: a version byte, then the JSON text


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
