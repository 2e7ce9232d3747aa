"""Temporal queries: an aggregate's state at a version or an instant, rebuilt from the
events archive by the aggregate's own code (the same `@event` methods that decide
commands), so the past is never a second implementation of the domain. The API is
where the read side (the archive) and the write side (the aggregates) may meet."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from commands import context_named
from commands.serialization import to_domain_event
from shared_kernel.envelope import EventMetadata


async def state_at(
    conn: asyncpg.Connection | asyncpg.Pool,
    context: str,
    aggregate_id: str,
    version: int | None = None,
    at: datetime | None = None,
) -> dict[str, Any] | None:
    """The state after the last event at or below `version` and at or before `at`;
    None when the aggregate has no such event (it did not exist yet, or is unknown)."""
    rows = await conn.fetch(
        "SELECT headers, payload FROM events WHERE aggregate_id = $1 AND context = $2 "
        "AND ($3::int IS NULL OR version <= $3) AND ($4::timestamptz IS NULL OR occurred_at <= $4) "
        "ORDER BY version",
        aggregate_id,
        context,
        version,
        at,
    )
    ctx = context_named(context)
    aggregate: Any = None
    for row in rows:
        meta = EventMetadata.from_headers((k, v.encode()) for k, v in row["headers"].items())
        aggregate = to_domain_event(ctx, meta, row["payload"]).mutate(aggregate)
    return None if aggregate is None else dict(aggregate.state())
