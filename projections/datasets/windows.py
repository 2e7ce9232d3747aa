"""Quality checks counted over event-time windows (`quality_windows`): per dataset,
metric and window (tumbling and hopping, see shared_kernel.windows), how many checks
ran and how many passed.

Each version keeps a second table, `<table>_clock`, with each dataset's stream time,
the last version of it applied and the checks dropped as too late. An event at or
below that version is there already (a redelivery): skipped. Everything is a function
of each dataset's events in their order, so a rebuild gives the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from projections.events import StoredEvent
from projections.projection import Projection
from shared_kernel.settings import Settings, get_settings
from shared_kernel.windows import WindowKind, from_ms, kinds, takes, to_ms


def check_time(e: StoredEvent) -> datetime:
    """A quality check's event time: when it measured, else when it was recorded."""
    measured = e.payload.get("measured_at")
    return datetime.fromisoformat(measured) if measured else e.meta.occurred_at


@dataclass
class Clock:
    stream_time_ms: int
    version: int
    dropped: int = 0
    tenant: str = ""


@dataclass
class Counts:
    tenant: str
    end_ms: int
    checks: int = 0
    passed: int = 0
    first_ms: int = 0
    last_ms: int = 0
    version: int = 0


Key = tuple[UUID, str, str, int]  # dataset, metric, kind, window start (ms)


def count(
    events: list[StoredEvent],
    clocks: dict[UUID, Clock],
    windows: tuple[WindowKind, ...],
    lateness_ms: int,
) -> dict[Key, Counts]:
    """What the quality checks among `events` add to their windows; `clocks` is updated."""
    added: dict[Key, Counts] = {}
    for e in events:
        if e.name != "QualityCheckRecorded":
            continue
        dataset = UUID(e.meta.aggregate_id)
        clock = clocks.get(dataset)
        if clock is not None and e.version <= clock.version:
            continue
        t = to_ms(check_time(e))
        if clock is None:
            clock = clocks[dataset] = Clock(t, e.version, tenant=e.meta.tenant)
        clock.stream_time_ms = max(clock.stream_time_ms, t)
        clock.version = e.version
        late = False
        for kind in windows:
            for start, end in kind.containing(t):
                if not takes(end, clock.stream_time_ms, lateness_ms):
                    late = True
                    continue
                c = added.get((dataset, e.payload["metric"], kind.name, start))
                if c is None:
                    c = added[(dataset, e.payload["metric"], kind.name, start)] = Counts(
                        e.meta.tenant, end, first_ms=t, last_ms=t
                    )
                c.checks += 1
                c.passed += 1 if e.payload["passed"] else 0
                c.first_ms, c.last_ms = min(c.first_ms, t), max(c.last_ms, t)
                c.version = e.version
        clock.dropped += 1 if late else 0
    return added


class QualityWindowsProjection(Projection):
    """Pass rates of quality checks per dataset, metric and event-time window."""

    name = "quality_windows"
    contexts = ("datasets",)
    table = "quality_windows"
    ddl = """
        CREATE TABLE IF NOT EXISTS {table} (
            dataset_id    uuid        NOT NULL,
            metric        text        NOT NULL,
            kind          text        NOT NULL,
            window_start  timestamptz NOT NULL,
            window_end    timestamptz NOT NULL,
            tenant        text        NOT NULL DEFAULT '',
            checks        int         NOT NULL,
            passed        int         NOT NULL,
            first_check_at timestamptz NOT NULL,
            last_check_at timestamptz NOT NULL,
            version       int         NOT NULL,
            PRIMARY KEY (dataset_id, metric, kind, window_start)
        );
        CREATE TABLE IF NOT EXISTS {table}_clock (
            dataset_id    uuid        PRIMARY KEY,
            tenant        text        NOT NULL DEFAULT '',
            stream_time   timestamptz NOT NULL,
            version       int         NOT NULL,
            dropped       int         NOT NULL DEFAULT 0
        );
    """

    columns = (
        "dataset_id",
        "metric",
        "kind",
        "window_start",
        "window_end",
        "tenant",
        "checks",
        "passed",
        "first_check_at",
        "last_check_at",
        "version",
    )

    def __init__(self, version: int = 1) -> None:
        super().__init__(version)
        settings = get_settings()
        self.windows = kinds(settings)
        self.lateness_ms = settings.quality_window_lateness_s * 1000

    def touched(self, events: list[StoredEvent]) -> set[str] | None:
        return set()  # no single read of the cache is of these rows

    async def apply(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        checks = [e for e in events if e.name == "QualityCheckRecorded"]
        if not checks:
            return
        ids = list({UUID(e.meta.aggregate_id) for e in checks})
        clocks = {
            r["dataset_id"]: Clock(to_ms(r["stream_time"]), r["version"], r["dropped"], r["tenant"])
            for r in await conn.fetch(
                f"SELECT dataset_id, tenant, stream_time, version, dropped FROM {self.physical}_clock "
                "WHERE dataset_id = ANY($1::uuid[])",
                ids,
            )
        }
        before = {k: (c.version, c.dropped) for k, c in clocks.items()}
        added = count(checks, clocks, self.windows, self.lateness_ms)
        if added:
            await conn.executemany(
                f"""INSERT INTO {self.physical} AS w (dataset_id, metric, kind, window_start, window_end,
                        tenant, checks, passed, first_check_at, last_check_at, version)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                    ON CONFLICT (dataset_id, metric, kind, window_start) DO UPDATE SET
                        checks = w.checks + EXCLUDED.checks, passed = w.passed + EXCLUDED.passed,
                        first_check_at = least(w.first_check_at, EXCLUDED.first_check_at),
                        last_check_at = greatest(w.last_check_at, EXCLUDED.last_check_at),
                        version = EXCLUDED.version
                    WHERE w.version < EXCLUDED.version""",
                self.rows(added),
            )
        changed = [(k, c) for k, c in clocks.items() if before.get(k) != (c.version, c.dropped)]
        if changed:
            await conn.executemany(
                f"""INSERT INTO {self.physical}_clock AS c (dataset_id, tenant, stream_time, version, dropped)
                    VALUES ($1, $2, $3, $4, $5)
                    ON CONFLICT (dataset_id) DO UPDATE SET stream_time = EXCLUDED.stream_time,
                        version = EXCLUDED.version, dropped = EXCLUDED.dropped
                    WHERE c.version < EXCLUDED.version""",
                [(k, c.tenant, from_ms(c.stream_time_ms), c.version, c.dropped) for k, c in changed],
            )

    @staticmethod
    def rows(added: dict[Key, Counts]) -> list[tuple[object, ...]]:
        """What `count` added, as rows of the table (`columns`)."""
        return [
            (
                *(d, m, kind, from_ms(start), from_ms(c.end_ms), c.tenant, c.checks, c.passed),
                *(from_ms(c.first_ms), from_ms(c.last_ms), c.version),
            )
            for (d, m, kind, start), c in added.items()
        ]

    async def drop_storage(self, conn: asyncpg.Connection, settings: Settings) -> None:
        await conn.execute(f"DROP TABLE IF EXISTS {self.physical}, {self.physical}_clock")

    async def make_live(self, conn: asyncpg.Connection, settings: Settings) -> None:
        for table in (self.table, f"{self.table}_clock"):
            await conn.execute(f"DROP VIEW IF EXISTS {table}")
        await conn.execute(f"CREATE VIEW {self.table} AS SELECT * FROM {self.physical}")
        await conn.execute(f"CREATE VIEW {self.table}_clock AS SELECT * FROM {self.physical}_clock")
