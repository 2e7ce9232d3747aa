"""Every quality check of a dataset, one row each: the history behind its summary."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from projections.append_only import AppendOnly
from projections.events import StoredEvent


class QualityMetricsProjection(AppendOnly):
    """Every quality check, one row each (the history behind the summary)."""

    name = "quality_metrics"
    contexts = ("datasets",)
    table = "quality_metrics"
    ddl = """
        CREATE TABLE IF NOT EXISTS {table} (
            dataset_id   uuid             NOT NULL,
            version      int              NOT NULL,
            tenant       text             NOT NULL DEFAULT '',
            metric       text             NOT NULL,
            value        double precision NOT NULL,
            threshold    double precision NOT NULL,
            comparator   text             NOT NULL,
            passed       boolean          NOT NULL,
            recorded_at  timestamptz      NOT NULL,
            PRIMARY KEY (dataset_id, version)
        );
        CREATE INDEX IF NOT EXISTS {table}_metric ON {table} (dataset_id, metric, recorded_at);
    """

    columns = (
        "dataset_id",
        "version",
        "tenant",
        "metric",
        "value",
        "threshold",
        "comparator",
        "passed",
        "recorded_at",
    )

    def rows(self, events: list[StoredEvent]) -> list[tuple[Any, ...]]:
        return [
            (
                UUID(e.meta.aggregate_id),
                e.version,
                e.meta.tenant,
                e.payload["metric"],
                e.payload["value"],
                e.payload["threshold"],
                e.payload["comparator"],
                e.payload["passed"],
                e.meta.occurred_at,
            )
            for e in events
            if e.name == "QualityCheckRecorded"
        ]
