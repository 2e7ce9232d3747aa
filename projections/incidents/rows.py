"""Incidents as a list to work from: one row per incident (`incidents`), filtered by
status, priority, assignee, source and external id, with the times of its life cycle,
the deadlines of its service level (`APP_INCIDENT_SLA_*`, from its opening) and whether
they were breached (met late, or escalated by the deadlines job)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from projections.events import StoredEvent
from projections.folded import FoldedRows, on_row
from projections.projection import Row
from shared_kernel.settings import get_settings


def due_times(priority: str, opened_at: datetime) -> tuple[datetime, datetime]:
    """(assign by, resolve by) of an incident of this priority opened then."""
    settings = get_settings()
    return (
        opened_at + timedelta(seconds=settings.incident_sla_assign_s[priority]),
        opened_at + timedelta(seconds=settings.incident_sla_resolve_s[priority]),
    )


def _incident_opened(row: Row | None, e: StoredEvent) -> Row:
    p = e.payload
    assign_due, resolve_due = due_times(p["priority"], e.meta.occurred_at)
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
        "assigned_at": None,
        "assign_due_at": assign_due,
        "resolve_due_at": resolve_due,
        "assign_breached": False,
        "resolve_breached": False,
        "escalation_level": 0,
    }


def _assigned(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["assignee"] = p["assignee"]
    if row["assigned_at"] is None:
        row["assigned_at"] = e.meta.occurred_at
        if row["assign_due_at"] is not None and e.meta.occurred_at > row["assign_due_at"]:
            row["assign_breached"] = True


def _status_changed(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["status"] = p["to_status"]
    if p["to_status"] == "resolved":
        row["resolved_at"] = e.meta.occurred_at
        if row["resolve_due_at"] is not None and e.meta.occurred_at > row["resolve_due_at"]:
            row["resolve_breached"] = True
    elif p["to_status"] == "closed":
        row["closed_at"] = e.meta.occurred_at
    else:
        row["resolved_at"] = row["resolved_at"] if p["to_status"] != "open" else None
        row["closed_at"] = None


def _commented(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["comments"] += 1


def _escalated(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["escalation_level"] = max(row["escalation_level"] or 0, p["level"])
    row["assign_breached" if p["deadline"] == "assignment" else "resolve_breached"] = True


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
            closed_at    timestamptz,
            assigned_at  timestamptz,
            assign_due_at  timestamptz,
            resolve_due_at timestamptz,
            assign_breached  boolean NOT NULL DEFAULT false,
            resolve_breached boolean NOT NULL DEFAULT false,
            escalation_level int     NOT NULL DEFAULT 0
        );
        CREATE INDEX IF NOT EXISTS {table}_status ON {table} (tenant, status, opened_at, id);
        CREATE INDEX IF NOT EXISTS {table}_priority ON {table} (tenant, priority, opened_at, id);
        CREATE INDEX IF NOT EXISTS {table}_assignee ON {table} (tenant, assignee, opened_at, id);
        CREATE INDEX IF NOT EXISTS {table}_opened ON {table} (tenant, opened_at, id);
        CREATE INDEX IF NOT EXISTS {table}_external ON {table} (tenant, source, external_id, opened_at, id);
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
        "assigned_at",
        "assign_due_at",
        "resolve_due_at",
        "assign_breached",
        "resolve_breached",
        "escalation_level",
    )
    evolvers = {
        "IncidentOpened": _incident_opened,
        "IncidentAssigned": on_row(_assigned),
        "IncidentStatusChanged": on_row(_status_changed),
        "IncidentCommented": on_row(_commented),
        "IncidentEscalated": on_row(_escalated),
    }
