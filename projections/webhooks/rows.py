"""Webhook subscriptions as the delivery job and the routes read them: one row per
subscription (`webhook_subscriptions`) with what it wants, its state and its secret's
generation (never the secret)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from projections.events import StoredEvent
from projections.folded import FoldedRows, on_row
from projections.projection import Row


def _registered(row: Row | None, e: StoredEvent) -> Row:
    p = e.payload
    return {
        "id": UUID(e.meta.aggregate_id),
        "tenant": e.meta.tenant,
        "url": p["url"],
        "contexts": list(p["contexts"]),
        "event_types": list(p["event_types"]),
        "description": p["description"],
        "status": "active",
        "status_reason": None,
        "failing_since": None,
        "secret_generation": 1,
        "previous_generation": None,
        "previous_until": None,
        "created_at": e.meta.occurred_at,
        "updated_at": e.meta.occurred_at,
    }


def _status(status: str, reason_key: str | None = "reason") -> Any:
    def evolve(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
        row["status"] = status
        row["status_reason"] = p.get(reason_key) if reason_key else None
        row["failing_since"] = p.get("since") if status == "failing" else None

    return on_row(evolve)


def _rotated(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["secret_generation"] = p["generation"]
    row["previous_generation"] = p["previous_generation"]
    row["previous_until"] = p["previous_until"]


class WebhookSubscriptionsProjection(FoldedRows):
    name = "webhook_subscriptions"
    contexts = ("webhooks",)
    table = "webhook_subscriptions"
    ddl = """
        CREATE TABLE IF NOT EXISTS {table} (
            id                uuid        PRIMARY KEY,
            tenant            text        NOT NULL DEFAULT '',
            version           int         NOT NULL,
            url               text        NOT NULL,
            contexts          text[]      NOT NULL DEFAULT '{{}}',
            event_types       text[]      NOT NULL DEFAULT '{{}}',
            description       text        NOT NULL DEFAULT '',
            status            text        NOT NULL,
            status_reason     text,
            failing_since     text,
            secret_generation int         NOT NULL DEFAULT 1,
            previous_generation int,
            previous_until    text,
            created_at        timestamptz NOT NULL,
            updated_at        timestamptz NOT NULL
        );
        CREATE INDEX IF NOT EXISTS {table}_tenant ON {table} (tenant, created_at, id);
        CREATE INDEX IF NOT EXISTS {table}_status ON {table} (tenant, status, created_at, id);
    """
    columns = (
        "id",
        "tenant",
        "version",
        "url",
        "contexts",
        "event_types",
        "description",
        "status",
        "status_reason",
        "failing_since",
        "secret_generation",
        "previous_generation",
        "previous_until",
        "created_at",
        "updated_at",
    )
    evolvers = {
        "WebhookRegistered": _registered,
        "WebhookPaused": _status("paused"),
        "WebhookResumed": _status("active", None),
        "WebhookSecretRotated": on_row(_rotated),
        "WebhookDeleted": _status("deleted", None),
        "WebhookFailing": _status("failing"),
        "WebhookDisabled": _status("disabled"),
    }
