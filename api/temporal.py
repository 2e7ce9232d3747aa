"""Temporal queries: an aggregate's state at a version or an instant, rebuilt from the
events archive by the aggregate's own code (the same `@event` methods that decide
commands), so the past is never a second implementation of the domain. The API is
where the read side (the archive) and the write side (the aggregates) may meet.

Only the context's own events are read (the archive holds every context): an id that
is another context's aggregate, or no aggregate at all, has no past here (404). A
history that does not run 1, 2, 3, ... is no aggregate's either (an archive written
before ids were unique across contexts dropped the events of the second aggregate of
an id): it is said in the log and answered as unknown, never replayed into a 500.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import asyncpg

from commands import context_named
from commands.serialization import to_domain_event
from shared_kernel.envelope import EventMetadata

log = logging.getLogger(__name__)


async def state_at(
    conn: asyncpg.Connection | asyncpg.Pool,
    context: str,
    aggregate_id: str,
    version: int | None = None,
    at: datetime | None = None,
    *,
    tenant: str,
) -> dict[str, Any] | None:
    """The state after the last event at or below `version` and at or before `at`;
    None when the aggregate has no such event (it did not exist yet, or is unknown)."""
    rows = await conn.fetch(
        "SELECT version, headers, payload FROM events WHERE aggregate_id = $1 AND context = $2 "
        "AND ($3::int IS NULL OR version <= $3) AND ($4::timestamptz IS NULL OR occurred_at <= $4) "
        "AND tenant = $5 ORDER BY version",
        aggregate_id,
        context,
        version,
        at,
        tenant,
    )
    if [row["version"] for row in rows] != list(range(1, len(rows) + 1)):
        log.warning(
            "the archive's history of this aggregate has gaps; it is not replayed",
            extra={"context": context, "aggregate_id": aggregate_id},
        )
        return None
    ctx = context_named(context)
    aggregate: Any = None
    for row in rows:
        meta = EventMetadata.from_headers((k, v.encode()) for k, v in row["headers"].items())
        aggregate = to_domain_event(ctx, meta, row["payload"]).mutate(aggregate)
    return None if aggregate is None else dict(aggregate.state())
