"""Incidents as a list to work from: one row per incident (`incidents`), filtered by
status, priority and assignee, with the times of its life cycle."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from projections.events import StoredEvent
from projections.folded import FoldedRows, on_row
from projections.projection import Row


def _incident_opened(row: Row | None, e: StoredEvent) -> Row:
    p = e.payload
    return {
        "id": UUID(e.meta.aggregate_id),
        "tenant": e.meta.tenant,
        "title": p["title"],
        "description": p["description"],
        "priority": p["priority"],
        "source": p["source"],
        "external_id": p["external_id"],
        "status": "open",
        "assignee": None,
        "comments": 0,
        "opened_at": e.meta.occurred_at,
        "updated_at": e.meta.occurred_at,
        "resolved_at": None,
        "closed_at": None,
    }


def _assigned(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["assignee"] = p["assignee"]


def _status_changed(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["status"] = p["to_status"]
    if p["to_status"] == "resolved":
        row["resolved_at"] = e.meta.occurred_at
    elif p["to_status"] == "closed":
        row["closed_at"] = e.meta.occurred_at
    else:
        row["resolved_at"] = row["resolved_at"] if p["to_status"] != "open" else None
        row["closed_at"] = None


def _commented(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["comments"] += 1


class IncidentsProjection(FoldedRows):
    name = "incidents"
    contexts = ("incidents",)
    table = "incidents"
    ddl = """
        CREATE TABLE IF NOT EXISTS {table} (
            id           uuid        PRIMARY KEY,
            tenant       text        NOT NULL DEFAULT '',
            version      int         NOT NULL,
            title        text        NOT NULL,
            description  text        NOT NULL DEFAULT '',
            priority     text        NOT NULL,
            source       text        NOT NULL DEFAULT '',
            external_id  text        NOT NULL DEFAULT '',
            status       text        NOT NULL,
            assignee     text,
            comments     int         NOT NULL DEFAULT 0,
            opened_at    timestamptz NOT NULL,
            updated_at   timestamptz NOT NULL,
            resolved_at  timestamptz,
            closed_at    timestamptz
        );
        CREATE INDEX IF NOT EXISTS {table}_status ON {table} (tenant, status, opened_at, id);
        CREATE INDEX IF NOT EXISTS {table}_priority ON {table} (tenant, priority, opened_at, id);
        CREATE INDEX IF NOT EXISTS {table}_assignee ON {table} (tenant, assignee, opened_at, id);
        CREATE INDEX IF NOT EXISTS {table}_opened ON {table} (tenant, opened_at, id);
    """
    columns = (
        "id",
        "tenant",
        "version",
        "title",
        "description",
        "priority",
        "source",
        "external_id",
        "status",
        "assignee",
        "comments",
        "opened_at",
        "updated_at",
        "resolved_at",
        "closed_at",
    )
    evolvers = {
        "IncidentOpened": _incident_opened,
        "IncidentAssigned": on_row(_assigned),
        "IncidentStatusChanged": on_row(_status_changed),
        "IncidentCommented": on_row(_commented),
    }
