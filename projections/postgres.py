"""The PostgreSQL projections: each folds a batch of events into its table in one go.

Applying is idempotent and order-safe. A row keeps the version of the last event it
reflects; an event at or below it is skipped, so a batch delivered twice (after a crash
between the database commit and the Kafka offset commit) changes nothing. Per batch a
projection reads the rows the batch touches once, folds the events in memory, and
writes the changed rows back with one statement.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, Generic, Self, TypeVar
from uuid import UUID

import asyncpg
import orjson

from projections.events import StoredEvent
from shared_kernel.settings import Settings

Row = dict[str, Any]


class Projection:
    """A read model fed by the events of some contexts, kept in versions.

    Readers see the live version through a stable name (a view, an alias); a rebuild
    fills the next version beside it (`<table>_v<N>`) and swaps it in.
    """

    name: ClassVar[str]
    contexts: ClassVar[tuple[str, ...]]
    store: ClassVar[str] = "postgresql"
    table: ClassVar[str]  # what readers query; each version is a table `<table>_v<N>`
    ddl: ClassVar[str]  # creates one version's table and indexes; `{table}` is its name

    def __init__(self, version: int = 1) -> None:
        self.version = version
        # Readers may see what this version writes (it is live): a bulk load must leave
        # each batch readable when it records its positions (read-your-writes).
        self.visible = True

    def at(self, version: int) -> Self:
        """This projection at another version (a fresh instance, not opened)."""
        return type(self)(version)

    @property
    def physical(self) -> str:
        return f"{self.table}_v{self.version}"

    async def open(self, settings: Settings) -> None:
        """Acquire what `apply` needs besides the PostgreSQL connection it is given."""

    def committed(self) -> None:
        """The transaction of the last `apply` committed."""

    def rolled_back(self) -> None:
        """The transaction of the last `apply` did not commit."""

    async def close(self) -> None:
        """Release what `open` acquired."""

    async def apply(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        raise NotImplementedError

    async def load(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        """`apply` by the bulk path, for a replay far behind the head (a rebuild): big
        batches, `COPY` where the rows are new. Used only by a replay that starts from
        the version's own positions, so no event of `events` is applied yet; should one
        be (a conflict), the replay applies the batch again with `apply`."""
        await self.apply(conn, events)

    def remember(self, rows: int) -> None:
        """How many rows to keep in memory between batches (a replay keeps more)."""

    def touched(self, events: list[StoredEvent]) -> set[str] | None:
        """The ids of the rows readers see that applying `events` may change, or None for
        "any": told to readers with the batch (`projections.changes`), so what they keep
        of these rows is dropped. A projection keyed otherwise than by aggregate id, or
        one denormalising other aggregates, says so here."""
        return None

    async def begin_load(self, settings: Settings) -> None:
        """A replay starts loading this version (e.g. pause an index's refreshes)."""

    async def end_load(self, settings: Settings) -> None:
        """The replay is done: what it loaded is visible to readers of this version."""

    async def create_storage(self, conn: asyncpg.Connection, settings: Settings) -> None:
        """Create this version's storage, empty, as the projection's code defines it now
        (a rebuild after a change of columns or mapping builds the new shape)."""
        await conn.execute(self.ddl.format(table=self.physical))

    async def drop_storage(self, conn: asyncpg.Connection, settings: Settings) -> None:
        await conn.execute(f"DROP TABLE IF EXISTS {self.physical}")

    async def make_live(self, conn: asyncpg.Connection, settings: Settings) -> None:
        """Point readers at this version (inside the caller's transaction; the view is
        replaced, not altered, so the new version may have other columns)."""
        await conn.execute(f"DROP VIEW IF EXISTS {self.table}")
        await conn.execute(f"CREATE VIEW {self.table} AS SELECT * FROM {self.physical}")


Evolver = Callable[[Row | None, StoredEvent], Row | None]
K = TypeVar("K")
KNOWN_ROWS = 20_000  # rows a worker remembers per projection (see KnownRows)


def _names(columns: tuple[str, ...]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


def _params(columns: tuple[str, ...]) -> str:
    return ", ".join(f"${i + 1}" for i in range(len(columns)))


def _uuid_key(e: StoredEvent) -> UUID:
    return UUID(e.meta.aggregate_id)


def fold(
    evolvers: dict[str, Evolver],
    current: dict[K, Row],
    events: list[StoredEvent],
    key: Callable[[StoredEvent], K],
) -> dict[K, Row]:
    """Evolve the rows of `current` (updated in place) by `events`; return those changed.
    An event at or below its row's version is skipped: it is there already."""
    changed: dict[K, Row] = {}
    for e in events:
        k = key(e)
        row = current.get(k)
        if row is not None and e.version <= row["version"]:
            continue
        new = evolvers[e.name](None if row is None else dict(row), e)
        if new is None:
            continue
        new["version"] = e.version
        current[k] = changed[k] = new
    return changed


class KnownRows(Generic[K]):
    """The rows this worker wrote last, so a batch need not read them back.

    A batch needs, for each aggregate, the row as of the version before its first event
    there: none at all when that event is version 1 (the creation), or a known row of
    exactly the previous version. Only other aggregates are read from the store. Rows
    become known when the transaction that wrote them commits; at most `size` are kept.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: OrderedDict[K, Row] = OrderedDict()
        self.staged: dict[K, Row] = {}

    def split(
        self, events: list[StoredEvent], key: Callable[[StoredEvent], K]
    ) -> tuple[dict[K, Row], list[K]]:
        """(rows known before the batch, keys to read from the store)."""
        known: dict[K, Row] = {}
        unknown: list[K] = []
        seen: set[K] = set()
        for e in events:
            k = key(e)
            if k in seen:
                continue
            seen.add(k)
            row = self.rows.get(k)
            if e.version == 1:
                continue  # created by this event: nothing before it
            if row is not None and row["version"] == e.version - 1:
                known[k] = row
            else:
                unknown.append(k)
        return known, unknown

    def stage(self, changed: dict[K, Row]) -> None:
        self.staged.update(changed)

    def commit(self) -> None:
        for k, row in self.staged.items():
            self.rows[k] = row
            self.rows.move_to_end(k)
        self.staged.clear()
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)

    def discard(self) -> None:
        self.staged.clear()


class FoldedRows(Projection):
    """One row per aggregate, evolved by a pure function of (row, event)."""

    columns: ClassVar[tuple[str, ...]]  # the first is the key ("id"), "version" among them
    evolvers: ClassVar[dict[str, Evolver]]

    def __init__(self, version: int = 1) -> None:
        super().__init__(version)
        self.known: KnownRows[UUID] = KnownRows(KNOWN_ROWS)

    def committed(self) -> None:
        self.known.commit()

    def rolled_back(self) -> None:
        self.known.discard()

    def remember(self, rows: int) -> None:
        self.known.size = rows

    def touched(self, events: list[StoredEvent]) -> set[str] | None:
        return {str(_uuid_key(e)) for e in events if e.name in self.evolvers}

    async def apply(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        changed = await self._fold(conn, events)
        if not changed:
            return
        await conn.executemany(
            f"INSERT INTO {self.physical} ({_names(self.columns)}) VALUES ({_params(self.columns)}) "
            f"{self._upsert()}",
            [tuple(r[c] for c in self.columns) for r in changed.values()],
        )

    async def load(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        """The rows go to a temporary table by `COPY`, then into the version's table in
        one statement (an upsert: a row may exist from before the replay's batch)."""
        changed = await self._fold(conn, events)
        if not changed:
            return
        stage = f"load_{self.physical}"
        cols = _names(self.columns)
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
            f"(LIKE {self.physical} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.copy_records_to_table(
            stage, records=[tuple(r[c] for c in self.columns) for r in changed.values()], columns=self.columns
        )
        await conn.execute(
            f"INSERT INTO {self.physical} ({cols}) SELECT {cols} FROM {stage} {self._upsert()}"
        )

    def _upsert(self) -> str:
        updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in self.columns[1:])
        return f"ON CONFLICT (id) DO UPDATE SET {updates} WHERE {self.physical}.version < EXCLUDED.version"

    async def _fold(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> dict[UUID, Row]:
        """The rows the events change, evolved (read once from the table when not known)."""
        relevant = [e for e in events if e.name in self.evolvers]
        if not relevant:
            return {}
        key = _uuid_key
        rows, unknown = self.known.split(relevant, key)
        if unknown:
            for r in await conn.fetch(
                f"SELECT {_names(self.columns)} FROM {self.physical} WHERE id = ANY($1::uuid[])", unknown
            ):
                rows[r["id"]] = dict(r)
        changed = fold(self.evolvers, rows, relevant, key)
        self.known.stage(changed)
        return changed


# ---- datasets -------------------------------------------------------------------------


def _dataset_registered(row: Row | None, e: StoredEvent) -> Row:
    p = e.payload
    return {
        "id": UUID(e.meta.aggregate_id),
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


def _on_row(change: Callable[[Row, dict[str, Any], StoredEvent], None]) -> Callable[..., Row | None]:
    def evolve(row: Row | None, e: StoredEvent) -> Row | None:
        if row is None:
            return None  # its creation is not projected yet (cannot happen in order)
        change(row, e.payload, e)
        row["updated_at"] = e.meta.occurred_at
        return row

    return evolve


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


def _archived(row: Row, p: dict[str, Any], e: StoredEvent) -> None:
    row["status"], row["archived_reason"] = "archived", p["reason"]


class DatasetsProjection(FoldedRows):
    name = "datasets"
    contexts = ("datasets",)
    table = "datasets"
    ddl = """
        CREATE TABLE IF NOT EXISTS {table} (
            id              uuid        PRIMARY KEY,
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
        CREATE INDEX IF NOT EXISTS {table}_status ON {table} (status, created_at, id);
        CREATE INDEX IF NOT EXISTS {table}_owner ON {table} (owner, created_at, id);
        CREATE INDEX IF NOT EXISTS {table}_created ON {table} (created_at, id);
        CREATE INDEX IF NOT EXISTS {table}_tags ON {table} USING gin (tags);
    """
    columns = (
        "id",
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
        "DatasetDescribed": _on_row(_described),
        "MetadataSet": _on_row(_metadata_set),
        "MetadataRemoved": _on_row(_metadata_removed),
        "VersionPublished": _on_row(_version_published),
        "QualityCheckRecorded": _on_row(_quality_recorded),
        "DatasetArchived": _on_row(_archived),
    }


# ---- incidents ------------------------------------------------------------------------


def _incident_opened(row: Row | None, e: StoredEvent) -> Row:
    p = e.payload
    return {
        "id": UUID(e.meta.aggregate_id),
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
        CREATE INDEX IF NOT EXISTS {table}_status ON {table} (status, opened_at, id);
        CREATE INDEX IF NOT EXISTS {table}_priority ON {table} (priority, opened_at, id);
        CREATE INDEX IF NOT EXISTS {table}_assignee ON {table} (assignee, opened_at, id);
        CREATE INDEX IF NOT EXISTS {table}_opened ON {table} (opened_at, id);
    """
    columns = (
        "id",
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
        "IncidentAssigned": _on_row(_assigned),
        "IncidentStatusChanged": _on_row(_status_changed),
        "IncidentCommented": _on_row(_commented),
    }


# ---- append-only tables ---------------------------------------------------------------


class AppendOnly(Projection):
    """One row per event (of some types), never changed: the key of a row is its event's,
    so an event delivered again is skipped by the key (`ON CONFLICT DO NOTHING`)."""

    columns: ClassVar[tuple[str, ...]]

    def rows(self, events: list[StoredEvent]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def apply(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        rows = self.rows(events)
        if rows:
            await conn.executemany(
                f"INSERT INTO {self.physical} ({_names(self.columns)}) VALUES ({_params(self.columns)}) "
                "ON CONFLICT DO NOTHING",
                rows,
            )

    async def load(self, conn: asyncpg.Connection, events: list[StoredEvent]) -> None:
        rows = self.rows(events)
        if rows:
            await conn.copy_records_to_table(self.physical, records=rows, columns=self.columns)


class QualityMetricsProjection(AppendOnly):
    """Every quality check, one row each (the history behind the summary)."""

    name = "quality_metrics"
    contexts = ("datasets",)
    table = "quality_metrics"
    ddl = """
        CREATE TABLE IF NOT EXISTS {table} (
            dataset_id   uuid             NOT NULL,
            version      int              NOT NULL,
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

    columns = ("dataset_id", "version", "metric", "value", "threshold", "comparator", "passed", "recorded_at")

    def rows(self, events: list[StoredEvent]) -> list[tuple[Any, ...]]:
        return [
            (
                UUID(e.meta.aggregate_id),
                e.version,
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


class EventsArchiveProjection(AppendOnly):
    """Every event with its headers, payload as JSONB, partition and offset."""

    name = "events"
    contexts = ("datasets", "incidents")
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
