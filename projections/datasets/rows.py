"""The datasets catalogue: one row per dataset (`datasets`), listed and filtered by
status, owner and tag, its metadata as JSONB and a summary of its quality checks."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson

from projections.events import StoredEvent
from projections.folded import FoldedRows, on_row
from projections.projection import Row


def _dataset_registered(row: Row | None, e: StoredEvent) -> Row:
    p = e.payload
    return {
        "id": UUID(e.meta.aggregate_id),
        "tenant": e.meta.tenant,
        "name": p["name"],
        "description": p["description"],
        "owner": p["owner"],
        "status": "active",
        "tags": list(p["tags"]),
        "metadata": {k: orjson.loads(v) for k, v in p["metadata"].items()},
        "latest_version": None,
        "versions": 0,
        "quality": {"checks": 0, "passed": 0, "metrics": {}},
        "archived_reason": None,
        "created_at": e.meta.occurred_at,
        "updated_at": e.meta.occurred_at,
    }


def _described(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["name"], row["description"] = p["name"], p["description"]


def _metadata_set(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["metadata"] = {**row["metadata"], p["key"]: orjson.loads(p["value_json"])}


def _metadata_removed(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["metadata"] = {k: v for k, v in row["metadata"].items() if k != p["key"]}


def _version_published(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["latest_version"] = p["version"]
    row["versions"] += 1


def _quality_recorded(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    q = dict(row["quality"])
    q["checks"] = q.get("checks", 0) + 1
    q["passed"] = q.get("passed", 0) + (1 if p["passed"] else 0)
    q["metrics"] = {
        **q.get("metrics", {}),
        p["metric"]: {
            "value": p["value"],
            "threshold": p["threshold"],
            "comparator": p["comparator"],
            "passed": p["passed"],
            "recorded_at": e.meta.occurred_at.isoformat(),
        },
    }
    row["quality"] = q


def _quality_degraded(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    q = dict(row["quality"])
    q["degraded"] = {
        **q.get("degraded", {}),
        p["metric"]: {
            "since": e.meta.occurred_at.isoformat(),
            "failure_rate": p["failure_rate"],
            "window_start": p["window_start"],
            "window_end": p["window_end"],
        },
    }
    row["quality"] = q


def _quality_restored(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    q = dict(row["quality"])
    q["degraded"] = {k: v for k, v in q.get("degraded", {}).items() if k != p["metric"]}
    row["quality"] = q


def _archived(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["status"], row["archived_reason"] = "archived", p["reason"]


class DatasetsProjection(FoldedRows):
    name = "datasets"
    contexts = ("datasets",)
    table = "datasets"
    ddl = """
        CREATE TABLE IF NOT EXISTS {table} (
            id              uuid        PRIMARY KEY,
            tenant          text        NOT NULL DEFAULT '',
            version         int         NOT NULL,
            name            text        NOT NULL,
            description     text        NOT NULL DEFAULT '',
            owner           text        NOT NULL DEFAULT '',
            status          text        NOT NULL DEFAULT 'active',
            tags            text[]      NOT NULL DEFAULT '{{}}',
            metadata        jsonb       NOT NULL DEFAULT '{{}}',
            latest_version  text,
            versions        int         NOT NULL DEFAULT 0,
            quality         jsonb       NOT NULL DEFAULT '{{"checks": 0, "passed": 0, "metrics": {{}}}}',
            archived_reason text,
            created_at      timestamptz NOT NULL,
            updated_at      timestamptz NOT NULL
        );
        CREATE INDEX IF NOT EXISTS {table}_status ON {table} (tenant, status, created_at, id);
        CREATE INDEX IF NOT EXISTS {table}_owner ON {table} (tenant, owner, created_at, id);
        CREATE INDEX IF NOT EXISTS {table}_created ON {table} (tenant, created_at, id);
        CREATE INDEX IF NOT EXISTS {table}_tags ON {table} USING gin (tags);
    """
    columns = (
        "id",
        "tenant",
        "version",
        "name",
        "description",
        "owner",
        "status",
        "tags",
        "metadata",
        "latest_version",
        "versions",
        "quality",
        "archived_reason",
        "created_at",
        "updated_at",
    )
    evolvers = {
        "DatasetRegistered": _dataset_registered,
        "DatasetDescribed": on_row(_described),
        "MetadataSet": on_row(_metadata_set),
        "MetadataRemoved": on_row(_metadata_removed),
        "VersionPublished": on_row(_version_published),
        "QualityCheckRecorded": on_row(_quality_recorded),
        "DatasetArchived": on_row(_archived),
        "DatasetQualityDegraded": on_row(_quality_degraded),
        "DatasetQualityRestored": on_row(_quality_restored),
    }
