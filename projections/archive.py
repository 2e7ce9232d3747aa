"""The events archive: every event of every context with its headers and position, the
history behind `/{id}/events` and the temporal queries."""

from __future__ import annotations

from typing import Any, ClassVar

from projections.append_only import AppendOnly
from projections.events import StoredEvent


class EventsArchiveProjection(AppendOnly):
    """Every event with its headers, payload as JSONB, partition and offset."""

    name = "events"
    contexts: ClassVar[tuple[str, ...]] = ()  # every context: `projections.registry` sets them
    table = "events"
    ddl = """
        CREATE TABLE IF NOT EXISTS {table} (
            event_id        uuid        PRIMARY KEY,
            topic           text        NOT NULL,
            partition       int         NOT NULL,
            "offset"        bigint      NOT NULL,
            context         text        NOT NULL,
            aggregate_type  text        NOT NULL,
            aggregate_id    text        NOT NULL,
            tenant          text        NOT NULL DEFAULT '',
            version         int         NOT NULL,
            event_type      text        NOT NULL,
            occurred_at     timestamptz NOT NULL,
            headers         jsonb       NOT NULL,
            payload         jsonb       NOT NULL,
            UNIQUE (aggregate_id, version)
        );
        CREATE INDEX IF NOT EXISTS {table}_time ON {table} (aggregate_id, occurred_at);
    """

    columns = (
        "event_id",
        "topic",
        "partition",
        "offset",
        "context",
        "aggregate_type",
        "aggregate_id",
        "tenant",
        "version",
        "event_type",
        "occurred_at",
        "headers",
        "payload",
    )

    def rows(self, events: list[StoredEvent]) -> list[tuple[Any, ...]]:
        return [
            (
                e.meta.event_id,
                e.topic,
                e.partition,
                e.offset,
                e.context,
                e.meta.aggregate_type,
                e.meta.aggregate_id,
                e.meta.tenant,
                e.version,
                e.type_name,
                e.meta.occurred_at,
                _headers(e),
                e.payload,
            )
            for e in events
        ]


def _headers(e: StoredEvent) -> dict[str, str]:
    return {k: v.decode() for k, v in e.headers or e.meta.to_headers()}
